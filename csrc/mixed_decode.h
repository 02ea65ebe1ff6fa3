#pragma once
// dora_linear_mixed at decode sizes on CUDA: every row with its own adapter in one pass over W
// (triton_src/decode.py's dora_mixed_decode_kernel), where the per-adapter path (mixed.h) runs about
// ten launches per adapter. h = x A_cat^T for the stacked adapters (adapter_stack.h) comes from one
// cuBLAS GEMM; the kernel gives each row its own adapter's columns, scale and g.
#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

namespace dora_ext {

// Whether the kernel serves these validated inputs: 16-bit x, 1 .. max_tokens tokens, at least one
// adapter, every adapter's factors of one dtype (x's, or float32: PEFT's default adapters) and W with
// unit stride along d_in.
bool mixed_decode_serves(const at::Tensor& x, const at::Tensor& weight, at::TensorList lora_A, int64_t max_tokens);

// dora_linear_mixed's result (mixed.h) for inputs the kernel serves.
at::Tensor mixed_decode_forward(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                at::TensorList lora_A, at::TensorList lora_B,
                                const c10::List<std::optional<at::Tensor>>& magnitude, at::ArrayRef<double> scale,
                                const at::Tensor& adapter_index);

}  // namespace dora_ext
