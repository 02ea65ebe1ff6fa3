// Autograd for the public ops, in C++ so LibTorch callers get it too. The
// norm is detached (DoRA paper section 4.3): gradients flow to x, lora_A,
// lora_B, magnitude and bias; the base weight is frozen. A backward runs with
// the run-time options of its forward (autograd runs CUDA backward on its own
// thread, where the forward thread's overrides would not be seen).
#include "eager.h"
#include "options.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

namespace dora_ext {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

template <typename Signature>
c10::TypedOperatorHandle<Signature> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

at::Tensor grad_or_undefined(const at::Tensor& t, bool needed) {
  return needed ? t : at::Tensor();
}

void save_options(AutogradContext* ctx) {
  const Options o = current_options();
  ctx->saved_data["opt_tier"] = static_cast<int64_t>(o.tier);
  ctx->saved_data["opt_norm_cache"] = o.norm_cache;
  ctx->saved_data["opt_decode_max_tokens"] = o.decode_max_tokens;
  ctx->saved_data["opt_fp32_parts_min_tokens"] = o.fp32_parts_min_tokens;
  ctx->saved_data["opt_saved_activation"] = static_cast<int64_t>(o.saved_activation);
}

Options saved_options(AutogradContext* ctx) {
  Options o;
  o.tier = static_cast<TierOverride>(ctx->saved_data["opt_tier"].toInt());
  o.norm_cache = ctx->saved_data["opt_norm_cache"].toBool();
  o.decode_max_tokens = ctx->saved_data["opt_decode_max_tokens"].toInt();
  o.fp32_parts_min_tokens = ctx->saved_data["opt_fp32_parts_min_tokens"].toInt();
  o.saved_activation = static_cast<SavedActivation>(ctx->saved_data["opt_saved_activation"].toInt());
  return o;
}

class DoraLinearFunction : public torch::autograd::Function<DoraLinearFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, const at::Tensor& lora_A, const at::Tensor& lora_B,
                            const at::Tensor& magnitude, double scale) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    static auto op = find_op<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
        const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&,
        const at::Tensor&, double, bool)>("dora_ext::dora_linear_forward");
    // What the magnitude gradient reads (options.h, SavedActivation): z, the output (shared with
    // whatever saves it next, and what autograd's version check guards), or nothing.
    const SavedActivation saved = current_options().saved_activation;
    const bool keep_z = saved == SavedActivation::Z;
    auto [out, z, h, norm] = op.call(x, weight, bias, lora_A, lora_B, magnitude, scale, keep_z);
    const at::Tensor b = bias.has_value() ? *bias : at::Tensor();
    ctx->save_for_backward({x, weight, b, lora_A, lora_B, magnitude, norm, keep_z ? z : at::Tensor(),
                            saved == SavedActivation::Output ? out : at::Tensor(), h});
    ctx->saved_data["scale"] = scale;
    save_options(ctx);
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    ThreadOptionsGuard options(saved_options(ctx));
    const auto saved = ctx->get_saved_variables();
    const double scale = ctx->saved_data["scale"].toDouble();
    const auto optional = [](const at::Tensor& t) { return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt; };
    // needs_input_grad counts tensor inputs only: x, weight, [bias], lora_A, lora_B, magnitude.
    const size_t b = saved[2].defined() ? 1 : 0;
    const std::array<bool, 5> mask = {ctx->needs_input_grad(0), ctx->needs_input_grad(2 + b),
                                      ctx->needs_input_grad(3 + b), ctx->needs_input_grad(4 + b),
                                      b == 1 && ctx->needs_input_grad(2)};
    static auto op = find_op<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
        const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&,
        const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
        const std::optional<at::Tensor>&, const at::Tensor&, double, std::array<bool, 5>)>(
        "dora_ext::dora_linear_backward");
    auto [gx, gA, gB, gm, gbias] =
        op.call(grads[0], saved[0], saved[1], optional(saved[2]), saved[3], saved[4], saved[5], saved[6],
                optional(saved[7]), optional(saved[8]), saved[9], scale, mask);
    return {grad_or_undefined(gx, mask[0]),
            at::Tensor(),
            grad_or_undefined(gbias, mask[4]),
            grad_or_undefined(gA, mask[1]),
            grad_or_undefined(gB, mask[2]),
            grad_or_undefined(gm, mask[3]),
            at::Tensor()};
  }
};

