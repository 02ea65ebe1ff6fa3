#pragma once
// dora_linear's backward, on the eager or the fused tier: the gradients of x, lora_A, lora_B, the
// magnitude and the bias from the output gradient and what the training forward kept
// (magnitude_grad.h says how each kind of kept tensor gives the magnitude gradient).
#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <array>
#include <tuple>

namespace dora_ext {

// {grad_x, grad_A, grad_B, grad_magnitude, grad_bias} (placeholders where the mask, in that order,
// is false). `z` (a saved z) or else `out` (the layer's output) when defined; neither: z is
// recomputed. `fused` picks the fused prologue (CUDA builds; the caller's tier decision).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> dora_linear_backward_body(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& lora_A, const at::Tensor& lora_B, const at::Tensor& magnitude, const at::Tensor& norm,
    const at::Tensor& z, const at::Tensor& out, const at::Tensor& h, double scale, std::array<bool, 5> output_mask,
    bool fused);

}  // namespace dora_ext
