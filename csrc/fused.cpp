// The fused CUDA bodies of the ops (fused.h): cuBLAS GEMMs through ATen and
// one AOT-compiled Triton pass for everything elementwise, or the decode kernel.
#include "fused.h"

#include "checks.h"
#include "eager.h"
#include "fp32_adapters.h"
#include "fused_common.h"
#include "fused_norm.h"
#include "launcher.h"
#include "options.h"

#include <ATen/ATen.h>

namespace dora_ext {
namespace {

// Row programs of a kernel that walks row tiles and writes one fp32 row of column partial sums
// per program: enough to fill the GPU a few times over, so the partial buffer stays small.
int64_t partial_sum_programs(int64_t rows, int64_t col_tiles, int64_t tile_rows, c10::DeviceIndex device) {
  const int64_t sms = device_info(device).multiprocessors;
  return std::max<int64_t>(1, std::min(cdiv(rows, tile_rows), cdiv(4 * sms, col_tiles)));
}

// g = m / n and g - 1 = (m - n) / n for the delta kernels, fp32 and contiguous.
std::pair<at::Tensor, at::Tensor> delta_scales(const at::Tensor& magnitude, const at::Tensor& norm) {
  return {magnitude_scale(magnitude, norm).contiguous(), magnitude_scale_minus_one(magnitude, norm).contiguous()};
}

// The detached norm (through the cache) and g = m / n (fp32, contiguous for the kernels).
std::pair<at::Tensor, at::Tensor> norm_and_magnitude_scale(const at::Tensor& weight, const at::Tensor& lora_A,
                                                           const at::Tensor& lora_B, const at::Tensor& magnitude,
                                                           double scale, NormUse use) {
  at::Tensor norm = row_norm_cached_fused(weight, lora_A, lora_B, scale, use);
  at::Tensor g = cached_magnitude_scale(weight, magnitude, norm);
  return {norm, g};
}

// The GEMM stage of the fused forwards: z = x W^T + s (x A^T) B^T [T, d_out], h = x A^T,
// the detached norm and g = m / n.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fused_forward_gemms(
    const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B,
    const at::Tensor& magnitude, double scale, NormUse use) {
  auto [norm, g] = norm_and_magnitude_scale(weight, lora_A, lora_B, magnitude, scale, use);
  auto [h, z] = lora_and_base(as_rows(x), weight, lora_A, lora_B, scale);
  return {z, h, norm, g};
}

// The fused forward of float32 adapters on 16-bit x: {y, z (when keep_z), h, norm}.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fp32_adapters_forward(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias, const at::Tensor& lora_A,
    const at::Tensor& lora_B, const at::Tensor& magnitude, double scale, NormUse use, bool keep_z) {
  auto [norm, g] = norm_and_magnitude_scale(weight, lora_A, lora_B, magnitude, scale, use);
  auto [base, lora, h] = gemms_fp32_adapters(as_rows(x), weight, lora_A, lora_B);
  auto [y, z] = launch_fp32_compose(base, lora, g, bias, scale, keep_z);
  return {y.view(output_shape(x, weight.size(0))), z, h, norm};
}

// Inference calls with at most this many tokens run the decode kernel (triton_src/decode.py): one
// tile of rows, where it beat cuBLAS + addmm_ + the scale pass on every layer shape measured
// (docs/BENCHMARKS.md). The decode_max_tokens option (default 16, options.h) moves the limit; 0
// turns it off.

// Whether the decode kernel serves validated inputs (16-bit x and W, adapters of x's dtype or
// float32, d_out >= 1): 1..max_tokens tokens, and W and B with unit stride along their K dimension
// (a copy of W would cost more than it saves).
bool decode_serves(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_B, int64_t max_tokens) {
  const int64_t tokens = x.numel() / x.size(-1);  // d_in >= 1 (validated)
  return is_16bit_float(x.scalar_type()) && tokens > 0 && tokens <= max_tokens && weight.stride(1) == 1 &&
         lora_B.stride(1) == 1;
}

