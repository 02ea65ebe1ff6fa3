#pragma once
// DoRA with PEFT's lora_dropout in one op (dora_linear_dropout): the layer's own dropout draws
// x_d = lora_dropout(x) and the op computes, exactly as PEFT's DoRA layer does in training,
//
//     y = x W^T + bias + (g - 1) (x_d W^T) + g s (x_d A^T) B^T,    g = m / ||W + s B A||_row
//
// with the two base GEMMs as one GEMM over [x; x_d] (2T rows), the adapter's GEMMs on x_d
// (float32 adapters through fp32_adapters.h), and (g - 1) (x_d W^T) + g s lora by compose_delta's
// pass (fused on CUDA). Without dropout (x_d = x) it is dora_linear.
#include "norm_cache.h"

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <array>
#include <tuple>

namespace dora_ext {

// {y, z_dropped = x_d W^T + s (x_d A^T) B^T [T, d_out] in x's dtype (the magnitude gradient's
// factor; undefined unless `keep_z`), h = x_d A^T [T, r], norm}. `fused` picks the fused norm and
// compose passes (CUDA builds; the caller's tier decision).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dora_linear_dropout_forward_body(
    const at::Tensor& x, const at::Tensor& x_dropped, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& lora_A, const at::Tensor& lora_B, const at::Tensor& magnitude, double scale, NormUse use,
    bool fused, bool keep_z);

// {grad_x, grad_x_dropped, grad_A, grad_B, grad_magnitude, grad_bias} (placeholders where the mask,
// in that order, is false). x itself is not needed: grad_x = gy W, and x has x_dropped's shape
// and the weight's dtype. An undefined z_dropped is recomputed from x_dropped and h.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> dora_linear_dropout_backward_body(
    const at::Tensor& grad_out, const at::Tensor& x_dropped, const at::Tensor& weight, const at::Tensor& lora_A,
    const at::Tensor& lora_B, const at::Tensor& magnitude, const at::Tensor& norm, const at::Tensor& z_dropped,
    const at::Tensor& h, double scale, std::array<bool, 6> output_mask, bool fused);

}  // namespace dora_ext
