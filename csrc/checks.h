#pragma once
// Argument validation shared by every op and every backend: each failure is a
// c10::Error naming the op, the argument and the expected vs actual value.
#include <ATen/core/List.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

namespace dora_ext {

void check_dora_linear_args(const char* op, const at::Tensor& x, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, const at::Tensor& lora_A, const at::Tensor& lora_B,
                            const at::Tensor& magnitude);

// dora_linear's arguments, and x_dropped (lora_dropout(x)): x's shape and device, x's dtype or the
// adapters' (PEFT casts x to the adapter dtype before its dropout).
void check_dora_linear_dropout_args(const char* op, const at::Tensor& x, const at::Tensor& x_dropped,
                                    const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                    const at::Tensor& lora_A, const at::Tensor& lora_B, const at::Tensor& magnitude);

// Each adapter k as dora_linear's arguments (magnitude[k] None: a plain LoRA adapter); lists of one
// length; adapter_index [rows] int64/int32 in -1 .. adapters - 1 (-1: the base model).
void check_dora_linear_mixed_args(const char* op, const at::Tensor& x, const at::Tensor& weight,
                                  const std::optional<at::Tensor>& bias, at::TensorList lora_A, at::TensorList lora_B,
                                  const c10::List<std::optional<at::Tensor>>& magnitude, at::ArrayRef<double> scale,
                                  const at::Tensor& adapter_index);

// lora_A and lora_B have the weight's dtype, or are both float32 with a float16/bfloat16
// weight (PEFT keeps adapters in float32 by default).
void check_row_norm_args(const char* op, const at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B);

void check_compose_delta_args(const char* op, const at::Tensor& base, const at::Tensor& lora,
                              const at::Tensor& magnitude, const at::Tensor& norm);

// A tensor the forward saved for the backward (`name`): the given shape, x's dtype and device.
void check_saved(const char* op, const char* name, const at::Tensor& saved, at::IntArrayRef sizes, const at::Tensor& x);

// The incoming gradient of an op's output (the backward ops may also be called directly):
// the output's sizes, dtype and device, else an error naming them.
void check_grad_out(const char* op, const at::Tensor& grad_out, at::IntArrayRef sizes, at::ScalarType dtype,
                    const at::Device& device);

// float16 or bfloat16: the dtypes that may meet float32 adapters (every op).
inline bool is_16bit_float(at::ScalarType dtype) {
  return dtype == at::kHalf || dtype == at::kBFloat16;
}

// The dtype the norm and the magnitude scale are computed in: float64 for
// float64 inputs, float32 otherwise.
at::ScalarType accumulate_type(at::ScalarType dtype);

}  // namespace dora_ext