class DoraLinearDropoutFunction : public torch::autograd::Function<DoraLinearDropoutFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& x_dropped,
                            const at::Tensor& weight, const std::optional<at::Tensor>& bias, const at::Tensor& lora_A,
                            const at::Tensor& lora_B, const at::Tensor& magnitude, double scale) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    static auto op = find_op<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
        const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&,
        const at::Tensor&, const at::Tensor&, double, bool)>("dora_ext::dora_linear_dropout_forward");
    // The output holds x W^T too, so z_d cannot be recovered from it: z_d is kept unless
    // saved_activation=recompute (options.h).
    const bool keep_z = current_options().saved_activation != SavedActivation::Recompute;
    auto [out, z_dropped, h, norm] = op.call(x, x_dropped, weight, bias, lora_A, lora_B, magnitude, scale, keep_z);
    // x is not saved: its gradient is gy W.
    ctx->save_for_backward({x_dropped, weight, lora_A, lora_B, magnitude, norm, keep_z ? z_dropped : at::Tensor(), h});
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    save_options(ctx);
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    ThreadOptionsGuard options(saved_options(ctx));
    const auto saved = ctx->get_saved_variables();
    const double scale = ctx->saved_data["scale"].toDouble();
    // needs_input_grad counts tensor inputs only: x, x_dropped, weight, [bias], lora_A, lora_B, magnitude.
    const size_t b = ctx->saved_data["has_bias"].toBool() ? 1 : 0;
    const std::array<bool, 6> mask = {ctx->needs_input_grad(0),     ctx->needs_input_grad(1),
                                      ctx->needs_input_grad(3 + b), ctx->needs_input_grad(4 + b),
                                      ctx->needs_input_grad(5 + b), b == 1 && ctx->needs_input_grad(3)};
    static auto op = find_op<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
        const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
        const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&, double,
        std::array<bool, 6>)>("dora_ext::dora_linear_dropout_backward");
    const std::optional<at::Tensor> z_dropped = saved[6].defined() ? std::optional<at::Tensor>(saved[6]) : std::nullopt;
    auto [gx, gxd, gA, gB, gm, gbias] =
        op.call(grads[0], saved[0], saved[1], saved[2], saved[3], saved[4], saved[5], z_dropped, saved[7], scale, mask);
    return {grad_or_undefined(gx, mask[0]),
            grad_or_undefined(gxd, mask[1]),
            at::Tensor(),
            grad_or_undefined(gbias, mask[5]),
            grad_or_undefined(gA, mask[2]),
            grad_or_undefined(gB, mask[3]),
            grad_or_undefined(gm, mask[4]),
            at::Tensor()};
  }
};

class ComposeDeltaFunction : public torch::autograd::Function<ComposeDeltaFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& base, const at::Tensor& lora,
                            const at::Tensor& magnitude, const at::Tensor& norm, double scale) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    static auto op =
        find_op<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, double)>(
            "dora_ext::compose_delta");
    at::Tensor out = op.call(base, lora, magnitude, norm, scale);
    ctx->save_for_backward({base, lora, magnitude, norm});
    ctx->saved_data["scale"] = scale;
    save_options(ctx);
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    ThreadOptionsGuard options(saved_options(ctx));
    const auto saved = ctx->get_saved_variables();
    const double scale = ctx->saved_data["scale"].toDouble();
    const std::array<bool, 3> mask = {ctx->needs_input_grad(0), ctx->needs_input_grad(1), ctx->needs_input_grad(2)};
    static auto op = find_op<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
        const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, double,
        std::array<bool, 3>)>("dora_ext::compose_delta_backward");
    auto [gbase, glora, gm] = op.call(grads[0], saved[0], saved[1], saved[2], saved[3], scale, mask);
    // The norm is detached by design: no gradient for it.
    return {grad_or_undefined(gbase, mask[0]), grad_or_undefined(glora, mask[1]), grad_or_undefined(gm, mask[2]),
            at::Tensor(), at::Tensor()};
  }
};

bool any_requires_grad(std::initializer_list<const at::Tensor*> tensors) {
  for (const at::Tensor* t : tensors) {
    if (t->defined() && t->requires_grad()) return true;
  }
  return false;
}

at::Tensor dora_linear_autograd(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                const at::Tensor& lora_A, const at::Tensor& lora_B, const at::Tensor& magnitude,
                                double scale) {
  const at::Tensor no_bias;
  const at::Tensor& b = bias.has_value() ? *bias : no_bias;
  const bool grad = at::GradMode::is_enabled() && any_requires_grad({&x, &b, &lora_A, &lora_B, &magnitude});
  TORCH_CHECK(!(at::GradMode::is_enabled() && weight.requires_grad()),
              "dora_linear: weight requires grad, but the DoRA base weight is frozen and gets no gradient; "
              "call weight.requires_grad_(False) (train lora_A, lora_B and magnitude instead)");
  if (!grad) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    static auto op =
        find_op<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&,
                           const at::Tensor&, const at::Tensor&, double)>("dora_ext::dora_linear");
    return op.call(x, weight, bias, lora_A, lora_B, magnitude, scale);
  }
  return DoraLinearFunction::apply(x, weight, bias, lora_A, lora_B, magnitude, scale);
}

