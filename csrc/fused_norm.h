#pragma once
// The fused factored row norm on CUDA (triton_src/norm.py).
#include <ATen/core/Tensor.h>

namespace dora_ext {

// ||W_i + s (B A)_i|| in fp32 without forming W A^T or B A: one tensor-core pass
// over W gives ||W_i||^2 and the cross term, the Gram term comes from A A^T.
// `cached_weight_sq` skips ||W_i||^2 when given; otherwise, if `weight_sq` is
// not null, the computed ||W_i||^2 is stored there. Returns an undefined tensor
// when no compiled kernel serves these inputs (dtype, alignment, arch, shared
// memory); the caller then takes the eager path.
at::Tensor row_norm_fused(const at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B, double scale,
                          const at::Tensor& cached_weight_sq, at::Tensor* weight_sq);

}  // namespace dora_ext
