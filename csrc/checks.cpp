#include "checks.h"

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <utility>

namespace dora_ext {
namespace {

void check_float(const char* op, const char* name, const at::Tensor& t) {
  const auto dt = t.scalar_type();
  TORCH_CHECK(dt == at::kHalf || dt == at::kBFloat16 || dt == at::kFloat || dt == at::kDouble, op, ": ", name,
              " must be float16, bfloat16, float32 or float64, got ", dt);
}

void check_same_device(const char* op, const char* name, const at::Tensor& t, const at::Tensor& ref,
                       const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " is on ", t.device(), " but ", ref_name, " is on ",
              ref.device(), "; all tensors must be on one device");
}

void check_same_dtype(const char* op, const char* name, const at::Tensor& t, const at::Tensor& ref,
                      const char* ref_name) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": ", name, " has dtype ", t.scalar_type(), " but ", ref_name,
              " has dtype ", ref.scalar_type(),
              "; they must match (except the magnitude, any float dtype, and lora_A/lora_B, which may both be "
              "float32 with float16/bfloat16 x and weight)");
}

void check_dim(const char* op, const char* name, const at::Tensor& t, int64_t dim, const char* shape) {
  TORCH_CHECK(t.dim() == dim, op, ": ", name, " must be ", dim, "-D ", shape, ", got shape ", t.sizes());
}

// A layer with no inputs or no outputs has no row norm to speak of (and its backward could not
// reshape [T, 0] activations): rejected here, by name.
void check_weight_shape(const char* op, const at::Tensor& weight) {
  TORCH_CHECK(weight.size(0) >= 1 && weight.size(1) >= 1, op,
              ": weight must be [d_out, d_in] with d_out >= 1 and d_in >= 1, got shape ", weight.sizes());
}

// x [..., d_in] and weight [d_out, d_in]: dimensions, dtypes, device (not yet d_in: the adapters'
// shapes are named first).
void check_x_and_weight(const char* op, const at::Tensor& x, const at::Tensor& weight) {
  TORCH_CHECK(x.dim() >= 1, op, ": x must have at least 1 dimension [..., d_in], got a 0-D tensor");
  check_float(op, "x", x);
  TORCH_CHECK(weight.dim() == 2, op, ": weight must be 2-D [d_out, d_in], got shape ", weight.sizes());
  check_same_dtype(op, "weight", weight, x, "x");
  check_same_device(op, "weight", weight, x, "x");
}

void check_x_width(const char* op, const at::Tensor& x, const at::Tensor& weight) {
  TORCH_CHECK(x.size(-1) == weight.size(1), op, ": x has last dimension ", x.size(-1), " but weight is ",
              weight.sizes(), " (expects d_in = ", weight.size(1), ")");
}

void check_magnitude(const char* op, const at::Tensor& magnitude, const at::Tensor& x, const at::Tensor& weight) {
  check_dim(op, "magnitude", magnitude, 1, "[d_out]");
  check_float(op, "magnitude", magnitude);
  check_same_device(op, "magnitude", magnitude, x, "x");
  TORCH_CHECK(magnitude.size(0) == weight.size(0), op, ": magnitude must be [d_out] = [", weight.size(0), "], got ",
              magnitude.sizes());
}

void check_bias(const char* op, const std::optional<at::Tensor>& bias, const at::Tensor& x, const at::Tensor& weight) {
  if (!bias.has_value() || !bias->defined()) return;
  check_dim(op, "bias", *bias, 1, "[d_out]");
  check_same_dtype(op, "bias", *bias, x, "x");
  check_same_device(op, "bias", *bias, x, "x");
  TORCH_CHECK(bias->size(0) == weight.size(0), op, ": bias must be [d_out] = [", weight.size(0), "], got ",
              bias->sizes());
}

// The smallest and largest entry of a non-empty integer index. A CPU index (PEFT's) is read in place:
// two ATen reductions and their .item() cost microseconds per layer call at decode sizes; an index on
// the GPU is read back (a synchronisation).
std::pair<int64_t, int64_t> index_range(const at::Tensor& index) {
  if (!index.is_cpu()) return {index.min().item<int64_t>(), index.max().item<int64_t>()};
  const at::Tensor contiguous = index.to(at::kLong).contiguous();
  const int64_t* data = contiguous.const_data_ptr<int64_t>();
  const auto [low, high] = std::minmax_element(data, data + contiguous.numel());
  return {*low, *high};
}

}  // namespace

