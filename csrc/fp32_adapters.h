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
// rounding. The parts come from one pass of an AOT kernel (triton_src/parts.py) written
// straight into the GEMM operand, or from ATen ops where no cubin serves the device (the
// same bits). Elsewhere (CPU, float16, fewer than fp32_parts_min_tokens tokens) the adapters' GEMMs run
// in float32.
#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>
#include <utility>

namespace dora_ext {

// True for float32 lora_A on float16/bfloat16 activations (validated: lora_B is then float32 too).
bool has_fp32_adapters(const at::Tensor& x, const at::Tensor& lora_A);

// a b^T in float32 for a bfloat16 `a` and a float32 `b` (CUDA): one tensor-core GEMM of a against
// b's three exact bfloat16 parts, so every product is exact and only the accumulation rounds.
at::Tensor mm_nt_exact(const at::Tensor& a, const at::Tensor& b);

// Whether the GEMMs of float32 adapters on these 2-D activations run on tensor cores through exact
// bfloat16 parts (bfloat16 on CUDA, from fp32_parts_min_tokens tokens) or as float32 GEMMs.
bool fp32_adapters_use_parts(const at::Tensor& x2d);

// The adapter's forward GEMMs on 2-D x_lora (the 16-bit activations, or PEFT's float32 dropout of
// them): {lora = (x A^T) B^T [T, d_out], h = x A^T [T, r]}, both float32; `parts` from
// fp32_adapters_use_parts of the layer's activations.
std::pair<at::Tensor, at::Tensor> lora_fp32_adapters(const at::Tensor& x_lora2d, const at::Tensor& lora_A,
                                                     const at::Tensor& lora_B, bool parts);

// The forward's GEMMs on 2-D x: {base = x W^T rounded to x's dtype (PEFT's base layer output),
// lora = (x A^T) B^T [T, d_out] and h = x A^T [T, r], both float32}.
std::tuple<at::Tensor, at::Tensor, at::Tensor> gemms_fp32_adapters(const at::Tensor& x2d, const at::Tensor& weight,
                                                                   const at::Tensor& lora_A, const at::Tensor& lora_B);

// The forward's compose in ATen ops (CUDA: the dora_fp32_compose_kernel does the same in one pass):
// z = base + s lora and y = g z + bias in float32, y rounded once to base's dtype, as PEFT composes
// them; {y, z rounded to base's dtype when `need_z` (the magnitude gradient), else undefined}.
std::pair<at::Tensor, at::Tensor> compose_fp32_adapters(const at::Tensor& base, const at::Tensor& lora,
                                                        const at::Tensor& g, const std::optional<at::Tensor>& bias,
                                                        double scale, bool need_z);

// The adapter's backward GEMMs from the output gradient gy [T, d_out] (16-bit, exact) and g = m / n:
// {gh = s (g gy) B [T, r], grad_A = gh^T x_lora [r, d_in], grad_B = s (g gy)^T h [d_out, r]}, float32,
// each undefined unless needed (gh when need_gh or need_A).
std::tuple<at::Tensor, at::Tensor, at::Tensor> lora_backward_fp32_adapters(
    const at::Tensor& gy, const at::Tensor& g, const at::Tensor& x_lora2d, const at::Tensor& lora_A,
    const at::Tensor& lora_B, const at::Tensor& h, double scale, bool parts, bool need_gh, bool need_A, bool need_B);

// The backward GEMMs from the output gradient gy [T, d_out] (x's dtype), gz = gy * g rounded
// to x's dtype (the base GEMM's gradient, as PEFT's base layer receives it) and g = m / n
// (float32): grad_x [T, d_in] in x's dtype, grad_A and grad_B in float32 (undefined unless needed).
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_gemms_fp32_adapters(
    const at::Tensor& gy, const at::Tensor& gz, const at::Tensor& g, const at::Tensor& x2d, const at::Tensor& weight,
    const at::Tensor& lora_A, const at::Tensor& lora_B, const at::Tensor& h, double scale, bool need_x, bool need_A,
    bool need_B);

}  // namespace dora_ext
