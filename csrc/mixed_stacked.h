#pragma once
// dora_linear_mixed on CUDA with the adapters stacked along the rank (adapter_stack.h): h = x A_cat^T
// holds every row's adapter term, and one kernel gives each row its own adapter's columns of h and
// B, its scale and its g (triton_src/decode.py). Three launches per call however many adapters (float32
// adapters above decode sizes: one GEMM more per adapter), where the per-adapter path (mixed.h) runs
// three per adapter.
//  - decode sizes (at most decode_max_tokens tokens): dora_mixed_decode_kernel computes x W^T in the
//    same single pass over W;
//  - more tokens: x W^T by cuBLAS, then dora_mixed_lora_kernel applies the adapters over it in place,
//    each tile looping over its own tokens' adapter columns only.
#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

namespace dora_ext {

// Whether the stacked kernels serve these validated inputs: 16-bit x, at least one token and one
// adapter, every adapter's factors of one dtype (x's, or float32: PEFT's default adapters) and W with
// unit stride along d_in.
bool mixed_stacked_serves(const at::Tensor& x, const at::Tensor& weight, at::TensorList lora_A);

// dora_linear_mixed's result (mixed.h) at decode sizes, for inputs mixed_stacked_serves accepts.
at::Tensor mixed_decode_forward(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                at::TensorList lora_A, at::TensorList lora_B,
                                const c10::List<std::optional<at::Tensor>>& magnitude, at::ArrayRef<double> scale,
                                const at::Tensor& adapter_index);

// Whether the many-token kernel serves inputs mixed_stacked_serves accepts: the stacked rank at most
// half of d_out (for 16-bit adapters h = x A_cat^T is one GEMM over every adapter's rank, whose
// extra products stay small next to x W^T's).
bool mixed_lora_serves(const at::Tensor& weight, at::TensorList lora_A);

// dora_linear_mixed's result (mixed.h) above decode sizes, for inputs mixed_lora_serves accepts.
at::Tensor mixed_lora_forward(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                              at::TensorList lora_A, at::TensorList lora_B,
                              const c10::List<std::optional<at::Tensor>>& magnitude, at::ArrayRef<double> scale,
                              const at::Tensor& adapter_index);

}  // namespace dora_ext
