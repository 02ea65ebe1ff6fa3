#include "magnitude_grad.h"

#include "eager.h"
#include "fp32_adapters.h"

#ifdef DORA_EXT_WITH_CUDA
#include "fused.h"
#endif

#include <ATen/ATen.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>

#include <limits>

namespace dora_ext {
namespace {

// A column recovers z from the output only where the output's rounding, divided by g, stays within
// this factor of z's own rounding (two bits; docs/DESIGN.md section 11).
constexpr double kRecoveryLossLimit = 4.0;

// The smallest |g| whose outputs keep z's precision: float16 outputs below 2^-14 are subnormal
// (absolute spacing 2^-24), which 1/g amplifies; bfloat16, float32 and float64 outputs lose
// nothing short of g = 0 (or a g below float32's normal range).
double smallest_recoverable_scale(at::ScalarType output_dtype) {
  return output_dtype == at::kHalf ? 0.0625 : static_cast<double>(std::numeric_limits<float>::min());
}

}  // namespace

std::pair<at::Tensor, at::Tensor> grad_prologue(const at::Tensor& gy, const at::Tensor& z, const at::Tensor& g,
                                                const at::Tensor& norm, bool fused) {
#ifdef DORA_EXT_WITH_CUDA
  if (fused) return grad_prologue_fused(gy, z, g, norm);
#endif
  (void)fused;
  const at::ScalarType acc = norm.scalar_type();
  return {(gy * g).to(gy.scalar_type()), (gy.to(acc) * z.to(acc)).sum(0) / norm};
}

at::Tensor recompute_z(const at::Tensor& x2d, const at::Tensor& weight, const at::Tensor& lora_B, const at::Tensor& h,
                       double scale, const at::Tensor& cols) {
  const at::Tensor w = cols.defined() ? weight.index_select(0, cols) : weight;
  const at::Tensor b = cols.defined() ? lora_B.index_select(0, cols) : lora_B;
  if (h.scalar_type() != x2d.scalar_type()) {
    // float32 adapters: the base GEMM rounded to x's dtype, the adapter's term in float32, as the
    // forward composes them (fp32_adapters.h).
    return at::mm(x2d, w.t()).to(at::kFloat).addmm_(h, b.t(), /*beta=*/1, /*alpha=*/scale).to(x2d.scalar_type());
  }
  return at::mm(x2d, w.t()).addmm_(h, b.t(), /*beta=*/1, /*alpha=*/scale);
}

OutputPrologue grad_prologue_from_output(const at::Tensor& gy, const at::Tensor& y, const at::Tensor& g,
                                         const at::Tensor& norm, const std::optional<at::Tensor>& bias, bool fused) {
  const double min_scale = smallest_recoverable_scale(y.scalar_type());
  OutputPrologue p;
#ifdef DORA_EXT_WITH_CUDA
  if (fused) {
    std::tie(p.gz, p.grad_m, p.unrecovered, p.unrecovered_count) =
        grad_prologue_from_output_fused(gy, y, g, norm, bias, min_scale, kRecoveryLossLimit);
  }
#endif
  if (!p.gz.defined()) {
    const bool has_bias = bias.has_value() && bias->defined();
    const at::ScalarType acc = norm.scalar_type();
    p.gz = (gy * g).to(gy.scalar_type());
    const at::Tensor gy_acc = gy.to(acc), y_acc = y.to(acc), g_acc = g.to(acc);
    const at::Tensor gy_z_g = has_bias ? gy_acc * (y_acc - bias->to(acc)) : gy_acc * y_acc;  // gy g z
    p.unrecovered = g_acc.abs() < min_scale;
    if (has_bias) {
      p.unrecovered.logical_or_((gy_acc * y_acc).abs_().sum(0) > gy_z_g.abs().sum(0) * kRecoveryLossLimit);
    }
    p.grad_m = gy_z_g.sum(0) / (g_acc * norm);
    p.unrecovered.logical_or_(p.grad_m.isfinite().logical_not_());  // an output that overflowed
    p.grad_m.masked_fill_(p.unrecovered, 0.0);
    p.unrecovered_count = p.unrecovered.sum();
  }
  if (p.unrecovered_count.is_cuda()) {
    // Copied behind the prologue on the current stream; the host waits for this event alone, not for
    // the backward's GEMMs queued after it (a plain .item() would wait for those too).
    at::Tensor host = at::empty({}, p.unrecovered_count.options().device(at::kCPU).pinned_memory(true));
    host.copy_(p.unrecovered_count, /*non_blocking=*/true);
    p.unrecovered_count = host;
    p.counted = std::make_shared<c10::Event>(c10::DeviceType::CUDA);
    const c10::Device device = gy.device();
    p.counted->record(c10::impl::getDeviceGuardImpl(device.type())->getStream(device));
  }
  return p;
}

void recompute_unrecovered(OutputPrologue& p, const at::Tensor& gy, const at::Tensor& x2d, const at::Tensor& weight,
                           const at::Tensor& lora_B, const at::Tensor& h, double scale, const at::Tensor& norm) {
  if (p.counted) p.counted->synchronize();
  if (p.unrecovered_count.item<int64_t>() == 0) return;
  const at::Tensor cols = at::nonzero(p.unrecovered).squeeze(1);
  const at::ScalarType acc = norm.scalar_type();
  const at::Tensor z = recompute_z(x2d, weight, lora_B, h, scale, cols);
  const at::Tensor exact = (gy.index_select(1, cols).to(acc) * z.to(acc)).sum(0) / norm.index_select(0, cols);
  p.grad_m.index_copy_(0, cols, exact);
}

}  // namespace dora_ext
