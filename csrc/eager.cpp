#include "eager.h"

#include "checks.h"
#include "fp32_adapters.h"
#include "norm_cache.h"

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>

namespace dora_ext {
namespace {

// Rows of a low-precision weight upcast at a time (CPU; CUDA for a float16 weight
// with float32 adapters): bounds the transient fp32 copy to kUpcastChunkRows x d_in
// instead of d_out x d_in.
constexpr int64_t kUpcastChunkRows = 1024;

// (a b^T) with products accumulated and returned in `acc`, never materialising
// an upcast copy of `a`: cuBLAS takes 16-bit inputs with fp32 output; CPU
// upcasts a row chunk at a time. Also returns the row sums of squares of `a`
// when `row_sq` is given (the same pass over the weight). `b` may be float32
// with a 16-bit `a` (float32 adapters): on CUDA a bfloat16 `a` meets the three
// exact bfloat16 parts of b in one tensor-core GEMM (bf16 x bf16 products are
// exact in fp32), anything else takes the row-chunk path.
at::Tensor matmul_nt_acc(const at::Tensor& a, const at::Tensor& b, at::ScalarType acc, at::Tensor* row_sq) {
  const bool same_dtype = b.scalar_type() == a.scalar_type();
  const bool bf16_with_fp32 = a.scalar_type() == at::kBFloat16 && b.scalar_type() == at::kFloat;
  if (a.scalar_type() == acc || (a.is_cuda() && (same_dtype || bf16_with_fp32))) {  // one GEMM over all of a
    if (row_sq) *row_sq = at::linalg_vector_norm(a, 2, {1}, false, acc).square_();
    if (a.scalar_type() == acc) return at::mm(a, b.t());
    if (same_dtype) return at::mm(a, b.t(), acc);
    return mm_nt_exact(a, b);
  }
  const at::Tensor b_acc = b.to(acc);
  at::Tensor out = at::empty({a.size(0), b.size(0)}, a.options().dtype(acc));
  if (row_sq) *row_sq = at::empty({a.size(0)}, a.options().dtype(acc));
  for (int64_t start = 0; start < a.size(0); start += kUpcastChunkRows) {
    const int64_t len = std::min(kUpcastChunkRows, a.size(0) - start);
    const at::Tensor chunk = a.narrow(0, start, len).to(acc);
    at::Tensor out_rows = out.narrow(0, start, len);
    at::mm_out(out_rows, chunk, b_acc.t());
    if (row_sq) {
      at::Tensor sq_rows = row_sq->narrow(0, start, len);
      at::sum_out(sq_rows, chunk.square(), {1});
    }
  }
  return out;
}

}  // namespace

at::Tensor no_grad_placeholder(const at::Tensor& like) {
  return at::empty({0}, like.options());
}

at::Tensor as_rows(const at::Tensor& t) {
  at::Tensor rows = t.reshape({-1, t.size(-1)});
  return rows.stride(1) == 1 || rows.size(1) <= 1 ? rows : rows.contiguous();
}

std::vector<int64_t> output_shape(const at::Tensor& x, int64_t d_out) {
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = d_out;
  return shape;
}

at::Tensor row_norm_eager_parts(const at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B,
                                double scale, const at::Tensor& cached_weight_sq, at::Tensor* weight_sq) {
  return norm_from_squared(row_norm_sq_eager(weight, lora_A, lora_B, scale, cached_weight_sq, weight_sq));
}

at::Tensor norm_from_squared(at::Tensor squared) {
  return squared.clamp_min_(kNormEpsilon * kNormEpsilon).sqrt_();
}

at::Tensor row_norm_sq_eager(const at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B, double scale,
                             const at::Tensor& cached_weight_sq, at::Tensor* weight_sq) {
  const at::ScalarType acc = accumulate_type(weight.scalar_type());
  at::Tensor w_sq = cached_weight_sq;
  const at::Tensor u = matmul_nt_acc(weight, lora_A, acc, w_sq.defined() ? nullptr : &w_sq);  // W A^T [d_out, r]
  if (weight_sq != nullptr && !cached_weight_sq.defined()) *weight_sq = w_sq;
  const at::Tensor gram = matmul_nt_acc(lora_A, lora_A, acc, nullptr);  // A A^T  [r, r]
  const at::Tensor b = lora_B.to(acc);
  const at::Tensor cross = (b * u).sum(1);
  const at::Tensor quad = (at::mm(b, gram) * b).sum(1);
  return at::add(w_sq, cross, 2.0 * scale).add_(quad, scale * scale);  // never in place on a cached w_sq
}

at::Tensor row_norm_cached_eager(const at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B,
                                 double scale, NormUse use) {
  return cached_row_norm(weight, lora_A, lora_B, scale, use, [&](const at::Tensor& cached_wsq, at::Tensor* wsq) {
    return row_norm_eager_parts(weight, lora_A, lora_B, scale, cached_wsq, wsq);
  });
}

NormUse row_norm_use(const at::Tensor& lora_A, const at::Tensor& lora_B) {
  const bool recording = at::GradMode::is_enabled() && (lora_A.requires_grad() || lora_B.requires_grad());
  return recording ? NormUse::Recording : NormUse::Inference;
}

namespace {

// Rows whose norm was clamped: W_i + s (B A)_i is zero.
at::Tensor zero_rows(const at::Tensor& norm) {
  return norm <= kNormEpsilon;
}

}  // namespace

at::Tensor magnitude_scale(const at::Tensor& magnitude, const at::Tensor& norm) {
  return (magnitude.to(norm.scalar_type()) / norm).masked_fill_(zero_rows(norm), 0.0);
}

at::Tensor magnitude_scale_minus_one(const at::Tensor& magnitude, const at::Tensor& norm) {
  return ((magnitude.to(norm.scalar_type()) - norm) / norm).masked_fill_(zero_rows(norm), -1.0);
}

std::pair<at::Tensor, at::Tensor> lora_and_base(const at::Tensor& x2d, const at::Tensor& weight,
                                                const at::Tensor& lora_A, const at::Tensor& lora_B, double scale) {
  at::Tensor h = at::mm(x2d, lora_A.t());
  at::Tensor z = at::mm(x2d, weight.t());
  z.addmm_(h, lora_B.t(), /*beta=*/1, /*alpha=*/scale);
  return {h, z};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_gemms(const at::Tensor& gy, const at::Tensor& gz,
                                                              const at::Tensor& g, const at::Tensor& x2d,
                                                              const at::Tensor& weight, const at::Tensor& lora_A,
                                                              const at::Tensor& lora_B, const at::Tensor& h,
                                                              double scale, bool need_x, bool need_A, bool need_B) {
  if (has_fp32_adapters(x2d, lora_A)) {
    return backward_gemms_fp32_adapters(gy, gz, g, x2d, weight, lora_A, lora_B, h, scale, need_x, need_A, need_B);
  }
  at::Tensor grad_x, grad_A, grad_B;
  if (need_x || need_A) {
    const at::Tensor gz_b = at::mm(gz, lora_B);  // [T, r]
    if (need_x) grad_x = at::mm(gz, weight).addmm_(gz_b, lora_A, /*beta=*/1, /*alpha=*/scale);
    if (need_A) grad_A = at::mm(gz_b.t(), x2d).mul_(scale);
  }
  if (need_B) grad_B = at::mm(gz.t(), h).mul_(scale);
  return {grad_x, grad_A, grad_B};
}

namespace {

// The eager forward: {y, z (when `keep_z`: the training forward's magnitude gradient reads it), h, norm}.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward_eager(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias, const at::Tensor& lora_A,
    const at::Tensor& lora_B, const at::Tensor& magnitude, double scale, NormUse use, bool keep_z) {
  const at::Tensor norm = row_norm_cached_eager(weight, lora_A, lora_B, scale, use);
  const std::vector<int64_t> y_shape = output_shape(x, weight.size(0));
  if (has_fp32_adapters(x, lora_A)) {
    auto [base, lora, h] = gemms_fp32_adapters(as_rows(x), weight, lora_A, lora_B);
    auto [y, z] =
        compose_fp32_adapters(base, lora, cached_magnitude_scale(weight, magnitude, norm), bias, scale, keep_z);
    return {y.view(y_shape), z, h, norm};
  }
  auto [h, z] = lora_and_base(as_rows(x), weight, lora_A, lora_B, scale);
  at::Tensor out = z * cached_magnitude_scale(weight, magnitude, norm);  // promotes to the accumulate dtype
  if (bias.has_value() && bias->defined()) out.add_(*bias);
  return {out.to(x.scalar_type()).view(y_shape), keep_z ? z : at::Tensor(), h, norm};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dora_linear_forward_eager(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias, const at::Tensor& lora_A,
    const at::Tensor& lora_B, const at::Tensor& magnitude, double scale, bool keep_z) {
  return forward_eager(x, weight, bias, lora_A, lora_B, magnitude, scale, NormUse::Recording, keep_z);
}

at::Tensor dora_linear_eager(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                             const at::Tensor& lora_A, const at::Tensor& lora_B, const at::Tensor& magnitude,
                             double scale) {
  return std::get<0>(
      forward_eager(x, weight, bias, lora_A, lora_B, magnitude, scale, NormUse::Inference, /*keep_z=*/false));
}

at::Tensor compose_delta_eager(const at::Tensor& base, const at::Tensor& lora, const at::Tensor& magnitude,
                               const at::Tensor& norm, double scale) {
  const at::Tensor g = magnitude_scale(magnitude, norm);
  // (g - 1) * base + g * s * lora: never g * (base + s * lora) - base, which
  // cancels when g is close to 1.
  return (magnitude_scale_minus_one(magnitude, norm) * base + (g * scale) * lora)
      .to(at::promote_types(base.scalar_type(), lora.scalar_type()));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> compose_delta_backward_eager(
    const at::Tensor& grad_out, const at::Tensor& base, const at::Tensor& lora, const at::Tensor& magnitude,
    const at::Tensor& norm, double scale, std::array<bool, 3> mask) {
  const at::Tensor g = magnitude_scale(magnitude, norm);
  at::Tensor grad_base, grad_lora, grad_m;
  if (mask[0]) grad_base = (grad_out * magnitude_scale_minus_one(magnitude, norm)).to(base.scalar_type());
  if (mask[1]) grad_lora = (grad_out * (g * scale)).to(lora.scalar_type());
  if (mask[2]) {
    const at::ScalarType acc = norm.scalar_type();
    const at::Tensor z = base.to(acc) + lora.to(acc) * scale;
    grad_m = ((as_rows(grad_out).to(acc) * as_rows(z)).sum(0) / norm).to(magnitude.scalar_type());
  }
  return {mask[0] ? grad_base : no_grad_placeholder(base), mask[1] ? grad_lora : no_grad_placeholder(lora),
          mask[2] ? grad_m : no_grad_placeholder(magnitude)};
}

}  // namespace dora_ext