at::Tensor dora_linear_dropout_autograd(const at::Tensor& x, const at::Tensor& x_dropped, const at::Tensor& weight,
                                        const std::optional<at::Tensor>& bias, const at::Tensor& lora_A,
                                        const at::Tensor& lora_B, const at::Tensor& magnitude, double scale) {
  const at::Tensor no_bias;
  const at::Tensor& b = bias.has_value() ? *bias : no_bias;
  const bool grad = at::GradMode::is_enabled() && any_requires_grad({&x, &x_dropped, &b, &lora_A, &lora_B, &magnitude});
  TORCH_CHECK(!(at::GradMode::is_enabled() && weight.requires_grad()),
              "dora_linear_dropout: weight requires grad, but the DoRA base weight is frozen and gets no gradient; "
              "call weight.requires_grad_(False) (train lora_A, lora_B and magnitude instead)");
  if (!grad) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    static auto op =
        find_op<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                           const at::Tensor&, const at::Tensor&, const at::Tensor&, double)>(
            "dora_ext::dora_linear_dropout");
    return op.call(x, x_dropped, weight, bias, lora_A, lora_B, magnitude, scale);
  }
  return DoraLinearDropoutFunction::apply(x, x_dropped, weight, bias, lora_A, lora_B, magnitude, scale);
}

// Serving only: a call that would record gradients is refused (no silent wrong gradients).
at::Tensor dora_linear_mixed_autograd(const at::Tensor& x, const at::Tensor& weight,
                                      const std::optional<at::Tensor>& bias, at::TensorList lora_A,
                                      at::TensorList lora_B, const c10::List<std::optional<at::Tensor>>& magnitude,
                                      at::ArrayRef<double> scale, const at::Tensor& adapter_index) {
  if (at::GradMode::is_enabled()) {
    bool grad = x.requires_grad() || weight.requires_grad() || (bias.has_value() && bias->requires_grad());
    for (const at::Tensor& t : lora_A) grad = grad || t.requires_grad();
    for (const at::Tensor& t : lora_B) grad = grad || t.requires_grad();
    for (size_t k = 0; k < magnitude.size(); ++k) {
      const std::optional<at::Tensor> m = magnitude.get(k);
      grad = grad || (m.has_value() && m->defined() && m->requires_grad());
    }
    TORCH_CHECK(!grad,
                "dora_linear_mixed: mixed-adapter batches are for inference and record no gradients; call it under "
                "torch.no_grad() / inference_mode (train one adapter at a time with dora_linear)");
  }
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  static auto op = find_op<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                      at::TensorList, at::TensorList, const c10::List<std::optional<at::Tensor>>&,
                                      at::ArrayRef<double>, const at::Tensor&)>("dora_ext::dora_linear_mixed");
  return op.call(x, weight, bias, lora_A, lora_B, magnitude, scale, adapter_index);
}

at::Tensor compose_delta_autograd(const at::Tensor& base, const at::Tensor& lora, const at::Tensor& magnitude,
                                  const at::Tensor& norm, double scale) {
  return ComposeDeltaFunction::apply(base, lora, magnitude, norm, scale);
}

at::Tensor row_norm_autograd(const at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B,
                             double scale) {
  // Detached by design: the result never requires grad.
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  static auto op =
      find_op<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, double)>("dora_ext::row_norm");
  return op.call(weight, lora_A, lora_B, scale);
}

at::Tensor row_norm_sq_autograd(const at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B,
                                double scale) {
  // Detached, like the norm.
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  static auto op =
      find_op<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, double)>("dora_ext::row_norm_sq");
  return op.call(weight, lora_A, lora_B, scale);
}

}  // namespace

TORCH_LIBRARY_IMPL(dora_ext, Autograd, m) {
  m.impl("dora_linear", &dora_linear_autograd);
  m.impl("dora_linear_dropout", &dora_linear_dropout_autograd);
  m.impl("dora_linear_mixed", &dora_linear_mixed_autograd);
  m.impl("compose_delta", &compose_delta_autograd);
  m.impl("row_norm", &row_norm_autograd);
  m.impl("row_norm_sq", &row_norm_sq_autograd);
}

}  // namespace dora_ext
