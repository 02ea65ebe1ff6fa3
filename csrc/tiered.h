#pragma once
// The norm and the compose pass on the tier an op's preamble chose (OpScope::fused()): the fused
// bodies in a CUDA build, the eager ones otherwise. One place for the choice, for every op body
// composed of them (ops_impl.cpp, dropout.cpp, mixed.cpp).
#include "eager.h"

#ifdef DORA_EXT_WITH_CUDA
#include "fused.h"
#endif

namespace dora_ext {

// The row norm through the cache (shared with it: not to be written to).
inline at::Tensor row_norm_cached_on(bool fused, const at::Tensor& weight, const at::Tensor& lora_A,
                                     const at::Tensor& lora_B, double scale, NormUse use) {
#ifdef DORA_EXT_WITH_CUDA
  if (fused) return row_norm_cached_fused(weight, lora_A, lora_B, scale, use);
#endif
  (void)fused;
  return row_norm_cached_eager(weight, lora_A, lora_B, scale, use);
}

// (g - 1) base + g s lora, in lora's dtype (compose_delta's body).
inline at::Tensor compose_delta_on(bool fused, const at::Tensor& base, const at::Tensor& lora,
                                   const at::Tensor& magnitude, const at::Tensor& norm, double scale) {
#ifdef DORA_EXT_WITH_CUDA
  if (fused) return compose_delta_fused(base, lora, magnitude, norm, scale);
#endif
  (void)fused;
  return compose_delta_eager(base, lora, magnitude, norm, scale);
}

}  // namespace dora_ext