// y = g * (x W^T + s (x A^T) B^T) + bias with h = x A^T from cuBLAS and the rest in one kernel.
// Float32 adapters: h from x upcast, in float32, as PEFT computes it.
at::Tensor decode_forward(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                          const at::Tensor& lora_A, const at::Tensor& lora_B, const at::Tensor& magnitude,
                          double scale) {
  const at::Tensor g = norm_and_magnitude_scale(weight, lora_A, lora_B, magnitude, scale, NormUse::Inference).second;
  const at::Tensor x2d = as_rows(x);
  const at::Tensor h = at::mm(x2d.to(lora_A.scalar_type()), lora_A.t());
  const at::Tensor b = bias.has_value() && bias->defined() ? bias->contiguous() : at::Tensor();
  const int64_t rows = x2d.size(0), d_out = weight.size(0), d_in = weight.size(1), rank = lora_B.size(1);
  at::Tensor y = at::empty({rows, d_out}, x.options());
  const bool aligned =
      all_aligned16({&x2d, &weight, &h, &lora_B, &g, &b, &y},
                    {d_out, d_in, rank, x2d.stride(0), weight.stride(0), h.stride(0), lora_B.stride(0), y.stride(0)});
  const c10::DeviceIndex device = x.device().index();
  const KernelImage& k =
      kernel_for(kernels::Decode{x.scalar_type(), lora_B.scalar_type(), b.defined(), aligned}, device);
  launch(k, device, {cdiv(d_out, k.tile_cols), cdiv(rows, k.tile_rows), 1},
         {x2d, weight, h, lora_B, g, b.defined() ? KernelArg(b) : KernelArg::null_pointer(), y, rows, d_out, d_in, rank,
          x2d.stride(0), weight.stride(0), h.stride(0), lora_B.stride(0), y.stride(0), static_cast<float>(scale)});
  return y.view(output_shape(x, d_out));
}

}  // namespace

void launch_scale(const at::Tensor& z, const at::Tensor& g, const std::optional<at::Tensor>& bias,
                  const at::Tensor& out) {
  const at::Tensor b = bias.has_value() && bias->defined() ? bias->contiguous() : at::Tensor();
  const int64_t rows = z.size(0), cols = z.size(1);
  const c10::DeviceIndex device = z.device().index();
  const KernelImage& k =
      kernel_for(kernels::Scale{z.scalar_type(), b.defined(),
                                all_aligned16({&z, &g, &b, &out}, {cols, z.stride(0), out.stride(0)})},
                 device);
  launch(k, device, {cdiv(rows, k.tile_rows), cdiv(cols, k.tile_cols), 1},
         {z, g, b.defined() ? KernelArg(b) : KernelArg::null_pointer(), out, rows, cols, z.stride(0), out.stride(0)});
}

std::pair<at::Tensor, at::Tensor> launch_fp32_compose(const at::Tensor& base, const at::Tensor& lora,
                                                      const at::Tensor& g, const std::optional<at::Tensor>& bias,
                                                      double scale, bool need_z, const at::Tensor& out) {
  const at::Tensor b = bias.has_value() && bias->defined() ? bias->contiguous() : at::Tensor();
  at::Tensor y = out.defined() ? out : at::empty_like(base);
  at::Tensor z = need_z ? at::empty_like(base) : at::Tensor();
  const int64_t rows = base.size(0), cols = base.size(1);
  const int64_t z_stride = need_z ? z.stride(0) : 0;
  const bool aligned =
      all_aligned16({&base, &lora, &g, &b, &y, &z}, {cols, base.stride(0), lora.stride(0), y.stride(0), z_stride});
  const c10::DeviceIndex device = base.device().index();
  const KernelImage& k = kernel_for(kernels::Fp32Compose{base.scalar_type(), b.defined(), need_z, aligned}, device);
  launch(k, device, {cdiv(rows, k.tile_rows), cdiv(cols, k.tile_cols), 1},
         {base, lora, g, b.defined() ? KernelArg(b) : KernelArg::null_pointer(), y,
          need_z ? KernelArg(z) : KernelArg::null_pointer(), rows, cols, base.stride(0), lora.stride(0), y.stride(0),
          z_stride, static_cast<float>(scale)});
  return {y, z};
}

