#pragma once
// Public C++ API of dora_ext: the DoRA ops callable directly from LibTorch
// programs. Each function goes through the PyTorch dispatcher, so it gets the
// same device dispatch, fused kernels and autograd as torch.ops.dora_ext.*.
//
// DoRA: y = m * (W + s B A) / ||W + s B A||_row applied to x, plus bias.
#include <ATen/core/List.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <string>
#include <utility>
#include <vector>

namespace dora_ext {

// Row norms ||W_i + scale * (B A)_i|| as fp32 [d_out] (float64 for float64
// inputs), computed from the factored form without a [d_out, d_in] product.
// lora_A and lora_B have weight's dtype, or are float32 with a 16-bit weight.
at::Tensor row_norm(const at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B, double scale);

// The squared row norm before the clamp and the root, fp32 (float64 for float64), never cached.
// For column shards of W and A (each with its columns of d_in, B whole) the results add up to
// the whole weight's squared norm: sum them across the shards, then sqrt(max(sum, 1e-12)).
at::Tensor row_norm_sq(const at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B, double scale);

// y = (m / n) * (x W^T + scale (x A^T) B^T) + bias, n = row_norm(W, A, B, scale)
// detached. x is [..., d_in]; y is [..., d_out] in x's dtype. weight and bias have
// x's dtype; lora_A and lora_B too, or both float32 with a 16-bit x (their products
// then float32-accurate, as PEFT computes them: csrc/fp32_adapters.h).
at::Tensor dora_linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                       const at::Tensor& lora_A, const at::Tensor& lora_B, const at::Tensor& magnitude, double scale);

// dora_linear with LoRA dropout, as PEFT trains it: x_dropped = lora_dropout(x) (drawn by the
// caller; x's shape, and x's dtype or the adapters') feeds the adapter's terms,
// y = x W^T + bias + (g - 1) (x_dropped W^T) + g scale (x_dropped A^T) B^T. Gradients reach x,
// x_dropped, lora_A, lora_B, magnitude and bias. With x_dropped = x it equals dora_linear.
at::Tensor dora_linear_dropout(const at::Tensor& x, const at::Tensor& x_dropped, const at::Tensor& weight,
                               const std::optional<at::Tensor>& bias, const at::Tensor& lora_A,
                               const at::Tensor& lora_B, const at::Tensor& magnitude, double scale);

// Many adapters in one batch (serving): leading row i of x ([rows, ..., d_in]) uses adapter
// adapter_index[i] (-1: the base model, x W^T + bias). Adapter k is lora_A[k] [r_k, d_in],
// lora_B[k] [d_out, r_k], scale[k], and magnitude[k] [d_out] for DoRA (its norm computed once and
// cached while the adapter is unchanged) or nullopt for plain LoRA; ranks may differ. The base GEMM
// runs once for the whole batch. Inference only (no autograd).
at::Tensor dora_linear_mixed(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                             at::TensorList lora_A, at::TensorList lora_B,
                             const c10::List<std::optional<at::Tensor>>& magnitude, at::ArrayRef<double> scale,
                             const at::Tensor& adapter_index);

// One layer's adapters (lora_A[k] [r_k, d_in], lora_B[k] [d_out, r_k], one dtype and device) copied
// into one new stack and returned as views of it (lora_B[k] with a row stride of the stack's rank).
// dora_linear_mixed over views of one stack, any of them in any order, reads the adapters where they
// are: serving then holds each adapter once (otherwise the CUDA kernels keep a stacked copy of the
// adapters of each layer). Replace the adapters with the views; values are unchanged. The stack is
// made by the op dora_ext::shared_adapter_stack, which returns it whole (a custom op's outputs may not
// alias each other); this function cuts it into the views.
std::pair<std::vector<at::Tensor>, std::vector<at::Tensor>> share_adapter_storage(at::TensorList lora_A,
                                                                                  at::TensorList lora_B);

// The DoRA delta for callers that already have base = x W^T (no bias) and
// lora = (x A^T) B^T: (g - 1) * base + g * scale * lora, g = magnitude / norm.
// base and lora share a dtype, or base is 16-bit and lora float32 (delta float32).
at::Tensor compose_delta(const at::Tensor& base, const at::Tensor& lora, const at::Tensor& magnitude,
                         const at::Tensor& norm, double scale);

// The tier dora_linear would use for these inputs ("fused_training",
// "fused_inference" or "eager") and why.
std::pair<std::string, std::string> select_tier(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_A,
                                                bool training);

// The tier and reason of the last DoRA op run by the dispatcher on this thread
// (Python: dora_ext.last_tier()).
std::pair<std::string, std::string> last_tier_used();

// The build as JSON: torch and Triton versions, CUDA build or not, the archs and
// the number of AOT kernels compiled in.
std::string build_info();

}  // namespace dora_ext