at::ScalarType accumulate_type(at::ScalarType dtype) {
  return dtype == at::kDouble ? at::kDouble : at::kFloat;
}

void check_row_norm_args(const char* op, const at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B) {
  check_dim(op, "weight", weight, 2, "[d_out, d_in]");
  check_dim(op, "lora_A", lora_A, 2, "[r, d_in]");
  check_dim(op, "lora_B", lora_B, 2, "[d_out, r]");
  check_float(op, "weight", weight);
  if (is_16bit_float(weight.scalar_type()) && lora_A.scalar_type() == at::kFloat) {
    check_same_dtype(op, "lora_B", lora_B, lora_A, "lora_A");
  } else {
    check_same_dtype(op, "lora_A", lora_A, weight, "weight");
    check_same_dtype(op, "lora_B", lora_B, weight, "weight");
  }
  check_same_device(op, "lora_A", lora_A, weight, "weight");
  check_same_device(op, "lora_B", lora_B, weight, "weight");
  check_weight_shape(op, weight);
  const int64_t d_out = weight.size(0), d_in = weight.size(1), r = lora_A.size(0);
  TORCH_CHECK(r >= 1, op, ": lora_A has rank 0 (shape ", lora_A.sizes(), "); DoRA needs r >= 1");
  TORCH_CHECK(lora_A.size(1) == d_in, op, ": lora_A must be [r, d_in] = [", r, ", ", d_in, "] (weight is ",
              weight.sizes(), "), got ", lora_A.sizes());
  TORCH_CHECK(lora_B.size(0) == d_out && lora_B.size(1) == r, op, ": lora_B must be [d_out, r] = [", d_out, ", ", r,
              "] (weight is ", weight.sizes(), ", lora_A is ", lora_A.sizes(), "), got ", lora_B.sizes());
}

void check_dora_linear_args(const char* op, const at::Tensor& x, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, const at::Tensor& lora_A, const at::Tensor& lora_B,
                            const at::Tensor& magnitude) {
  check_x_and_weight(op, x, weight);
  check_row_norm_args(op, weight, lora_A, lora_B);
  check_x_width(op, x, weight);
  check_magnitude(op, magnitude, x, weight);
  check_bias(op, bias, x, weight);
}

void check_dora_linear_dropout_args(const char* op, const at::Tensor& x, const at::Tensor& x_dropped,
                                    const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                    const at::Tensor& lora_A, const at::Tensor& lora_B, const at::Tensor& magnitude) {
  check_dora_linear_args(op, x, weight, bias, lora_A, lora_B, magnitude);
  TORCH_CHECK(x_dropped.sizes() == x.sizes(), op, ": x_dropped must have the shape of x ", x.sizes(), ", got ",
              x_dropped.sizes());
  check_same_device(op, "x_dropped", x_dropped, x, "x");
  const at::ScalarType dt = x_dropped.scalar_type();
  TORCH_CHECK(dt == x.scalar_type() || dt == lora_A.scalar_type(), op, ": x_dropped must have the dtype of x (",
              x.scalar_type(), ") or of lora_A (", lora_A.scalar_type(),
              ", PEFT's dropout of the input cast to the "
              "adapter dtype), got ",
              dt);
}

void check_dora_linear_mixed_args(const char* op, const at::Tensor& x, const at::Tensor& weight,
                                  const std::optional<at::Tensor>& bias, at::TensorList lora_A, at::TensorList lora_B,
                                  const c10::List<std::optional<at::Tensor>>& magnitude, at::ArrayRef<double> scale,
                                  const at::Tensor& adapter_index) {
  TORCH_CHECK(x.dim() >= 2, op, ": x must be [rows, ..., d_in] (one adapter per row), got shape ", x.sizes());
  const size_t adapters = lora_A.size();
  TORCH_CHECK(lora_B.size() == adapters && magnitude.size() == adapters && scale.size() == adapters, op,
              ": lora_A, lora_B, magnitude and scale must list the same adapters, got ", adapters, ", ", lora_B.size(),
              ", ", magnitude.size(), " and ", scale.size(), " entries");
  check_x_and_weight(op, x, weight);
  for (size_t k = 0; k < adapters; ++k) {
    char where[160];  // no heap allocation: this runs per adapter and decoded token
    std::snprintf(where, sizeof(where), "%s (adapter %zu)", op, k);
    check_row_norm_args(where, weight, lora_A[k], lora_B[k]);
    const std::optional<at::Tensor> m = magnitude.get(k);
    if (m.has_value() && m->defined()) check_magnitude(where, *m, x, weight);  // none: plain LoRA
  }
  check_weight_shape(op, weight);
  check_x_width(op, x, weight);
  check_bias(op, bias, x, weight);
  TORCH_CHECK(adapter_index.dim() == 1 && adapter_index.size(0) == x.size(0), op, ": adapter_index must be [rows] = [",
              x.size(0), "] (one adapter per leading row of x), got shape ", adapter_index.sizes());
  TORCH_CHECK(adapter_index.scalar_type() == at::kLong || adapter_index.scalar_type() == at::kInt, op,
              ": adapter_index must be int64 or int32, got ", adapter_index.scalar_type());
  TORCH_CHECK(adapter_index.device().is_cpu() || adapter_index.device() == x.device(), op, ": adapter_index is on ",
              adapter_index.device(), "; it must be on the CPU or on x's device ", x.device());
  if (adapter_index.numel() > 0) {
    const auto [low, high] = index_range(adapter_index);
    TORCH_CHECK(low >= -1 && high < static_cast<int64_t>(adapters), op, ": adapter_index holds ", low < -1 ? low : high,
                ", but there are ", adapters, " adapters (valid: -1 for the base model, 0 .. number of adapters - 1)");
  }
}

