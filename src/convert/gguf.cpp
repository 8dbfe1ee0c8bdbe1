// Placeholder until the GGUF importer lands (issue 17): import_model() dispatches here for files with
// the GGUF magic.
#include "convert/gguf.h"

#include "core/check.h"

namespace lmf {

ImportedModel import_gguf(const std::string& path) { fail(path, ": GGUF import is not built yet"); }

}  // namespace lmf
