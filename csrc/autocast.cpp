// Autocast kernels for the public ops (CPU and CUDA autocast): under
// torch.autocast the ops accept mixed-dtype inputs and cast them by the rules
// below, then run again below the Autocast key (autograd records the casts, so
// gradients come back in each input's own dtype). `dt` is the autocast dtype
// of the device (torch.get_autocast_dtype), `eligible` means a floating-point
// tensor on the autocast device other than float64 — float64 tensors are
// never cast, as for PyTorch's own autocast ops.
//
// dora_linear  x, weight, bias, lora_A and lora_B are cast to `dt` (a linear
//              layer: its GEMMs are what autocast is for). The magnitude is
//              left as it is (fp32 under PEFT's mixed precision; the op takes
//              any float dtype and keeps g = m / n in fp32), so the output
//              dtype is `dt` whatever the magnitude's dtype. The norm inside is
//              accumulated in fp32 from the cast weights, as without autocast.
//
// dora_linear_mixed  dora_linear's rule for every adapter: x, weight, bias and every lora_A[k] and
//              lora_B[k] cast to `dt`, the magnitudes left as they are (inference only, no
//              gradients), so each row equals dora_linear of that row under autocast.
//
// row_norm     weight, lora_A and lora_B are promoted to the widest of their
//              dtypes (autocast's "promote" policy), never narrowed to `dt`:
//              the norm is the one number DoRA must get right (DESIGN.md §2:
//              < 1e-4 relative against float64), and narrowing fp32 weights to
//              bf16 before it would put bf16 rounding (~1e-3) into it. So fp32
//              inputs give the fp32-accurate norm of those inputs, PEFT's mix of
//              a bf16 base weight with fp32 adapters runs at fp32 accuracy with
//              the weight left in bf16 (row_norm's own promotion rule), and
//              all-bf16 inputs stay bf16 (fp32 accumulation as always).
//
// compose_delta  elementwise: lora is promoted to the wider of the two dtypes, and
//              base too unless it is 16-bit with a float32 lora (the op's own
//              rule; no cast when they agree, so a bf16 base result and a
//              bf16 LoRA result give a bf16 delta); the norm is cast to the fp32
//              (float64 for float64) dtype the op expects for that dtype; the
//              magnitude is left as it is.
#include "checks.h"
#include "dora_ext.h"

#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include <initializer_list>
#include <vector>

namespace dora_ext {
namespace {

template <c10::DeviceType device>
constexpr c10::DispatchKey autocast_key() {
  return device == c10::DeviceType::CUDA ? c10::DispatchKey::AutocastCUDA : c10::DispatchKey::AutocastCPU;
}

// Widest floating dtype among the eligible tensors (promotion order
// half/bfloat16 < float32 < float64; half with bfloat16 promotes to float32),
// or `fallback` when none is eligible.
template <c10::DeviceType device>
at::ScalarType widest_eligible(std::initializer_list<const at::Tensor*> tensors, at::ScalarType fallback) {
  bool any = false;
  at::ScalarType out = fallback;
  for (const at::Tensor* t : tensors) {
    if (!t->defined() || !t->is_floating_point() || t->device().type() != device) continue;
    out = any ? at::promote_types(out, t->scalar_type()) : t->scalar_type();
    any = true;
  }
  return out;
}

// Cast an eligible tensor to `dtype` (float64 included: promotion may need to
// widen to it); other tensors are returned as they are and fail the op's checks.
template <c10::DeviceType device>
at::Tensor promote_to(const at::Tensor& t, at::ScalarType dtype) {
  if (!t.defined() || !t.is_floating_point() || t.device().type() != device || t.scalar_type() == dtype) return t;
  return t.to(dtype);
}

template <c10::DeviceType device>
at::Tensor dora_linear_autocast(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                const at::Tensor& lora_A, const at::Tensor& lora_B, const at::Tensor& magnitude,
                                double scale) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(autocast_key<device>());
  const at::ScalarType dt = at::autocast::get_autocast_dtype(device);
  return dora_linear(at::autocast::cached_cast(dt, x, device), at::autocast::cached_cast(dt, weight, device),
                     at::autocast::cached_cast(dt, bias, device), at::autocast::cached_cast(dt, lora_A, device),
                     at::autocast::cached_cast(dt, lora_B, device), magnitude, scale);
}

template <c10::DeviceType device>
at::Tensor dora_linear_dropout_autocast(const at::Tensor& x, const at::Tensor& x_dropped, const at::Tensor& weight,
                                        const std::optional<at::Tensor>& bias, const at::Tensor& lora_A,
                                        const at::Tensor& lora_B, const at::Tensor& magnitude, double scale) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(autocast_key<device>());
  const at::ScalarType dt = at::autocast::get_autocast_dtype(device);
  return dora_linear_dropout(at::autocast::cached_cast(dt, x, device), at::autocast::cached_cast(dt, x_dropped, device),
                             at::autocast::cached_cast(dt, weight, device), at::autocast::cached_cast(dt, bias, device),
                             at::autocast::cached_cast(dt, lora_A, device),
                             at::autocast::cached_cast(dt, lora_B, device), magnitude, scale);
}

