// gguf.h: a GGUF file (version 3) -> ImportedModel (docs/IMPORT.md).
#pragma once
#include <string>

#include "convert/imported.h"

namespace lmf {

ImportedModel import_gguf(const std::string& path);

}  // namespace lmf
