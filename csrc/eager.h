#pragma once
// The eager path: DoRA in ATen ops, for CPU and CUDA. It is the reference the
// fused kernels are tested against, the fallback where they cannot run, and
// the source of the GEMM stages the fused path shares.
#include "norm_cache.h"

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <array>
#include <tuple>

namespace dora_ext {

// ||W_i + s (B A)_i|| from the factored form ||W_i||^2 + 2s<B_i, (W A^T)_i> + s^2 B_i (A A^T) B_i^T,
// accumulated in fp32 (float64 for float64), clamped at kNormEpsilon^2 before the root.
// `cached_weight_sq` (||W_i||^2, may be undefined) is used
// instead of recomputing it; a computed ||W_i||^2 is stored in `*weight_sq` when given.
at::Tensor row_norm_eager_parts(const at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B,
                                double scale, const at::Tensor& cached_weight_sq, at::Tensor* weight_sq);

// The squared row norm before the clamp: ||W_i||^2 + 2s<B_i, (W A^T)_i> + s^2 B_i (A A^T) B_i^T in the
// accumulate dtype. Linear in the sums over d_in, so the terms of a column shard of W and A add up
// across shards to the whole weight's (the row_norm_sq op; dora_ext.distributed).
at::Tensor row_norm_sq_eager(const at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B, double scale,
                             const at::Tensor& cached_weight_sq, at::Tensor* weight_sq);

// sqrt(max(squared norm, kNormEpsilon^2)): the norm from its squared form.
at::Tensor norm_from_squared(at::Tensor squared);

// row_norm_eager_parts through the norm cache (norm_cache.h); the result is shared
// with the cache and must not be written to.
at::Tensor row_norm_cached_eager(const at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B,
                                 double scale, NormUse use);

// How a row_norm call uses the cache: it records gradients when grad mode is on
// and A or B requires grad (PEFT computes the norm of trained adapters this way).
NormUse row_norm_use(const at::Tensor& lora_A, const at::Tensor& lora_B);

// Smallest norm used: a zero row (W_i = 0, B_i = 0) gets n = kNormEpsilon and
// g = 0 (see magnitude_scale), so y_i = bias_i, never NaN.
constexpr double kNormEpsilon = 1e-6;

// g = m / n in the accumulate dtype; 0 for a zero row (n clamped to
// kNormEpsilon), which has no direction: its output is the bias and it gets no
// gradient (a huge g would overflow fp16 and turn the backward GEMMs into NaN).
at::Tensor magnitude_scale(const at::Tensor& magnitude, const at::Tensor& norm);

// g - 1 as (m - n) / n: exact where g is close to 1, unlike fp32(m / n) - 1.
at::Tensor magnitude_scale_minus_one(const at::Tensor& magnitude, const at::Tensor& norm);

// The GEMM stage of the forward on 2-D x [T, d_in]: h = x A^T [T, r] and
// z = x W^T + s h B^T [T, d_out], both in x's dtype (one dtype throughout; float32
// adapters on 16-bit x: fp32_adapters.h).
std::pair<at::Tensor, at::Tensor> lora_and_base(const at::Tensor& x2d, const at::Tensor& weight,
                                                const at::Tensor& lora_A, const at::Tensor& lora_B, double scale);

// The GEMM stage of the backward from the output gradient gy [T, d_out], gz = gy * g in x's
// dtype and g = m / n: grad_x [T, d_in], grad_A [r, d_in], grad_B [d_out, r] (each undefined
// when its mask entry is false). Same-dtype adapters use gz only.
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_gemms(const at::Tensor& gy, const at::Tensor& gz,
                                                              const at::Tensor& g, const at::Tensor& x2d,
                                                              const at::Tensor& weight, const at::Tensor& lora_A,
                                                              const at::Tensor& lora_B, const at::Tensor& h,
                                                              double scale, bool need_x, bool need_A, bool need_B);

// [..., d_in] -> [T, d_in] with unit column stride (a view where possible).
at::Tensor as_rows(const at::Tensor& t);

// Output shape [..., d_out] for input [..., d_in].
std::vector<int64_t> output_shape(const at::Tensor& x, int64_t d_out);

// The op bodies on the eager path (every op on the CPU, and on CUDA where no fused tier runs);
// the arguments are validated by the caller (ops_impl.cpp).
at::Tensor dora_linear_eager(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                             const at::Tensor& lora_A, const at::Tensor& lora_B, const at::Tensor& magnitude,
                             double scale);
// The training forward: {y, z in x's dtype when `keep_z` (else undefined), h = x A^T, norm}.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dora_linear_forward_eager(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias, const at::Tensor& lora_A,
    const at::Tensor& lora_B, const at::Tensor& magnitude, double scale, bool keep_z);
at::Tensor compose_delta_eager(const at::Tensor& base, const at::Tensor& lora, const at::Tensor& magnitude,
                               const at::Tensor& norm, double scale);
std::tuple<at::Tensor, at::Tensor, at::Tensor> compose_delta_backward_eager(
    const at::Tensor& grad_out, const at::Tensor& base, const at::Tensor& lora, const at::Tensor& magnitude,
    const at::Tensor& norm, double scale, std::array<bool, 3> output_mask);

// A masked-out gradient: an empty tensor the autograd layer turns into "no gradient".
at::Tensor no_grad_placeholder(const at::Tensor& like);

}  // namespace dora_ext