void check_compose_delta_args(const char* op, const at::Tensor& base, const at::Tensor& lora,
                              const at::Tensor& magnitude, const at::Tensor& norm) {
  TORCH_CHECK(base.dim() >= 1, op, ": base must have at least 1 dimension [..., d_out], got a 0-D tensor");
  check_float(op, "base", base);
  // base may be float16/bfloat16 with a float32 lora (PEFT's default adapters: the
  // base layer's output stays 16-bit); otherwise one dtype
  if (!(is_16bit_float(base.scalar_type()) && lora.scalar_type() == at::kFloat)) {
    check_same_dtype(op, "lora", lora, base, "base");
  }
  check_same_device(op, "lora", lora, base, "base");
  TORCH_CHECK(lora.sizes() == base.sizes(), op, ": lora must have the shape of base ", base.sizes(), ", got ",
              lora.sizes());
  const int64_t d_out = base.size(-1);
  TORCH_CHECK(d_out >= 1, op, ": base must be [..., d_out] with d_out >= 1, got shape ", base.sizes());
  check_dim(op, "magnitude", magnitude, 1, "[d_out]");
  check_float(op, "magnitude", magnitude);
  check_same_device(op, "magnitude", magnitude, base, "base");
  TORCH_CHECK(magnitude.size(0) == d_out, op, ": magnitude must be [d_out] = [", d_out, "], got ", magnitude.sizes());
  check_dim(op, "norm", norm, 1, "[d_out]");
  check_same_device(op, "norm", norm, base, "base");
  TORCH_CHECK(norm.scalar_type() == accumulate_type(base.scalar_type()), op, ": norm must be ",
              accumulate_type(base.scalar_type()), " (as row_norm returns for ", base.scalar_type(), " inputs), got ",
              norm.scalar_type());
  TORCH_CHECK(norm.size(0) == d_out, op, ": norm must be [d_out] = [", d_out, "], got ", norm.sizes());
}

void check_saved(const char* op, const char* name, const at::Tensor& saved, at::IntArrayRef sizes,
                 const at::Tensor& x) {
  TORCH_CHECK(saved.sizes() == sizes, op, ": ", name, " must have shape ", sizes, ", got ", saved.sizes());
  TORCH_CHECK(saved.scalar_type() == x.scalar_type(), op, ": ", name, " must have x's dtype ", x.scalar_type(),
              ", got ", saved.scalar_type());
  TORCH_CHECK(saved.device() == x.device(), op, ": ", name, " must be on x's device ", x.device(), ", got ",
              saved.device());
}

void check_grad_out(const char* op, const at::Tensor& grad_out, at::IntArrayRef sizes, at::ScalarType dtype,
                    const at::Device& device) {
  TORCH_CHECK(grad_out.sizes() == sizes, op, ": grad_out must have the output's shape ", sizes, ", got ",
              grad_out.sizes());
  TORCH_CHECK(grad_out.scalar_type() == dtype, op, ": grad_out must have the output's dtype ", dtype, ", got ",
              grad_out.scalar_type());
  TORCH_CHECK(grad_out.device() == device, op, ": grad_out must be on the output's device ", device, ", got ",
              grad_out.device());
}

}  // namespace dora_ext
