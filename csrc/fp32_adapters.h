#pragma once
// The LoRA GEMMs of float32 adapters on float16/bfloat16 activations (PEFT's default
// mix: a 16-bit model whose lora_A, lora_B and magnitude stay float32), at float32
// accuracy: the products x A^T, h B^T and their gradients as PEFT computes them
// (x upcast, float32 GEMMs), without float32 copies of the [T, d] activations.
//
// On CUDA with bfloat16 activations every float32 operand is split into three
// bfloat16 parts that sum to it exactly (8 + 8 + 8 of float32's 24 mantissa bits,
// same exponent range) and the GEMMs run on tensor cores with float32 accumulation:
// a bfloat16 x bfloat16 product is exact in float32, so a 16-bit operand times the
// three parts of a float32 one is the float32 product, and two float32 operands
// keep the six part products down to 2^-16 relative (hi*hi, hi*mid, mid*hi,
// hi*lo, mid*mid, lo*hi); the three dropped ones are below 2^-24, float32's own
// rounding. Elsewhere (CPU, float16, fewer than 2048 tokens) the adapters' GEMMs run
// in float32.
#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace dora_ext {

// True for float32 lora_A on float16/bfloat16 activations (validated: lora_B is then float32 too).
bool has_fp32_adapters(const at::Tensor& x, const at::Tensor& lora_A);

// b (float32) as its three exact bfloat16 parts hi, mid, lo concatenated along `dim`.
at::Tensor bf16_parts(const at::Tensor& b, int64_t dim);

// The forward on 2-D x with g = m / n (float32): y = g (x W^T + s (x A^T) B^T) + bias in x's dtype
// with x W^T rounded to x's dtype and everything after it in float32, rounded once, as PEFT
// computes it (its base layer's output, plus a float32 delta); z = x W^T + s h B^T rounded to
// x's dtype when `need_z` (the magnitude gradient), and h = x A^T [T, r] in float32.
std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_fp32_adapters(const at::Tensor& x2d, const at::Tensor& weight,
                                                                       const std::optional<at::Tensor>& bias,
                                                                       const at::Tensor& lora_A,
                                                                       const at::Tensor& lora_B, const at::Tensor& g,
                                                                       double scale, bool need_z);

// The backward GEMMs from the output gradient gy [T, d_out] (x's dtype), gz = gy * g rounded
// to x's dtype (the base GEMM's gradient, as PEFT's base layer receives it) and g = m / n
// (float32): grad_x [T, d_in] in x's dtype, grad_A and grad_B in float32 (undefined unless needed).
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_gemms_fp32_adapters(
    const at::Tensor& gy, const at::Tensor& gz, const at::Tensor& g, const at::Tensor& x2d, const at::Tensor& weight,
    const at::Tensor& lora_A, const at::Tensor& lora_B, const at::Tensor& h, double scale, bool need_x, bool need_A,
    bool need_B);

}  // namespace dora_ext
