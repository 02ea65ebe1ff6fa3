#pragma once
// Mixed-adapter batches (dora_linear_mixed): one base model, many adapters, each leading row of x
// (a sequence, or a token of 2-D x) with its own adapter. The base GEMM runs once for the whole
// batch; each adapter's rows (views where they are consecutive, gathered otherwise) get their LoRA
// product and are composed in place as dora_linear composes them (DoRA: that adapter's cached norm;
// plain LoRA: base + s * lora). Rows with adapter index -1 get the base output. The host never waits
// for the GPU. Inference only. On the fused tier the stacked-adapter kernels run instead where they
// serve the call (mixed_stacked.h): launches that do not grow with the number of adapters.
#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <vector>

namespace dora_ext {

// The arguments are validated by the caller (check_dora_linear_mixed_args); `fused` picks the fused
// norm and compose passes (CUDA builds; the caller's tier decision).
at::Tensor dora_linear_mixed_body(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                  at::TensorList lora_A, at::TensorList lora_B,
                                  const c10::List<std::optional<at::Tensor>>& magnitude, at::ArrayRef<double> scale,
                                  const at::Tensor& adapter_index, bool fused);

}  // namespace dora_ext
