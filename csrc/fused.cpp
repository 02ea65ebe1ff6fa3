// CUDA kernels of the dora_ext ops: each call asks the dispatcher for a tier,
// then runs the fused path (cuBLAS GEMMs through ATen + one AOT-compiled
// Triton pass for everything elementwise) or falls back to the eager path.
#include "checks.h"
#include "dispatch.h"
#include "eager.h"
#include "fused_common.h"
#include "fused_norm.h"
#include "launcher.h"
#include "norm_cache.h"

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>


namespace dora_ext {
namespace {

// "a16" when every pointer is 16-byte aligned and every row stride and the
// column count are multiples of 16 elements (the kernel then uses vector
// loads); "any" otherwise.
const char* alignment_key(std::initializer_list<const at::Tensor*> tensors, std::initializer_list<int64_t> counts) {
  return all_aligned16(tensors, counts) ? "a16" : "any";
}

// out = g * z + bias over [rows, cols]; out may be z.
void launch_scale(const at::Tensor& z, const at::Tensor& g, const std::optional<at::Tensor>& bias,
                  const at::Tensor& out) {
  const at::Tensor b = bias.has_value() && bias->defined() ? bias->contiguous() : at::Tensor();
  const int64_t rows = z.size(0), cols = z.size(1);
  const std::string variant = std::string(dtype_key(z.scalar_type())) + (b.defined() ? "_bias_" : "_nobias_") +
                              alignment_key({&z, &g, &b, &out}, {cols, z.stride(0), out.stride(0)});
  const c10::DeviceIndex device = z.device().index();
  const KernelImage& k = kernel_for("dora_scale_kernel", variant, device);
  launch(k, device, {cdiv(rows, k.tile_rows), cdiv(cols, k.tile_cols), 1},
         {z, g, b.defined() ? KernelArg(b) : KernelArg::null_pointer(), out, rows, cols, z.stride(0), out.stride(0)});
}

// gz = gy * g and the fp32 magnitude gradient colsum(gy * z) / norm in one pass.
std::pair<at::Tensor, at::Tensor> launch_grad_prologue(const at::Tensor& gy, const at::Tensor& z,
                                                       const at::Tensor& g, const at::Tensor& norm) {
  const int64_t rows = gy.size(0), cols = gy.size(1);
  at::Tensor gz = at::empty({rows, cols}, gy.options());
  const c10::DeviceIndex device = gy.device().index();
  const std::string variant = std::string(dtype_key(gy.scalar_type())) + "_" +
                              alignment_key({&gy, &z, &g, &gz}, {cols, gy.stride(0), z.stride(0), gz.stride(0)});
  const KernelImage& k = kernel_for("dora_grad_prologue_kernel", variant, device);
  const int64_t col_tiles = cdiv(cols, k.tile_cols);
  // Enough row programs to fill the GPU a few times over; each loops over its
  // share of the rows, so the partial-sum buffer stays [programs, cols].
  const int64_t sms = device_info(device).multiprocessors;
  const int64_t row_programs = std::max<int64_t>(1, std::min(cdiv(rows, k.tile_rows), cdiv(4 * sms, col_tiles)));
  at::Tensor partial = at::empty({row_programs, cols}, gy.options().dtype(at::kFloat));
  launch(k, device, {row_programs, col_tiles, 1}, {gy, z, g, gz, partial, rows, cols, gy.stride(0), z.stride(0), gz.stride(0)});
  return {gz, partial.sum(0).div_(norm)};
}

// The row norm through the cache: the fused kernel where one serves these
// inputs, the eager cuBLAS path otherwise (both fp32, both factored).
at::Tensor row_norm_cached_cuda(const at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B,
                                double scale, bool allow_fused = true) {
  return cached_row_norm(weight, lora_A, lora_B, scale, [&](const at::Tensor& cached_wsq, at::Tensor* wsq) {
    at::Tensor norm = allow_fused ? row_norm_fused(weight, lora_A, lora_B, scale, cached_wsq, wsq) : at::Tensor();
    return norm.defined() ? norm : row_norm_eager_parts(weight, lora_A, lora_B, scale, cached_wsq, wsq);
  });
}

// The GEMM stage both fused forwards share: z = x W^T + s (x A^T) B^T [T, d_out]
// (x W^T only when `add_lora` is false: the epilogue kernel adds the rest),
// h = x A^T, the detached norm and g = m / n (fp32, contiguous for the kernel).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fused_forward_gemms(
    const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B,
    const at::Tensor& magnitude, double scale, bool add_lora) {
  at::Tensor norm = row_norm_cached_cuda(weight, lora_A, lora_B, scale);
  at::Tensor g = cached_magnitude_scale(weight, magnitude, norm);
  auto [h, z] = lora_and_base(as_rows(x), weight, lora_A, lora_B, scale, add_lora);
  return {z, h, norm, g};
}

// DORA_EXT_LORA_EPILOGUE=1 (read per call): the LoRA up-projection runs as a Triton GEMM whose
// epilogue finishes the output (triton_src/lora_up.py) instead of cuBLAS addmm_ plus the scale
// pass. Off by default until measured against that pair (scripts/bench_epilogue.py); 16-bit only.
bool lora_epilogue_for(at::ScalarType dtype) {
  const char* env = std::getenv("DORA_EXT_LORA_EPILOGUE");
  return env != nullptr && std::strcmp(env, "1") == 0 && is_16bit_float(dtype);
}

// The forward's tier, chosen and recorded, and whether the LoRA epilogue runs (said in the reason).
std::pair<Tier, bool> plan_forward(const at::Tensor& x, int64_t d_out, bool training) {
  TierDecision decision = choose_tier(x, d_out, training);
  const bool epilogue = decision.tier != Tier::Eager && lora_epilogue_for(x.scalar_type());
  if (epilogue) decision.reason += "; LoRA up-projection in the output epilogue (DORA_EXT_LORA_EPILOGUE=1)";
  record_tier(decision);
  return {decision.tier, epilogue};
}

// z += s h B^T (written back when `write_z`) and out = g * z + bias in one pass over
// [T, d_out]; out may be z when z is not written back.
void launch_lora_up(const at::Tensor& z, const at::Tensor& h, const at::Tensor& lora_B, double scale,
                    const at::Tensor& g, const std::optional<at::Tensor>& bias, const at::Tensor& out, bool write_z) {
  const at::Tensor b = bias.has_value() && bias->defined() ? bias->contiguous() : at::Tensor();
  const at::Tensor up = lora_B.stride(1) == 1 ? lora_B : lora_B.contiguous();  // unit stride along r
  const int64_t rows = z.size(0), cols = z.size(1), rank = up.size(1);
  const std::string variant =
      std::string(dtype_key(z.scalar_type())) + (b.defined() ? "_bias_" : "_nobias_") + (write_z ? "z_" : "noz_") +
      alignment_key({&z, &h, &up, &g, &b, &out},
                    {cols, rank, z.stride(0), h.stride(0), up.stride(0), out.stride(0)});
  const c10::DeviceIndex device = z.device().index();
  const KernelImage& k = kernel_for("dora_lora_up_kernel", variant, device);
  launch(k, device, {cdiv(rows, k.tile_rows), cdiv(cols, k.tile_cols), 1},
         {z, h, up, g, b.defined() ? KernelArg(b) : KernelArg::null_pointer(), out, rows, cols, rank, z.stride(0),
          h.stride(0), up.stride(0), out.stride(0), static_cast<float>(scale)});
}

// out = g * (x W^T + s h B^T) + bias from the GEMM stage's z: the LoRA epilogue adds s h B^T
// (writing z back when out is another tensor, for backward), else z has it and the scale pass runs.
void finish_forward(bool epilogue, const at::Tensor& z, const at::Tensor& h, const at::Tensor& lora_B, double scale,
                    const at::Tensor& g, const std::optional<at::Tensor>& bias, const at::Tensor& out) {
  if (epilogue) {
    launch_lora_up(z, h, lora_B, scale, g, bias, out, /*write_z=*/!out.is_same(z));
  } else {
    launch_scale(z, g, bias, out);
  }
}

// The public op: a copy of the cached norm, which the caller may write to. The
// tier rules apply with the weight's rows in the place of tokens.
at::Tensor row_norm_cuda(const at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B, double scale) {
  check_row_norm_args("row_norm", weight, lora_A, lora_B, /*fp32_adapters=*/true);
  c10::cuda::CUDAGuard guard(weight.device());
  TierDecision decision = choose_tier(weight, weight.size(0), /*training=*/false);
  record_tier(decision);
  return row_norm_cached_cuda(weight, lora_A, lora_B, scale, decision.tier != Tier::Eager).clone();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dora_linear_forward_cuda(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias, const at::Tensor& lora_A,
    const at::Tensor& lora_B, const at::Tensor& magnitude, double scale) {
  check_dora_linear_args("dora_linear", x, weight, bias, lora_A, lora_B, magnitude);
  c10::cuda::CUDAGuard guard(x.device());
  const auto [tier, epilogue] = plan_forward(x, weight.size(0), /*training=*/true);
  if (tier == Tier::Eager) return dora_linear_forward_eager(x, weight, bias, lora_A, lora_B, magnitude, scale);
  auto [z, h, norm, g] = fused_forward_gemms(x, weight, lora_A, lora_B, magnitude, scale, !epilogue);
  at::Tensor out = at::empty_like(z);
  finish_forward(epilogue, z, h, lora_B, scale, g, bias, out);  // z (written back) is saved for backward
  return {out.view(output_shape(x, weight.size(0))), z, h, norm};
}

at::Tensor dora_linear_cuda(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                            const at::Tensor& lora_A, const at::Tensor& lora_B, const at::Tensor& magnitude,
                            double scale) {
  check_dora_linear_args("dora_linear", x, weight, bias, lora_A, lora_B, magnitude);
  c10::cuda::CUDAGuard guard(x.device());
  const auto [tier, epilogue] = plan_forward(x, weight.size(0), /*training=*/false);
  if (tier == Tier::Eager) return dora_linear_eager(x, weight, bias, lora_A, lora_B, magnitude, scale);
  auto [z, h, norm, g] = fused_forward_gemms(x, weight, lora_A, lora_B, magnitude, scale, !epilogue);
  finish_forward(epilogue, z, h, lora_B, scale, g, bias, z);  // in place: nothing else needs z
  return z.view(output_shape(x, weight.size(0)));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> dora_linear_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_A,
    const at::Tensor& lora_B, const at::Tensor& magnitude, const at::Tensor& norm, const at::Tensor& z,
    const at::Tensor& h, double scale, std::array<bool, 5> mask) {
  c10::cuda::CUDAGuard guard(x.device());
  TierDecision decision = choose_tier(grad_out, weight.size(0), /*training=*/true);
  record_tier(decision);
  if (decision.tier == Tier::Eager) {
    return dora_linear_backward_eager(grad_out, x, weight, lora_A, lora_B, magnitude, norm, z, h, scale, mask);
  }
  const at::Tensor gy = as_rows(grad_out);
  const at::Tensor g = cached_magnitude_scale(weight, magnitude, norm);
  auto [gz, grad_m] = launch_grad_prologue(gy, as_rows(z), g, norm);
  auto [grad_x, grad_A, grad_B] =
      backward_gemms(gz, as_rows(x), weight, lora_A, lora_B, h, scale, mask[0], mask[1], mask[2]);
  at::Tensor grad_bias;
  if (mask[4]) grad_bias = gy.sum(0, false, at::kFloat).to(gy.scalar_type());
  return {mask[0] ? grad_x.view(x.sizes()) : no_grad_placeholder(x), mask[1] ? grad_A : no_grad_placeholder(x),
          mask[2] ? grad_B : no_grad_placeholder(x),
          mask[3] ? grad_m.to(magnitude.scalar_type()) : no_grad_placeholder(magnitude),
          mask[4] ? grad_bias : no_grad_placeholder(x)};
}

at::Tensor compose_delta_cuda(const at::Tensor& base, const at::Tensor& lora, const at::Tensor& magnitude,
                              const at::Tensor& norm, double scale) {
  check_compose_delta_args("compose_delta", base, lora, magnitude, norm);
  c10::cuda::CUDAGuard guard(base.device());
  const int64_t d_out = base.size(-1);
  TierDecision decision = choose_tier(base, d_out, /*training=*/false);
  record_tier(decision);
  if (decision.tier == Tier::Eager) return compose_delta_eager(base, lora, magnitude, norm, scale);
  // A 16-bit base with a float32 lora: the float32 kernel on a transient float32 copy of base
  // (autograd saved the 16-bit base itself).
  const at::Tensor base2d = as_rows(base.to(lora.scalar_type())), lora2d = as_rows(lora);
  const at::Tensor g = magnitude_scale(magnitude, norm).contiguous();
  const at::Tensor gm1 = magnitude_scale_minus_one(magnitude, norm).contiguous();
  at::Tensor out = at::empty({base2d.size(0), d_out}, lora.options());
  const int64_t rows = out.size(0);
  const c10::DeviceIndex device = base.device().index();
  const std::string variant =
      std::string(dtype_key(lora.scalar_type())) + "_" +
      alignment_key({&base2d, &lora2d, &g, &gm1, &out}, {d_out, base2d.stride(0), lora2d.stride(0), out.stride(0)});
  const KernelImage& k = kernel_for("dora_delta_kernel", variant, device);
  launch(k, device, {cdiv(rows, k.tile_rows), cdiv(d_out, k.tile_cols), 1},
         {base2d, lora2d, g, gm1, out, rows, d_out, base2d.stride(0), lora2d.stride(0), out.stride(0),
          static_cast<float>(scale)});
  return out.view(base.sizes());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> compose_delta_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& base, const at::Tensor& lora, const at::Tensor& magnitude,
    const at::Tensor& norm, double scale, std::array<bool, 3> mask) {
  c10::cuda::CUDAGuard guard(base.device());
  return compose_delta_backward_eager(grad_out, base, lora, magnitude, norm, scale, mask);
}

}  // namespace

TORCH_LIBRARY_IMPL(dora_ext, CUDA, m) {
  m.impl("row_norm", &row_norm_cuda);
  m.impl("dora_linear", &dora_linear_cuda);
  m.impl("dora_linear_forward", &dora_linear_forward_cuda);
  m.impl("dora_linear_backward", &dora_linear_backward_cuda);
  m.impl("compose_delta", &compose_delta_cuda);
  m.impl("compose_delta_backward", &compose_delta_backward_cuda);
}

}  // namespace dora_ext
