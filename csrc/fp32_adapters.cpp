#include "fp32_adapters.h"

#include "checks.h"
#include "fused_common.h"
#include "options.h"

#include <ATen/ATen.h>

#include <optional>

namespace dora_ext {
namespace {

// Below this many tokens making the parts (passes over A, B and a [d_out, 6r] copy of B's, per
// call) costs more than the tensor cores save: plain float32 GEMMs there. Measured on the H100 at
// r = 384 (scripts/bench_fp32_adapters.py, docs/BENCHMARKS.md) while ATen made the parts (about ten
// elementwise passes and a cat per operand): float32 GEMMs faster on every layer shape up to 512
// tokens, mixed at 1024 and 2048, the parts 1.3-1.8x faster at 4096. The parts kernel (one pass per
// operand) has not been measured yet. The fp32_parts_min_tokens option (default 2048, options.h)
// moves the limit.

// Tensor cores through exact bfloat16 parts where the activations are bfloat16 on CUDA and there
// are enough tokens (see the header); plain float32 GEMMs elsewhere.
bool use_bf16_parts(const at::Tensor& x2d) {
  return x2d.is_cuda() && x2d.scalar_type() == at::kBFloat16 && x2d.size(0) >= current_options().fp32_parts_min_tokens;
}

// The blocks of the operands made from a float32 tensor's three exact bfloat16 parts, in order; the
// numbers are the parts kernel's LAYOUT (triton_src/parts.py).
enum class PartsLayout : int64_t {
  HiMidLo = 0,  // [hi mid lo]: against a bfloat16 operand, three exact products
  SixA = 1,     // [hi hi hi mid mid lo] and
  SixB = 2,     // [hi mid lo hi mid hi]: the six leading part products of two float32 factors
};

int64_t parts_blocks(PartsLayout layout) {
  return layout == PartsLayout::HiMidLo ? 3 : 6;
}

// The parts by the kernel: one read of t and one write of the operand, where ATen's split and cat
// below take about ten passes. Undefined where no cubin serves t (CPU, a build without one for the
// device's arch, a grid past CUDA's limits): ATen makes the same bits there.
at::Tensor parts_kernel(const at::Tensor& t, PartsLayout layout, int64_t dim) {
  if (!t.is_cuda() || t.scalar_type() != at::kFloat || t.dim() != 2) return {};
  const c10::DeviceIndex device = t.device().index();
  const KernelImage* k = find_kernel(kernels::Fp32Parts{static_cast<int64_t>(layout), dim}, device);
  const int64_t rows = t.size(0), cols = t.size(1), blocks = parts_blocks(layout);
  if (k == nullptr || cdiv(cols, k->tile_cols) > 65535) return {};
  const at::TensorOptions bf16 = t.options().dtype(at::kBFloat16);
  at::Tensor out = dim == 0 ? at::empty({blocks * rows, cols}, bf16) : at::empty({rows, blocks * cols}, bf16);
  launch(*k, device, {cdiv(rows, k->tile_rows), cdiv(cols, k->tile_cols), 1},
         {t, out, rows, cols, t.stride(0), t.stride(1)});
  return out;
}

// t (float32, 2-D) as the blocks of `layout` concatenated along `dim`: t = hi + mid + lo exactly,
// each part rounded to nearest even from what the ones before leave.
at::Tensor parts(const at::Tensor& t, PartsLayout layout, int64_t dim) {
  TORCH_CHECK(dim == 0 || dim == 1, "dora_ext: the bfloat16 parts concatenate along dim 0 or 1, got ", dim);
  if (at::Tensor fused = parts_kernel(t, layout, dim); fused.defined()) return fused;
  const at::Tensor hi = t.to(at::kBFloat16);
  const at::Tensor rest = t - hi.to(at::kFloat);
  const at::Tensor mid = rest.to(at::kBFloat16);
  const at::Tensor lo = (rest - mid.to(at::kFloat)).to(at::kBFloat16);
  switch (layout) {
    case PartsLayout::HiMidLo:
      return at::cat({hi, mid, lo}, dim);
    case PartsLayout::SixA:
      return at::cat({hi, hi, hi, mid, mid, lo}, dim);
    case PartsLayout::SixB:
      return at::cat({hi, mid, lo, hi, mid, hi}, dim);
  }
  TORCH_CHECK(false, "dora_ext: unknown parts layout ", static_cast<int64_t>(layout));
}

// b (float32) as its three exact bfloat16 parts hi, mid, lo concatenated along `dim`.
at::Tensor bf16_parts(const at::Tensor& b, int64_t dim) {
  return parts(b, PartsLayout::HiMidLo, dim);
}

// The operands of one GEMM whose reduction dimension holds the six leading part products of two
// float32 factors: [a_hi a_hi a_hi a_mid a_mid a_lo] along a's reduction dim against
// [b_hi b_mid b_lo b_hi b_mid b_hi] along b's.
std::pair<at::Tensor, at::Tensor> six_products(const at::Tensor& a, int64_t a_dim, const at::Tensor& b, int64_t b_dim) {
  return {parts(a, PartsLayout::SixA, a_dim), parts(b, PartsLayout::SixB, b_dim)};
}

// A 2-D GEMM result holding three blocks along `dim` (one per part), summed: [.., 3n, ..] -> [.., n, ..].
at::Tensor sum_blocks(const at::Tensor& t, int64_t dim) {
  return dim == 0 ? t.view({3, t.size(0) / 3, t.size(1)}).sum(0) : t.view({t.size(0), 3, t.size(1) / 3}).sum(1);
}

}  // namespace

bool has_fp32_adapters(const at::Tensor& x, const at::Tensor& lora_A) {
  return is_16bit_float(x.scalar_type()) && lora_A.scalar_type() == at::kFloat;
}

at::Tensor mm_nt_exact(const at::Tensor& a, const at::Tensor& b) {
  return sum_blocks(at::mm(a, bf16_parts(b, 0).t(), at::kFloat), 1);
}

bool fp32_adapters_use_parts(const at::Tensor& x2d) {
  return use_bf16_parts(x2d);
}

std::pair<at::Tensor, at::Tensor> lora_fp32_adapters(const at::Tensor& x_lora2d, const at::Tensor& lora_A,
                                                     const at::Tensor& lora_B, bool parts) {
  // A bfloat16 x is exact: its products with A's three parts are A's float32 products. A float32 x
  // (PEFT's dropout of the upcast input) runs the small [T, r] GEMM in float32.
  const at::Tensor h = parts && x_lora2d.scalar_type() == at::kBFloat16 ? mm_nt_exact(x_lora2d, lora_A)
                                                                        : at::mm(x_lora2d.to(at::kFloat), lora_A.t());
  if (parts) {
    const auto [h6, b6] = six_products(h, 1, lora_B, 1);
    return {at::mm(h6, b6.t(), at::kFloat), h};
  }
  return {at::mm(h, lora_B.t()), h};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gemms_fp32_adapters(const at::Tensor& x2d, const at::Tensor& weight,
                                                                   const at::Tensor& lora_A, const at::Tensor& lora_B) {
  const at::Tensor base = at::mm(x2d, weight.t());  // rounded to x's dtype, as PEFT's base layer output
  auto [lora, h] = lora_fp32_adapters(x2d, lora_A, lora_B, use_bf16_parts(x2d));
  return {base, lora, h};
}

std::pair<at::Tensor, at::Tensor> compose_fp32_adapters(const at::Tensor& base, const at::Tensor& lora,
                                                        const at::Tensor& g, const std::optional<at::Tensor>& bias,
                                                        double scale, bool need_z) {
  at::Tensor z = at::add(base, lora, scale);  // float32
  at::Tensor y = at::empty_like(base);
  if (bias.has_value() && bias->defined()) {
    at::addcmul_out(y, *bias, z, g);  // one rounding of g z + bias
  } else {
    at::mul_out(y, z, g);
  }
  return {y, need_z ? z.to(base.scalar_type()) : at::Tensor()};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lora_backward_fp32_adapters(
    const at::Tensor& gy, const at::Tensor& g, const at::Tensor& x_lora2d, const at::Tensor& lora_A,
    const at::Tensor& lora_B, const at::Tensor& h, double scale, bool parts, bool need_gh, bool need_A, bool need_B) {
  // The gradient of h B^T is s g gy: gy is exact in x's dtype, so s g goes onto B's rows (grad of h)
  // and onto grad_B's rows instead of onto a float32 copy of gy.
  const at::Tensor sg = (g * scale).unsqueeze(1);  // [d_out, 1] float32
  at::Tensor gh, grad_A, grad_B;
  const bool x_exact = parts && x_lora2d.scalar_type() == at::kBFloat16;
  if (parts) {
    if (need_B) grad_B = mm_nt_exact(gy.t(), h.t()).mul_(sg);
    if (need_gh || need_A) gh = mm_nt_exact(gy, (lora_B * sg).t());  // [T, r]
  } else {
    if (need_B) grad_B = at::mm(gy.t().to(at::kFloat), h).mul_(sg);
    if (need_gh || need_A) gh = at::mm(gy.to(at::kFloat), lora_B * sg);
  }
  if (need_A) {
    grad_A = x_exact ? sum_blocks(at::mm(bf16_parts(gh, 1).t(), x_lora2d, at::kFloat), 0)
                     : at::mm(gh.t(), x_lora2d.to(at::kFloat));
  }
  return {gh, grad_A, grad_B};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_gemms_fp32_adapters(
    const at::Tensor& gy, const at::Tensor& gz, const at::Tensor& g, const at::Tensor& x2d, const at::Tensor& weight,
    const at::Tensor& lora_A, const at::Tensor& lora_B, const at::Tensor& h, double scale, bool need_x, bool need_A,
    bool need_B) {
  const bool parts = use_bf16_parts(x2d);
  auto [gh, grad_A, grad_B] =
      lora_backward_fp32_adapters(gy, g, x2d, lora_A, lora_B, h, scale, parts, need_x, need_A, need_B);
  at::Tensor grad_x;
  if (need_x) {
    if (parts) {
      const auto [gh6, a6] = six_products(gh, 1, lora_A, 0);
      grad_x = at::mm(gz, weight).addmm_(gh6, a6);
    } else {
      grad_x = at::mm(gz, weight).to(at::kFloat).addmm_(gh, lora_A).to(x2d.scalar_type());
    }
  }
  return {grad_x, grad_A, grad_B};
}

}  // namespace dora_ext
