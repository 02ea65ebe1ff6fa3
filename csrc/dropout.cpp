#include "dropout.h"

#include "checks.h"
#include "eager.h"
#include "fp32_adapters.h"
#include "magnitude_grad.h"
#include "tiered.h"

#include <ATen/ATen.h>

namespace dora_ext {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dora_linear_dropout_forward_body(
    const at::Tensor& x, const at::Tensor& x_dropped, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& lora_A, const at::Tensor& lora_B, const at::Tensor& magnitude, double scale, NormUse use,
    bool fused, bool keep_z) {
  const at::Tensor x2d = as_rows(x), xd2d = as_rows(x_dropped);
  const int64_t tokens = x2d.size(0);
  const at::Tensor norm = row_norm_cached_on(fused, weight, lora_A, lora_B, scale, use);
  // Both base GEMMs in one, over [x; x_d]: x_d in x's dtype (PEFT's float32 dropout of a 16-bit x
  // rounds back to x's dtype here: the term is (g - 1)-scaled, below the output's own rounding).
  const at::Tensor both = at::mm(at::cat({x2d, xd2d.to(x.scalar_type())}), weight.t());
  const at::Tensor base = both.narrow(0, 0, tokens), base_dropped = both.narrow(0, tokens, tokens);
  at::Tensor lora, h;
  if (has_fp32_adapters(x, lora_A)) {
    std::tie(lora, h) = lora_fp32_adapters(xd2d, lora_A, lora_B, fp32_adapters_use_parts(x2d));
  } else {
    h = at::mm(xd2d, lora_A.t());
    lora = at::mm(h, lora_B.t());
  }
  // y = x W^T + bias + delta, summed in delta's dtype (float32 for float32 adapters) and rounded once.
  at::Tensor out = compose_delta_on(fused, base_dropped, lora, magnitude, norm, scale).add_(base);
  if (bias.has_value() && bias->defined()) out.add_(*bias);
  const at::Tensor z_dropped = keep_z ? at::add(base_dropped, lora, scale).to(x.scalar_type()) : at::Tensor();
  return {out.to(x.scalar_type()).view(output_shape(x, weight.size(0))), z_dropped, h, norm};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> dora_linear_dropout_backward_body(
    const at::Tensor& grad_out, const at::Tensor& x_dropped, const at::Tensor& weight, const at::Tensor& lora_A,
    const at::Tensor& lora_B, const at::Tensor& magnitude, const at::Tensor& norm, const at::Tensor& z_dropped,
    const at::Tensor& h, double scale, std::array<bool, 6> mask, bool fused) {
  const auto [need_x, need_xd, need_A, need_B, need_m, need_bias] = mask;
  const at::Tensor gy = as_rows(grad_out), xd2d = as_rows(x_dropped);
  const int64_t tokens = gy.size(0);
  const bool fp32_adapters = has_fp32_adapters(gy, lora_A);
  const at::Tensor g = magnitude_scale(magnitude, norm).contiguous();
  // gz = g gy (the lora product's gradient over s, 16-bit adapters) and the magnitude gradient in one pass.
  at::Tensor gz, grad_m;
  if (!fp32_adapters || need_m) {
    // z_d as the forward made it: x_d in the weight's dtype meets W (the one GEMM over [x; x_d])
    const at::Tensor z = z_dropped.defined()
                             ? as_rows(z_dropped)
                             : recompute_z(xd2d.to(weight.scalar_type()), weight, lora_B, h, scale, at::Tensor());
    std::tie(gz, grad_m) = grad_prologue(gy, z, g, norm, fused);
  }

  // The base GEMMs' gradients in one GEMM, over [gy; (g - 1) gy] ((g - 1) directly: exact near g = 1).
  at::Tensor grad_x, grad_xd;
  const at::Tensor grad_base_dropped =
      need_xd ? (gy * magnitude_scale_minus_one(magnitude, norm)).to(gy.scalar_type()) : at::Tensor();
  if (need_x && need_xd) {
    const at::Tensor both = at::mm(at::cat({gy, grad_base_dropped}), weight);
    grad_x = both.narrow(0, 0, tokens);
    grad_xd = both.narrow(0, tokens, tokens);
  } else if (need_x) {
    grad_x = at::mm(gy, weight);
  } else if (need_xd) {
    grad_xd = at::mm(grad_base_dropped, weight);
  }

  // The adapter's gradients from gh = s (g gy) B [T, r].
  at::Tensor gh, grad_A, grad_B;
  if (fp32_adapters) {
    std::tie(gh, grad_A, grad_B) = lora_backward_fp32_adapters(gy, g, xd2d, lora_A, lora_B, h, scale,
                                                               fp32_adapters_use_parts(gy), need_xd, need_A, need_B);
  } else {
    if (need_xd || need_A) gh = at::mm(gz, lora_B).mul_(scale);
    if (need_A) grad_A = at::mm(gh.t(), xd2d);
    if (need_B) grad_B = at::mm(gz.t(), h).mul_(scale);
  }
  if (need_xd) grad_xd = at::mm(gh, lora_A).add_(grad_xd).to(x_dropped.scalar_type());
  at::Tensor grad_bias;
  if (need_bias) grad_bias = gy.sum(0, false, accumulate_type(gy.scalar_type())).to(gy.scalar_type());
  return {need_x ? grad_x.view(x_dropped.sizes()) : no_grad_placeholder(x_dropped),
          need_xd ? grad_xd.view(x_dropped.sizes()) : no_grad_placeholder(x_dropped),
          need_A ? grad_A : no_grad_placeholder(x_dropped),
          need_B ? grad_B : no_grad_placeholder(x_dropped),
          need_m ? grad_m.to(magnitude.scalar_type()) : no_grad_placeholder(magnitude),
          need_bias ? grad_bias : no_grad_placeholder(x_dropped)};
}

}  // namespace dora_ext
