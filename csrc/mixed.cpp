#include "mixed.h"

#include "eager.h"
#include "fp32_adapters.h"
#include "mixed_rows.h"
#include "norm_cache.h"
#include "tiered.h"

#include <ATen/ATen.h>

namespace dora_ext {

at::Tensor host_index(const at::Tensor& adapter_index) {
  return adapter_index.to(at::kCPU).to(at::kLong).contiguous();
}

std::vector<RowGroup> group_rows(const at::Tensor& adapter_index, int64_t adapters, const at::Device& device) {
  const at::Tensor index = host_index(adapter_index);
  const int64_t* k = index.const_data_ptr<int64_t>();
  std::vector<std::vector<int64_t>> members(adapters + 1);  // the base model's rows last
  for (int64_t i = 0; i < index.numel(); ++i) members[k[i] >= 0 ? k[i] : adapters].push_back(i);
  std::vector<RowGroup> groups;
  std::vector<int64_t> scattered;  // the row numbers of the groups that need a gather, back to back
  std::vector<size_t> offsets;
  for (int64_t a = 0; a <= adapters; ++a) {
    const std::vector<int64_t>& rows = members[a];
    if (rows.empty()) continue;
    const int64_t count = static_cast<int64_t>(rows.size());
    RowGroup g{a < adapters ? a : -1, rows.front(), count, rows.back() - rows.front() + 1 == count, {}};
    offsets.push_back(scattered.size());
    if (!g.consecutive) scattered.insert(scattered.end(), rows.begin(), rows.end());
    groups.push_back(std::move(g));
  }
  if (scattered.empty()) return groups;
  at::TensorOptions options = at::TensorOptions().dtype(at::kLong);
  if (device.is_cuda()) options = options.pinned_memory(true);
  at::Tensor host = at::empty({static_cast<int64_t>(scattered.size())}, options);
  std::copy(scattered.begin(), scattered.end(), host.mutable_data_ptr<int64_t>());
  const at::Tensor on_device = host.to(device, /*non_blocking=*/true);
  for (size_t i = 0; i < groups.size(); ++i) {
    if (!groups[i].consecutive) groups[i].rows = on_device.narrow(0, static_cast<int64_t>(offsets[i]), groups[i].count);
  }
  return groups;
}

namespace {

// One adapter on its rows, in place: z [T, d_out] holds their x W^T and becomes their output,
// computed as dora_linear's forward on those rows alone would (DoRA) or as base + s lora + bias
// (plain LoRA, no magnitude).
void adapter_rows(bool fused, const at::Tensor& x2d, const at::Tensor& z, const at::Tensor& weight,
                  const std::optional<at::Tensor>& bias, const at::Tensor& lora_A, const at::Tensor& lora_B,
                  const std::optional<at::Tensor>& magnitude, double scale) {
  const bool dora = magnitude.has_value() && magnitude->defined();
  at::Tensor g;
  if (dora) {
    const at::Tensor norm = row_norm_cached_on(fused, weight, lora_A, lora_B, scale, NormUse::Inference);
    g = cached_magnitude_scale(weight, *magnitude, norm);
  }
  if (has_fp32_adapters(x2d, lora_A)) {  // lora in float32, composed and rounded once
    const at::Tensor lora = lora_fp32_adapters(x2d, lora_A, lora_B, fp32_adapters_use_parts(x2d)).first;
    if (!g.defined()) g = at::ones({z.size(1)}, lora.options());
    compose_fp32_in_place_on(fused, z, lora, g, bias, scale);
    return;
  }
  z.addmm_(at::mm(x2d, lora_A.t()), lora_B.t(), /*beta=*/1, /*alpha=*/scale);  // z = x W^T + s h B^T
  if (dora) {
    scale_in_place_on(fused, z, g, bias);
  } else if (bias.has_value() && bias->defined()) {
    z.add_(*bias);
  }
}

}  // namespace

at::Tensor dora_linear_mixed_body(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                  at::TensorList lora_A, at::TensorList lora_B,
                                  const c10::List<std::optional<at::Tensor>>& magnitude, at::ArrayRef<double> scale,
                                  const at::Tensor& adapter_index, bool fused) {
  const int64_t rows = x.size(0), d_in = weight.size(1), d_out = weight.size(0);
  // [rows, tokens per row, d_in]: a 2-D x has one token per row.
  const at::Tensor x3 = x.reshape({rows, -1, d_in});
  const int64_t per_row = x3.size(1);
  // The base GEMM once for the whole batch, in x's dtype (as dora_linear's and PEFT's base output).
  const at::Tensor out = at::mm(x3.reshape({-1, d_in}), weight.t()).view({rows, per_row, d_out});
  const bool has_bias = bias.has_value() && bias->defined();
  for (const RowGroup& group : group_rows(adapter_index, static_cast<int64_t>(lora_A.size()), x.device())) {
    if (group.adapter < 0 && !has_bias) continue;  // the base output as it is
    const at::Tensor xk = group.consecutive ? x3.narrow(0, group.first, group.count) : x3.index_select(0, group.rows);
    at::Tensor z = group.consecutive ? out.narrow(0, group.first, group.count).view({-1, d_out})
                                     : out.index_select(0, group.rows).view({-1, d_out});
    if (group.adapter < 0) {
      z.add_(*bias);
    } else {
      const size_t a = static_cast<size_t>(group.adapter);
      adapter_rows(fused, xk.reshape({-1, d_in}), z, weight, bias, lora_A[a], lora_B[a], magnitude.get(a), scale[a]);
    }
    if (!group.consecutive) out.index_copy_(0, group.rows, z.view({-1, per_row, d_out}));
  }
  return out.view(output_shape(x, d_out));
}

}  // namespace dora_ext
