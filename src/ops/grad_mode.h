// grad_mode.h: how a backward op writes an activation gradient (ops/README.md: backward ops add).
#pragma once

namespace lmf {

// Accumulate: grad += result (the rule of every backward op). Overwrite: grad = result, its old
// contents never read: saves the caller's zero fill and the op's read of grad. Both give the same
// values when grad starts at zero.
enum class GradMode { Accumulate, Overwrite };

}  // namespace lmf
