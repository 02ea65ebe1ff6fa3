// The one implementation of each op, registered for CPU and CUDA alike:
// validate the arguments, run the preamble (OpScope: device, tier, record),
// then the fused body (fused.h, CUDA builds) or the eager one (eager.h).
// Validation happens here only: the bodies trust their arguments.
#include "checks.h"
#include "dropout.h"
#include "eager.h"
#include "linear_backward.h"
#include "mixed.h"
#include "norm_cache.h"
#include "op_scope.h"
#include "options.h"
#include "tiered.h"

#ifdef DORA_EXT_WITH_CUDA
#include "fused.h"
#include "mixed_stacked.h"
#endif

#include <ATen/ops/empty.h>
#include <torch/library.h>

namespace dora_ext {
namespace {

// The public op: a copy of the cached norm, which the caller may write to. The tier rules
// apply with the weight's rows in the place of tokens. A CPU weight has one path and never
// fails a forced tier (callers compute norms of CPU copies while a CUDA tier is forced).
at::Tensor row_norm_impl(const at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B, double scale) {
  check_row_norm_args("row_norm", weight, lora_A, lora_B);
  OpScope scope(weight, weight.size(0), /*training=*/false, /*honor_forced_tier=*/!weight.is_cpu());
  const NormUse use = row_norm_use(lora_A, lora_B);
  return row_norm_cached_on(scope.fused(), weight, lora_A, lora_B, scale, use).clone();
}

// The unclamped squared norm of (possibly column-sharded) factors, never cached: the factored ATen
// path on every device (one [d_out] vector per shard for a distributed caller to sum).
at::Tensor row_norm_sq_impl(const at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B,
                            double scale) {
  check_row_norm_args("row_norm_sq", weight, lora_A, lora_B);
  OpScope scope(weight, weight.size(0), /*training=*/false, /*honor_forced_tier=*/false);
  if (scope.fused()) scope.fall_back("row_norm_sq runs the factored ATen path on every device");
  return row_norm_sq_eager(weight, lora_A, lora_B, scale, at::Tensor(), nullptr);
}

at::Tensor dora_linear_impl(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                            const at::Tensor& lora_A, const at::Tensor& lora_B, const at::Tensor& magnitude,
                            double scale) {
  check_dora_linear_args("dora_linear", x, weight, bias, lora_A, lora_B, magnitude);
  OpScope scope(x, weight.size(0), /*training=*/false);
#ifdef DORA_EXT_WITH_CUDA
  if (scope.fused()) return dora_linear_fused(x, weight, bias, lora_A, lora_B, magnitude, scale, scope);
#endif
  return dora_linear_eager(x, weight, bias, lora_A, lora_B, magnitude, scale);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dora_linear_forward_impl(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias, const at::Tensor& lora_A,
    const at::Tensor& lora_B, const at::Tensor& magnitude, double scale, bool keep_z) {
  check_dora_linear_args("dora_linear", x, weight, bias, lora_A, lora_B, magnitude);
  OpScope scope(x, weight.size(0), /*training=*/true);
  at::Tensor out, z, h, norm;
#ifdef DORA_EXT_WITH_CUDA
  if (scope.fused()) {
    std::tie(out, z, h, norm) = dora_linear_forward_fused(x, weight, bias, lora_A, lora_B, magnitude, scale, keep_z);
  }
#endif
  if (!out.defined()) {
    std::tie(out, z, h, norm) = dora_linear_forward_eager(x, weight, bias, lora_A, lora_B, magnitude, scale, keep_z);
  }
  // z not kept: an empty tensor (the schema returns a Tensor)
  return {out, keep_z ? z : at::empty({0}, out.options()), h, norm};
}

// `z` when the forward kept it, else `out` when given: the magnitude gradient's source
// (magnitude_grad.h); with neither, z is recomputed from x.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> dora_linear_backward_impl(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& lora_A, const at::Tensor& lora_B, const at::Tensor& magnitude, const at::Tensor& norm,
    const std::optional<at::Tensor>& z, const std::optional<at::Tensor>& out, const at::Tensor& h, double scale,
    std::array<bool, 5> mask) {
  check_dora_linear_args("dora_linear_backward", x, weight, bias, lora_A, lora_B, magnitude);
  const std::vector<int64_t> y_shape = output_shape(x, weight.size(0));
  check_grad_out("dora_linear_backward", grad_out, y_shape, x.scalar_type(), x.device());
  const at::Tensor saved_z = z.has_value() ? *z : at::Tensor();
  const at::Tensor saved_out = out.has_value() ? *out : at::Tensor();
  if (saved_z.defined()) check_saved("dora_linear_backward", "z", saved_z, {x.numel() / x.size(-1), weight.size(0)}, x);
  if (saved_out.defined()) check_saved("dora_linear_backward", "out", saved_out, y_shape, x);
  OpScope scope(grad_out, weight.size(0), /*training=*/true);
  norm_used_by_backward(norm);
  return dora_linear_backward_body(grad_out, x, weight, bias, lora_A, lora_B, magnitude, norm, saved_z, saved_out, h,
                                   scale, mask, scope.fused());
}

at::Tensor dora_linear_dropout_impl(const at::Tensor& x, const at::Tensor& x_dropped, const at::Tensor& weight,
                                    const std::optional<at::Tensor>& bias, const at::Tensor& lora_A,
                                    const at::Tensor& lora_B, const at::Tensor& magnitude, double scale) {
  check_dora_linear_dropout_args("dora_linear_dropout", x, x_dropped, weight, bias, lora_A, lora_B, magnitude);
  OpScope scope(x, weight.size(0), /*training=*/false);
  return std::get<0>(dora_linear_dropout_forward_body(x, x_dropped, weight, bias, lora_A, lora_B, magnitude, scale,
                                                      NormUse::Inference, scope.fused(), /*keep_z=*/false));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dora_linear_dropout_forward_impl(
    const at::Tensor& x, const at::Tensor& x_dropped, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& lora_A, const at::Tensor& lora_B, const at::Tensor& magnitude, double scale, bool keep_z) {
  check_dora_linear_dropout_args("dora_linear_dropout", x, x_dropped, weight, bias, lora_A, lora_B, magnitude);
  OpScope scope(x, weight.size(0), /*training=*/true);
  auto [out, z_dropped, h, norm] = dora_linear_dropout_forward_body(
      x, x_dropped, weight, bias, lora_A, lora_B, magnitude, scale, NormUse::Recording, scope.fused(), keep_z);
  return {out, keep_z ? z_dropped : at::empty({0}, out.options()), h, norm};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> dora_linear_dropout_backward_impl(
    const at::Tensor& grad_out, const at::Tensor& x_dropped, const at::Tensor& weight, const at::Tensor& lora_A,
    const at::Tensor& lora_B, const at::Tensor& magnitude, const at::Tensor& norm,
    const std::optional<at::Tensor>& z_dropped, const at::Tensor& h, double scale, std::array<bool, 6> mask) {
  // x (not saved) has x_dropped's shape and the weight's dtype: a stand-in of that shape, no memory.
  const at::Tensor x_like = at::empty({}, x_dropped.options().dtype(weight.scalar_type())).expand(x_dropped.sizes());
  check_dora_linear_dropout_args("dora_linear_dropout_backward", x_like, x_dropped, weight, std::nullopt, lora_A,
                                 lora_B, magnitude);
  check_grad_out("dora_linear_dropout_backward", grad_out, output_shape(x_dropped, weight.size(0)),
                 weight.scalar_type(), x_dropped.device());
  const at::Tensor saved_z = z_dropped.has_value() ? *z_dropped : at::Tensor();
  if (saved_z.defined()) {
    check_saved("dora_linear_dropout_backward", "z_dropped", saved_z,
                {x_dropped.numel() / x_dropped.size(-1), weight.size(0)}, x_like);
  }
  OpScope scope(grad_out, weight.size(0), /*training=*/true);
  norm_used_by_backward(norm);
  return dora_linear_dropout_backward_body(grad_out, x_dropped, weight, lora_A, lora_B, magnitude, norm, saved_z, h,
                                           scale, mask, scope.fused());
}

at::Tensor dora_linear_mixed_impl(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                  at::TensorList lora_A, at::TensorList lora_B,
                                  const c10::List<std::optional<at::Tensor>>& magnitude, at::ArrayRef<double> scale,
                                  const at::Tensor& adapter_index) {
  check_dora_linear_mixed_args("dora_linear_mixed", x, weight, bias, lora_A, lora_B, magnitude, scale, adapter_index);
  OpScope scope(x, weight.size(0), /*training=*/false);
#ifdef DORA_EXT_WITH_CUDA
  if (scope.fused() && mixed_stacked_serves(x, weight, lora_A)) {
    const int64_t max_decode_tokens = current_options().decode_max_tokens;
    if (x.numel() / x.size(-1) <= max_decode_tokens) {
      scope.note("mixed decode kernel (tokens <= " + std::to_string(max_decode_tokens) + ")");
      return mixed_decode_forward(x, weight, bias, lora_A, lora_B, magnitude, scale, adapter_index);
    }
    if (mixed_lora_serves(weight, lora_A)) {
      scope.note("mixed LoRA kernel on the base output (tokens > " + std::to_string(max_decode_tokens) + ")");
      return mixed_lora_forward(x, weight, bias, lora_A, lora_B, magnitude, scale, adapter_index);
    }
  }
#endif
  return dora_linear_mixed_body(x, weight, bias, lora_A, lora_B, magnitude, scale, adapter_index, scope.fused());
}

at::Tensor compose_delta_impl(const at::Tensor& base, const at::Tensor& lora, const at::Tensor& magnitude,
                              const at::Tensor& norm, double scale) {
  check_compose_delta_args("compose_delta", base, lora, magnitude, norm);
  OpScope scope(base, base.size(-1), /*training=*/false);
  return compose_delta_on(scope.fused(), base, lora, magnitude, norm, scale);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> compose_delta_backward_impl(
    const at::Tensor& grad_out, const at::Tensor& base, const at::Tensor& lora, const at::Tensor& magnitude,
    const at::Tensor& norm, double scale, std::array<bool, 3> mask) {
  check_compose_delta_args("compose_delta_backward", base, lora, magnitude, norm);
  check_grad_out("compose_delta_backward", grad_out, base.sizes(), lora.scalar_type(), base.device());
  OpScope scope(grad_out, base.size(-1), /*training=*/true);
  norm_used_by_backward(norm);
  // One pass computes the lora and the magnitude gradients together (both are trained in
  // practice, the base gradient when the layer input needs one); other masks run the eager ops.
  if (scope.fused() && !(mask[1] && mask[2])) {
    scope.fall_back("compose_delta backward needs both the lora and the magnitude gradient to fuse");
  }
#ifdef DORA_EXT_WITH_CUDA
  if (scope.fused()) return compose_delta_backward_fused(grad_out, base, lora, magnitude, norm, scale, mask);
#endif
  return compose_delta_backward_eager(grad_out, base, lora, magnitude, norm, scale, mask);
}

// The same implementations for both backends.
void register_impls(torch::Library& m) {
  m.impl("row_norm", &row_norm_impl);
  m.impl("row_norm_sq", &row_norm_sq_impl);
  m.impl("dora_linear", &dora_linear_impl);
  m.impl("dora_linear_forward", &dora_linear_forward_impl);
  m.impl("dora_linear_backward", &dora_linear_backward_impl);
  m.impl("dora_linear_dropout", &dora_linear_dropout_impl);
  m.impl("dora_linear_dropout_forward", &dora_linear_dropout_forward_impl);
  m.impl("dora_linear_dropout_backward", &dora_linear_dropout_backward_impl);
  m.impl("dora_linear_mixed", &dora_linear_mixed_impl);
  m.impl("compose_delta", &compose_delta_impl);
  m.impl("compose_delta_backward", &compose_delta_backward_impl);
}

}  // namespace

TORCH_LIBRARY_IMPL(dora_ext, CPU, m) {
  register_impls(m);
}

// A CPU-only build serves CUDA tensors too, on the eager path (the dispatcher finds no kernels).
TORCH_LIBRARY_IMPL(dora_ext, CUDA, m) {
  register_impls(m);
}

}  // namespace dora_ext