// gz = gy * g and the fp32 magnitude gradient colsum(gy * z) / norm in one pass.
std::pair<at::Tensor, at::Tensor> grad_prologue_fused(const at::Tensor& gy, const at::Tensor& z, const at::Tensor& g,
                                                      const at::Tensor& norm) {
  const int64_t rows = gy.size(0), cols = gy.size(1);
  at::Tensor gz = at::empty({rows, cols}, gy.options());
  const c10::DeviceIndex device = gy.device().index();
  const bool aligned = all_aligned16({&gy, &z, &g, &gz}, {cols, gy.stride(0), z.stride(0), gz.stride(0)});
  const KernelImage& k = kernel_for(kernels::GradPrologue{gy.scalar_type(), aligned}, device);
  const int64_t col_tiles = cdiv(cols, k.tile_cols);
  const int64_t row_programs = partial_sum_programs(rows, col_tiles, k.tile_rows, device);
  at::Tensor partial = at::empty({row_programs, cols}, gy.options().dtype(at::kFloat));
  launch(k, device, {row_programs, col_tiles, 1},
         {gy, z, g, gz, partial, rows, cols, gy.stride(0), z.stride(0), gz.stride(0)});
  return {gz, partial.sum(0).div_(norm)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> grad_prologue_from_output_fused(
    const at::Tensor& gy, const at::Tensor& y, const at::Tensor& g, const at::Tensor& norm,
    const std::optional<at::Tensor>& bias, double min_scale, double loss_limit) {
  const at::Tensor b = bias.has_value() && bias->defined() ? bias->contiguous() : at::Tensor();
  const int64_t rows = gy.size(0), cols = gy.size(1);
  at::Tensor gz = at::empty({rows, cols}, gy.options());
  const c10::DeviceIndex device = gy.device().index();
  const bool aligned = all_aligned16({&gy, &y, &g, &b, &gz}, {cols, gy.stride(0), y.stride(0), gz.stride(0)});
  const KernelImage& k = kernel_for(kernels::GradPrologueOutput{gy.scalar_type(), b.defined(), aligned}, device);
  const int64_t col_tiles = cdiv(cols, k.tile_cols);
  const int64_t row_programs = partial_sum_programs(rows, col_tiles, k.tile_rows, device);
  at::Tensor partial = at::empty({b.defined() ? 3 : 1, row_programs, cols}, gy.options().dtype(at::kFloat));
  launch(k, device, {row_programs, col_tiles, 1},
         {gy, y, g, b.defined() ? KernelArg(b) : KernelArg::null_pointer(), gz, partial, rows, cols, gy.stride(0),
          y.stride(0), gz.stride(0)});

  at::Tensor grad_m = at::empty({cols}, norm.options());
  at::Tensor unrecovered = at::empty({cols}, norm.options().dtype(at::kBool));
  at::Tensor count = at::zeros({}, norm.options().dtype(at::kInt));
  const KernelImage& finish = kernel_for(kernels::GradOutputFinish{b.defined()}, device);
  launch(finish, device, {cdiv(cols, finish.tile_rows), 1, 1},
         {partial, g, norm, grad_m, unrecovered, count, row_programs, cols, static_cast<float>(min_scale),
          static_cast<float>(loss_limit)});
  return {gz, grad_m, unrecovered, count};
}

at::Tensor row_norm_cached_fused(const at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B,
                                 double scale, NormUse use) {
  return cached_row_norm(weight, lora_A, lora_B, scale, use, [&](const at::Tensor& cached_wsq, at::Tensor* wsq) {
    at::Tensor norm = row_norm_fused(weight, lora_A, lora_B, scale, cached_wsq, wsq);
    return norm.defined() ? norm : row_norm_eager_parts(weight, lora_A, lora_B, scale, cached_wsq, wsq);
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dora_linear_forward_fused(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias, const at::Tensor& lora_A,
    const at::Tensor& lora_B, const at::Tensor& magnitude, double scale, bool keep_z) {
  if (has_fp32_adapters(x, lora_A)) {
    return fp32_adapters_forward(x, weight, bias, lora_A, lora_B, magnitude, scale, NormUse::Recording, keep_z);
  }
  auto [z, h, norm, g] = fused_forward_gemms(x, weight, lora_A, lora_B, magnitude, scale, NormUse::Recording);
  at::Tensor out = keep_z ? at::empty_like(z) : z;  // in place unless z is kept for backward
  launch_scale(z, g, bias, out);
  return {out.view(output_shape(x, weight.size(0))), keep_z ? z : at::Tensor(), h, norm};
}

at::Tensor dora_linear_fused(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                             const at::Tensor& lora_A, const at::Tensor& lora_B, const at::Tensor& magnitude,
                             double scale, OpScope& scope) {
  const int64_t max_decode_tokens = current_options().decode_max_tokens;
  if (decode_serves(x, weight, lora_B, max_decode_tokens)) {
    scope.note("decode kernel (tokens <= " + std::to_string(max_decode_tokens) + ")");
    return decode_forward(x, weight, bias, lora_A, lora_B, magnitude, scale);
  }
  if (has_fp32_adapters(x, lora_A)) {
    return std::get<0>(
        fp32_adapters_forward(x, weight, bias, lora_A, lora_B, magnitude, scale, NormUse::Inference, /*keep_z=*/false));
  }
  auto [z, h, norm, g] = fused_forward_gemms(x, weight, lora_A, lora_B, magnitude, scale, NormUse::Inference);
  launch_scale(z, g, bias, z);  // in place: nothing else needs z
  return z.view(output_shape(x, weight.size(0)));
}

at::Tensor compose_delta_fused(const at::Tensor& base, const at::Tensor& lora, const at::Tensor& magnitude,
                               const at::Tensor& norm, double scale) {
  const int64_t d_out = base.size(-1);
  // base may be 16-bit with a float32 lora: the kernel reads it as it is (two dtype axes).
  const at::Tensor base2d = as_rows(base), lora2d = as_rows(lora);
  const auto [g, gm1] = delta_scales(magnitude, norm);
  at::Tensor out = at::empty({base2d.size(0), d_out}, lora.options());
  const int64_t rows = out.size(0);
  const c10::DeviceIndex device = base.device().index();
  const bool aligned =
      all_aligned16({&base2d, &lora2d, &g, &gm1, &out}, {d_out, base2d.stride(0), lora2d.stride(0), out.stride(0)});
  const KernelImage& k = kernel_for(kernels::Delta{base.scalar_type(), lora.scalar_type(), aligned}, device);
  launch(k, device, {cdiv(rows, k.tile_rows), cdiv(d_out, k.tile_cols), 1},
         {base2d, lora2d, g, gm1, out, rows, d_out, base2d.stride(0), lora2d.stride(0), out.stride(0),
          static_cast<float>(scale)});
  return out.view(base.sizes());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> compose_delta_backward_fused(
    const at::Tensor& grad_out, const at::Tensor& base, const at::Tensor& lora, const at::Tensor& magnitude,
    const at::Tensor& norm, double scale, std::array<bool, 3> mask) {
  const int64_t d_out = base.size(-1);
  const at::Tensor gy = as_rows(grad_out), base2d = as_rows(base), lora2d = as_rows(lora);
  const auto [g, gm1] = delta_scales(magnitude, norm);
  const int64_t rows = gy.size(0);
  at::Tensor grad_base = mask[0] ? at::empty({rows, d_out}, base.options()) : at::Tensor();
  at::Tensor grad_lora = at::empty({rows, d_out}, lora.options());
  const int64_t grad_base_stride = mask[0] ? grad_base.stride(0) : 0;
  const c10::DeviceIndex device = base.device().index();
  const bool aligned =
      all_aligned16({&gy, &base2d, &lora2d, &g, &gm1, &grad_base, &grad_lora},
                    {d_out, gy.stride(0), base2d.stride(0), lora2d.stride(0), grad_base_stride, grad_lora.stride(0)});
  const KernelImage& k =
      kernel_for(kernels::DeltaBackward{base.scalar_type(), lora.scalar_type(), mask[0], aligned}, device);
  const int64_t col_tiles = cdiv(d_out, k.tile_cols);
  const int64_t row_programs = partial_sum_programs(rows, col_tiles, k.tile_rows, device);
  at::Tensor partial = at::empty({row_programs, d_out}, gy.options().dtype(at::kFloat));
  launch(k, device, {row_programs, col_tiles, 1},
         {gy, base2d, lora2d, g, gm1, grad_base, grad_lora, partial, rows, d_out, gy.stride(0), base2d.stride(0),
          lora2d.stride(0), grad_base_stride, grad_lora.stride(0), static_cast<float>(scale)});
  at::Tensor grad_m = partial.sum(0).div_(norm).to(magnitude.scalar_type());
  return {mask[0] ? grad_base.view(base.sizes()) : no_grad_placeholder(base), grad_lora.view(lora.sizes()), grad_m};
}

}  // namespace dora_ext
