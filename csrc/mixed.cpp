#include "mixed.h"

#include "eager.h"
#include "fp32_adapters.h"
#include "tiered.h"

#include <ATen/ATen.h>

namespace dora_ext {
at::Tensor dora_linear_mixed_body(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                  at::TensorList lora_A, at::TensorList lora_B,
                                  const c10::List<std::optional<at::Tensor>>& magnitude, at::ArrayRef<double> scale,
                                  const at::Tensor& adapter_index, bool fused) {
  const int64_t rows = x.size(0), d_in = weight.size(1), d_out = weight.size(0);
  // [rows, tokens per row, d_in]: a 2-D x has one token per row.
  const at::Tensor x3 = x.reshape({rows, -1, d_in});
  const int64_t per_row = x3.size(1);
  // The base GEMM once for the whole batch, in x's dtype (as dora_linear's and PEFT's base output).
  at::Tensor out = at::mm(x3.reshape({-1, d_in}), weight.t()).view({rows, per_row, d_out});
  // The rows of each adapter, found on the host (PEFT passes the index on the CPU): no device
  // synchronisation per adapter; each group's row list is copied to x's device once.
  const at::Tensor index = adapter_index.to(at::kCPU);
  for (size_t k = 0; k < lora_A.size(); ++k) {
    const at::Tensor rows_k = (index == static_cast<int64_t>(k)).nonzero().view(-1);
    if (rows_k.numel() == 0) continue;
    const at::Tensor sel = rows_k.to(x.device(), /*non_blocking=*/false);
    const at::Tensor xk = x3.index_select(0, sel).reshape({-1, d_in});
    const at::Tensor base_k = out.index_select(0, sel).view({-1, d_out});
    at::Tensor lora;
    if (has_fp32_adapters(x, lora_A[k])) {
      lora = lora_fp32_adapters(xk, lora_A[k], lora_B[k], fp32_adapters_use_parts(xk)).first;
    } else {
      lora = at::mm(at::mm(xk, lora_A[k].t()), lora_B[k].t());
    }
    const std::optional<at::Tensor> m = magnitude.get(k);
    at::Tensor d;
    if (m.has_value() && m->defined()) {  // DoRA: (g - 1) base + g s lora, this adapter's norm
      const at::Tensor norm = row_norm_cached_on(fused, weight, lora_A[k], lora_B[k], scale[k], NormUse::Inference);
      d = compose_delta_on(fused, base_k, lora, *m, norm, scale[k]);
    } else {  // plain LoRA: s lora
      d = lora.mul_(scale[k]);
    }
    // base + delta in the delta's dtype, rounded once to x's dtype, back into the rows of adapter k.
    out.index_copy_(0, sel, d.add_(base_k).to(x.scalar_type()).view({-1, per_row, d_out}));
  }
  if (bias.has_value() && bias->defined()) out.add_(*bias);
  return out.view(output_shape(x, d_out));
}

}  // namespace dora_ext
