// ends.cpp: the family -> ends rule (ends.h make_ends) and the input/target checks every ends share.
#include "model/ends.h"

#include <string>

#include "core/check.h"
#include "model/timeseries_ends.h"
#include "model/token_ends.h"

namespace lmf {

void check_matches_spec(const Tensor& t, const TensorSpec& s, const char* what) {
  bool ok = t.defined() && t.ndim == static_cast<int>(s.shape.size());
  for (size_t i = 0; ok && i < s.shape.size(); ++i) ok = t.shape[i] == s.shape[i];
  if (!ok) {
    std::string want = "(";
    for (size_t i = 0; i < s.shape.size(); ++i) want += (i ? ", " : "") + std::to_string(s.shape[i]);
    fail(what, ": tensor '", t.name, "' has shape ", t.defined() ? t.shape_str() : std::string("<absent>"),
         ", expected ", want, ")");
  }
  if (t.dtype != s.dtype)
    fail(what, ": tensor '", t.name, "' has dtype ", dtype_name(t.dtype), ", expected ", dtype_name(s.dtype));
}

std::unique_ptr<ModelEnds> make_ends(const ModelConfig& c) {
  if (c.family == ModelFamily::timeseries) return std::make_unique<TimeSeriesEnds>(c);
  return std::make_unique<TokenEnds>(c);
}

}  // namespace lmf
