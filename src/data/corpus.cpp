#include "data/corpus.h"

// The assembler includes the file's bytes verbatim into .rodata (CMake passes its absolute path
// and makes this object depend on it).
asm(".section .rodata\n"
    ".balign 16\n"
    ".global lmf_corpus_begin\n"
    "lmf_corpus_begin:\n"
    ".incbin \"" LMF_CORPUS_PATH "\"\n"
    ".global lmf_corpus_end\n"
    "lmf_corpus_end:\n"
    ".byte 0\n"
    ".previous\n");

extern "C" const char lmf_corpus_begin[];
extern "C" const char lmf_corpus_end[];

namespace lmf {

std::string_view bundled_corpus() {
  return std::string_view(lmf_corpus_begin, static_cast<size_t>(lmf_corpus_end - lmf_corpus_begin));
}

}  // namespace lmf
