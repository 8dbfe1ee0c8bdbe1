// fixture_tensor.h: one tensor of a committed safetensors fixture (tests/fixtures, written by the
// tools/make_*fixture*.py scripts) as a host vector, for the tests against PyTorch. Header-only.
#pragma once
#include <cstring>
#include <string>
#include <vector>

#include "core/check.h"
#include "train/safetensors.h"

namespace lmf::test {

// The tensor `name` of `file`, which must have the safetensors dtype `dtype` ("F64", "F32", "I32").
template <class T>
std::vector<T> fixture_tensor(const SafetensorsFile& file, const std::string& name, const char* dtype) {
  const SafetensorsEntry* e = file.find(name);
  LMF_CHECK(e && e->dtype == dtype, "fixture tensor ", name, " (", dtype, ")");
  std::vector<T> v((e->end - e->begin) / sizeof(T));
  std::memcpy(v.data(), file.data(*e), e->end - e->begin);
  return v;
}

}  // namespace lmf::test
