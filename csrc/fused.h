#pragma once
// The fused CUDA bodies of the ops (fused.cpp): called by ops_impl.cpp once the
// arguments are validated and the dispatcher chose a fused tier.
#include "norm_cache.h"
#include "op_scope.h"

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <array>
#include <tuple>

namespace dora_ext {

// The row norm through the cache, by the fused kernel where one serves these inputs
// (the eager cuBLAS path otherwise; both fp32, both factored).
at::Tensor row_norm_cached_fused(const at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B,
                                 double scale, NormUse use);

// Inference forward; `scope` notes the decode kernel when it serves the call.
at::Tensor dora_linear_fused(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                             const at::Tensor& lora_A, const at::Tensor& lora_B, const at::Tensor& magnitude,
                             double scale, OpScope& scope);

// The training forward: {y, z in x's dtype when `keep_z` (else undefined), h = x A^T, norm}.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dora_linear_forward_fused(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias, const at::Tensor& lora_A,
    const at::Tensor& lora_B, const at::Tensor& magnitude, double scale, bool keep_z);

// The backward's prologue on 2-D gy and z (x's dtype) and g = m / n (float32, contiguous), in one pass:
// {gz = gy * g in gy's dtype, the magnitude gradient colsum(gy * z) / norm in float32}.
std::pair<at::Tensor, at::Tensor> grad_prologue_fused(const at::Tensor& gy, const at::Tensor& z, const at::Tensor& g,
                                                      const at::Tensor& norm);

// The prologue from the layer's output y = g z + bias (magnitude_grad.h) in two launches (a pass over
// gy and y, then one over [d_out]): {gz = gy * g, grad_m = colsum(gy (y - bias)) / (g norm) in float32,
// unrecovered (bool [d_out]: |g| < min_scale, with a bias colsum|gy y| > loss_limit colsum|gy (y - bias)|,
// or grad_m not finite; grad_m is 0 there), their count (int32 scalar on the device)}.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> grad_prologue_from_output_fused(
    const at::Tensor& gy, const at::Tensor& y, const at::Tensor& g, const at::Tensor& norm,
    const std::optional<at::Tensor>& bias, double min_scale, double loss_limit);

// The inference compose of same-dtype adapters: out = g * z + bias over 2-D z [T, d_out] (x's dtype,
// z = x W^T + s h B^T), g float32 [d_out]; out may be z (each element is read before it is written).
void launch_scale(const at::Tensor& z, const at::Tensor& g, const std::optional<at::Tensor>& bias,
                  const at::Tensor& out);

// Float32 adapters on 16-bit x, one pass: y = g * (base + s * lora) + bias rounded once to base's dtype
// (into `out` when defined; it may be base), and z = base + s * lora in base's dtype when need_z
// (fp32_adapters.h's compose_fp32_adapters, fused): {y, z or undefined}.
std::pair<at::Tensor, at::Tensor> launch_fp32_compose(const at::Tensor& base, const at::Tensor& lora,
                                                      const at::Tensor& g, const std::optional<at::Tensor>& bias,
                                                      double scale, bool need_z, const at::Tensor& out = {});

at::Tensor compose_delta_fused(const at::Tensor& base, const at::Tensor& lora, const at::Tensor& magnitude,
                               const at::Tensor& norm, double scale);

// Needs both the lora and the magnitude gradient (output_mask[1] and [2]).
std::tuple<at::Tensor, at::Tensor, at::Tensor> compose_delta_backward_fused(
    const at::Tensor& grad_out, const at::Tensor& base, const at::Tensor& lora, const at::Tensor& magnitude,
    const at::Tensor& norm, double scale, std::array<bool, 3> output_mask);

}  // namespace dora_ext
