#pragma once
// The norm and the compose pass on the tier an op's preamble chose (OpScope::fused()): the fused
// bodies in a CUDA build, the eager ones otherwise. One place for the choice, for every op body
// composed of them (ops_impl.cpp, dropout.cpp, mixed.cpp).
#include "eager.h"
#include "fp32_adapters.h"

#include <ATen/ATen.h>

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

// The inference compose of same-dtype adapters written over z (2-D [T, d_out], x's dtype, holding
// z = x W^T + s h B^T): y = g z + bias in float32, rounded once, as dora_linear's forward.
inline void scale_in_place_on(bool fused, const at::Tensor& z, const at::Tensor& g,
                              const std::optional<at::Tensor>& bias) {
#ifdef DORA_EXT_WITH_CUDA
  if (fused) return launch_scale(z, g, bias, z);
#endif
  (void)fused;
  at::Tensor y = at::mul(z, g);  // promotes to g's dtype
  if (bias.has_value() && bias->defined()) y.add_(*bias);
  z.copy_(y);
}

// Float32 adapters on 16-bit x, written over base (2-D, x's dtype, holding x W^T):
// y = g (base + s lora) + bias in float32, rounded once (fp32_adapters.h's compose_fp32_adapters).
inline void compose_fp32_in_place_on(bool fused, const at::Tensor& base, const at::Tensor& lora, const at::Tensor& g,
                                     const std::optional<at::Tensor>& bias, double scale) {
#ifdef DORA_EXT_WITH_CUDA
  if (fused) {
    launch_fp32_compose(base, lora, g, bias, scale, /*need_z=*/false, base);
    return;
  }
#endif
  (void)fused;
  base.copy_(compose_fp32_adapters(base, lora, g, bias, scale, /*need_z=*/false).first);
}

}  // namespace dora_ext
