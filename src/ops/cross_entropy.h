// cross_entropy.h: LM head fused with softmax cross-entropy.
//
// logits = x W^T over the first V rows of W (padded rows never enter the softmax), computed in
// chunks of rows into `logits_scratch`, turned into per-row losses, and (when gradients are asked
// for) into dlogits in place in the same buffer before the chunk's dx and dW GEMMs. No second
// full-vocabulary buffer exists. Rows are processed in a fixed order: deterministic.
#pragma once
#include "core/tensor.h"

namespace lmf {

// losses: (N) per-row -log softmax(logits)[target]
// x: (N, C); w: (Vp, C) (tied token embedding or separate head); targets: (N) i32 in [0, V)
// logits_scratch: (R, Vp) with R >= 1 rows; N is processed R rows at a time
// dx: (N, C) and dw: (Vp, C), both accumulated (+=) with dloss_row = grad_scale, or both absent
void lm_head_cross_entropy(Tensor losses, Tensor dx, Tensor dw, Tensor x, Tensor w, Tensor targets,
                           Tensor logits_scratch, int64_t vocab_size, float grad_scale);

}  // namespace lmf
