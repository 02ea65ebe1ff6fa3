#include "linear_backward.h"

#include "capture.h"
#include "checks.h"
#include "eager.h"
#include "magnitude_grad.h"
#include "norm_cache.h"

#include <ATen/ATen.h>

#include <optional>

namespace dora_ext {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> dora_linear_backward_body(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& lora_A, const at::Tensor& lora_B, const at::Tensor& magnitude, const at::Tensor& norm,
    const at::Tensor& z, const at::Tensor& out, const at::Tensor& h, double scale, std::array<bool, 5> mask,
    bool fused) {
  const auto [need_x, need_A, need_B, need_m, need_bias] = mask;
  const at::Tensor gy = as_rows(grad_out), x2d = as_rows(x);
  const at::Tensor g = cached_magnitude_scale(weight, magnitude, norm);
  at::Tensor gz, grad_m;
  std::optional<OutputPrologue> from_output;
  if (z.defined()) {
    std::tie(gz, grad_m) = grad_prologue(gy, as_rows(z), g, norm, fused);
  } else if (out.defined() && !stream_capturing(gy)) {
    from_output = grad_prologue_from_output(gy, as_rows(out), g, norm, bias, fused);
    gz = from_output->gz;
  } else {
    std::tie(gz, grad_m) = grad_prologue(gy, recompute_z(x2d, weight, lora_B, h, scale, {}), g, norm, fused);
  }
  auto [grad_x, grad_A, grad_B] =
      backward_gemms(gy, gz, g, x2d, weight, lora_A, lora_B, h, scale, need_x, need_A, need_B);
  if (from_output) {
    if (need_m) recompute_unrecovered(*from_output, gy, x2d, weight, lora_B, h, scale, norm);
    grad_m = from_output->grad_m;
  }
  at::Tensor grad_bias;
  if (need_bias) grad_bias = gy.sum(0, false, accumulate_type(gy.scalar_type())).to(gy.scalar_type());
  return {need_x ? grad_x.view(x.sizes()) : no_grad_placeholder(x), need_A ? grad_A : no_grad_placeholder(x),
          need_B ? grad_B : no_grad_placeholder(x),
          need_m ? grad_m.to(magnitude.scalar_type()) : no_grad_placeholder(magnitude),
          need_bias ? grad_bias : no_grad_placeholder(x)};
}

}  // namespace dora_ext
