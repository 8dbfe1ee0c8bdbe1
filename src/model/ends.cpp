// ends.cpp: the family -> ends rule (ends.h make_ends).
#include "model/ends.h"

#include "model/timeseries_ends.h"
#include "model/token_ends.h"

namespace lmf {

std::unique_ptr<ModelEnds> make_ends(const ModelConfig& c) {
  if (c.family == ModelFamily::timeseries) return std::make_unique<TimeSeriesEnds>(c);
  return std::make_unique<TokenEnds>(c);
}

}  // namespace lmf
