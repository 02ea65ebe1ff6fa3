#include "mixed_stacked.h"

#include "adapter_stack.h"
#include "checks.h"
#include "eager.h"
#include "fused.h"
#include "fused_common.h"
#include "mixed_row_table.h"
#include "mixed_rows.h"
#include "norm_cache.h"

#include <ATen/ATen.h>

namespace dora_ext {
namespace {

// The stack of the call's adapters with each DoRA adapter's g = m / n (its norm through the cache, as
// on the per-adapter path; looked up only when the stack cannot vouch for its G, adapter_stack.h).
AdapterStack stacked_adapters(const at::Tensor& weight, at::TensorList lora_A, at::TensorList lora_B,
                              const c10::List<std::optional<at::Tensor>>& magnitude, at::ArrayRef<double> scale) {
  return stack_adapters(weight, lora_A, lora_B, magnitude, scale, [&] {
    std::vector<at::Tensor> g(lora_A.size());
    for (size_t k = 0; k < lora_A.size(); ++k) {
      const std::optional<at::Tensor> m = magnitude.get(k);
      if (!m.has_value() || !m->defined()) continue;
      const at::Tensor norm = row_norm_cached_fused(weight, lora_A[k], lora_B[k], scale[k], NormUse::Inference);
      g[k] = cached_magnitude_scale(weight, *m, norm);
    }
    return g;
  });
}

// h [T, R] for the many-token kernel, x3 [rows, per_row, d_in] (x2d: the same as [T, d_in]). 16-bit adapters: x
// A_cat^T, one GEMM (the products of other adapters' columns are cheap on tensor cores). Float32 adapters: each
// adapter's rows times its own columns only, as float32 GEMMs of x upcast (PEFT's products; the
// stacked GEMM would multiply that float32 work by the number of adapters); the entries a row does
// not own stay unwritten: the kernel never reads them.
at::Tensor stacked_h(const at::Tensor& x3, const at::Tensor& x2d, const AdapterStack& stack, at::TensorList lora_A,
                     const at::Tensor& adapter_index) {
  const int64_t d_in = x3.size(2), rank = stack.lora_A.size(0);
  if (stack.lora_A.scalar_type() != at::kFloat) return at::mm(x2d, stack.lora_A.t());
  const int64_t per_row = x3.size(1);
  at::Tensor h = at::empty({x3.size(0), per_row, rank}, x3.options().dtype(at::kFloat));
  for (const RowGroup& group : group_rows(adapter_index, static_cast<int64_t>(lora_A.size()), x3.device())) {
    if (group.adapter < 0) continue;
    const at::Tensor& a = lora_A[static_cast<size_t>(group.adapter)];
    const int64_t first_column = stack.columns[2 * static_cast<size_t>(group.adapter)], r = a.size(0);
    if (group.consecutive) {
      at::Tensor out = h.narrow(0, group.first, group.count).view({-1, rank}).narrow(1, first_column, r);
      at::mm_out(out, x3.narrow(0, group.first, group.count).reshape({-1, d_in}).to(at::kFloat), a.t());
    } else {
      const at::Tensor part = at::mm(x3.index_select(0, group.rows).reshape({-1, d_in}).to(at::kFloat), a.t());
      h.narrow(2, first_column, r).index_copy_(0, group.rows, part.view({group.count, per_row, r}));
    }
  }
  return h.view({-1, rank});
}

}  // namespace

bool mixed_stacked_serves(const at::Tensor& x, const at::Tensor& weight, at::TensorList lora_A) {
  const int64_t tokens = x.numel() / x.size(-1);  // d_in >= 1 (validated)
  if (!is_16bit_float(x.scalar_type()) || tokens <= 0 || weight.stride(1) != 1) return false;
  if (lora_A.empty()) return false;
  const at::ScalarType adapter_dtype = lora_A[0].scalar_type();
  if (adapter_dtype != x.scalar_type() && adapter_dtype != at::kFloat) return false;
  for (const at::Tensor& a : lora_A) {
    if (a.scalar_type() != adapter_dtype) return false;  // one stack, one dtype
  }
  return true;
}

at::Tensor mixed_decode_forward(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                at::TensorList lora_A, at::TensorList lora_B,
                                const c10::List<std::optional<at::Tensor>>& magnitude, at::ArrayRef<double> scale,
                                const at::Tensor& adapter_index) {
  const int64_t d_out = weight.size(0), d_in = weight.size(1);
  const at::Tensor x2d = as_rows(x);
  const int64_t tokens = x2d.size(0);
  const AdapterStack stack = stacked_adapters(weight, lora_A, lora_B, magnitude, scale);
  const at::Tensor rows = row_table(adapter_index, tokens / x.size(0), stack.columns, scale, x.device());
  // Float32 adapters: h from x upcast, in float32, as PEFT computes it (decode_forward does the same).
  const at::Tensor h = at::mm(x2d.to(stack.lora_A.scalar_type()), stack.lora_A.t());
  const at::Tensor b = bias.has_value() && bias->defined() ? bias->contiguous() : at::Tensor();
  const int64_t rank = stack.lora_A.size(0);
  at::Tensor y = at::empty({tokens, d_out}, x.options());
  const bool aligned = all_aligned16({&x2d, &weight, &h, &stack.lora_B, &stack.g, &b, &y},
                                     {d_out, d_in, rank, x2d.stride(0), weight.stride(0), h.stride(0),
                                      stack.lora_B.stride(0), stack.g.stride(0), y.stride(0)});
  const c10::DeviceIndex device = x.device().index();
  const KernelImage& k =
      kernel_for(kernels::MixedDecode{x.scalar_type(), stack.lora_B.scalar_type(), b.defined(), aligned}, device);
  launch(k, device, {cdiv(d_out, k.tile_cols), cdiv(tokens, k.tile_rows), 1},
         {x2d, weight, h, stack.lora_B, stack.g, rows, b.defined() ? KernelArg(b) : KernelArg::null_pointer(), y,
          tokens, d_out, d_in, rank, x2d.stride(0), weight.stride(0), h.stride(0), stack.lora_B.stride(0),
          stack.g.stride(0), y.stride(0)});
  return y.view(output_shape(x, d_out));
}

bool mixed_lora_serves(const at::Tensor& weight, at::TensorList lora_A) {
  return 2 * stacked_rank(lora_A) <= weight.size(0);
}

at::Tensor mixed_lora_forward(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                              at::TensorList lora_A, at::TensorList lora_B,
                              const c10::List<std::optional<at::Tensor>>& magnitude, at::ArrayRef<double> scale,
                              const at::Tensor& adapter_index) {
  const int64_t rows = x.size(0), d_out = weight.size(0), d_in = weight.size(1);
  const at::Tensor x3 = x.reshape({rows, -1, d_in});  // [rows, tokens per row, d_in]
  const int64_t per_row = x3.size(1), tokens = rows * per_row;
  const AdapterStack stack = stacked_adapters(weight, lora_A, lora_B, magnitude, scale);
  const at::Tensor table = row_table(adapter_index, /*repeat=*/1, stack.columns, scale, x.device());
  // The base GEMM once for the whole batch, in x's dtype (as dora_linear's and PEFT's base output);
  // the kernel writes the result over it.
  const at::Tensor x2d = x3.reshape({-1, d_in});
  const at::Tensor z = at::mm(x2d, weight.t());
  const at::Tensor h = stacked_h(x3, x2d, stack, lora_A, adapter_index);
  const at::Tensor b = bias.has_value() && bias->defined() ? bias->contiguous() : at::Tensor();
  const bool aligned = all_aligned16({&z, &h, &stack.lora_B, &stack.g, &b},
                                     {d_out, z.stride(0), h.stride(0), stack.lora_B.stride(0), stack.g.stride(0)});
  const c10::DeviceIndex device = x.device().index();
  const KernelImage& k =
      kernel_for(kernels::MixedLora{x.scalar_type(), stack.lora_B.scalar_type(), b.defined(), aligned}, device);
  launch(k, device, {cdiv(tokens, k.tile_rows), cdiv(d_out, k.tile_cols), 1},
         {z, h, stack.lora_B, stack.g, table, b.defined() ? KernelArg(b) : KernelArg::null_pointer(), z, tokens, d_out,
          per_row, z.stride(0), h.stride(0), stack.lora_B.stride(0), stack.g.stride(0), z.stride(0)});
  return z.view(output_shape(x, d_out));
}

}  // namespace dora_ext