template <c10::DeviceType device>
at::Tensor dora_linear_mixed_autocast(const at::Tensor& x, const at::Tensor& weight,
                                      const std::optional<at::Tensor>& bias, at::TensorList lora_A,
                                      at::TensorList lora_B, const c10::List<std::optional<at::Tensor>>& magnitude,
                                      at::ArrayRef<double> scale, const at::Tensor& adapter_index) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(autocast_key<device>());
  const at::ScalarType dt = at::autocast::get_autocast_dtype(device);
  std::vector<at::Tensor> a, b;
  for (const at::Tensor& t : lora_A) a.push_back(at::autocast::cached_cast(dt, t, device));
  for (const at::Tensor& t : lora_B) b.push_back(at::autocast::cached_cast(dt, t, device));
  return dora_linear_mixed(at::autocast::cached_cast(dt, x, device), at::autocast::cached_cast(dt, weight, device),
                           at::autocast::cached_cast(dt, bias, device), a, b, magnitude, scale, adapter_index);
}

template <c10::DeviceType device>
at::Tensor row_norm_autocast(const at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B,
                             double scale) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(autocast_key<device>());
  const at::ScalarType dt = widest_eligible<device>({&weight, &lora_A, &lora_B}, weight.scalar_type());
  // row_norm takes a 16-bit weight with float32 adapters as they are: the same norm, no float32 copy of W
  const bool keep_weight = dt == at::kFloat && is_16bit_float(weight.scalar_type());
  return row_norm(keep_weight ? weight : promote_to<device>(weight, dt), promote_to<device>(lora_A, dt),
                  promote_to<device>(lora_B, dt), scale);
}

template <c10::DeviceType device>
at::Tensor compose_delta_autocast(const at::Tensor& base, const at::Tensor& lora, const at::Tensor& magnitude,
                                  const at::Tensor& norm, double scale) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(autocast_key<device>());
  const at::ScalarType dt = widest_eligible<device>({&base, &lora}, base.scalar_type());
  const at::ScalarType norm_dt = dt == at::kDouble ? at::kDouble : at::kFloat;
  // compose_delta takes a 16-bit base with a float32 lora as they are (no float32 copy of base to save)
  const bool keep_base = dt == at::kFloat && is_16bit_float(base.scalar_type());
  return compose_delta(keep_base ? base : promote_to<device>(base, dt), promote_to<device>(lora, dt), magnitude,
                       promote_to<device>(norm, norm_dt), scale);
}

}  // namespace

TORCH_LIBRARY_IMPL(dora_ext, AutocastCPU, m) {
  m.impl("dora_linear", &dora_linear_autocast<c10::DeviceType::CPU>);
  m.impl("dora_linear_dropout", &dora_linear_dropout_autocast<c10::DeviceType::CPU>);
  m.impl("dora_linear_mixed", &dora_linear_mixed_autocast<c10::DeviceType::CPU>);
  m.impl("row_norm", &row_norm_autocast<c10::DeviceType::CPU>);
  m.impl("compose_delta", &compose_delta_autocast<c10::DeviceType::CPU>);
}

TORCH_LIBRARY_IMPL(dora_ext, AutocastCUDA, m) {
  m.impl("dora_linear", &dora_linear_autocast<c10::DeviceType::CUDA>);
  m.impl("dora_linear_dropout", &dora_linear_dropout_autocast<c10::DeviceType::CUDA>);
  m.impl("dora_linear_mixed", &dora_linear_mixed_autocast<c10::DeviceType::CUDA>);
  m.impl("row_norm", &row_norm_autocast<c10::DeviceType::CUDA>);
  m.impl("compose_delta", &compose_delta_autocast<c10::DeviceType::CUDA>);
}

}  // namespace dora_ext
