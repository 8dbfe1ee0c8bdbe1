// corpus.h: the bundled default corpus (data/kjv.txt), embedded into the binary at build time.
#pragma once
#include <string_view>

namespace lmf {

// The text of data/kjv.txt (see data/README.md).
std::string_view bundled_corpus();

}  // namespace lmf
