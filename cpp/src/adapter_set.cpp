// DoraAdapterSet: mixed-adapter batches in C++ with the adapters' precomputed norms.
#include "dora_ext/adapter.h"
#include "dora_ext/dora_ext.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

namespace dora_ext {

at::Tensor DoraAdapterSet::forward(const std::string& name, const at::Tensor& x, const at::Tensor& weight,
                                   const std::optional<at::Tensor>& bias, const at::Tensor& adapter_index) const {
  TORCH_CHECK(x.dim() >= 2, "DoraAdapterSet::forward: x must be [rows, ..., d_in], got shape ", x.sizes());
  TORCH_CHECK(adapter_index.dim() == 1 && adapter_index.size(0) == x.size(0),
              "DoraAdapterSet::forward: adapter_index must be [rows] = [", x.size(0), "], got shape ",
              adapter_index.sizes());
  TORCH_CHECK(adapter_index.scalar_type() == at::kLong || adapter_index.scalar_type() == at::kInt,
              "DoraAdapterSet::forward: adapter_index must be int64 or int32, got ", adapter_index.scalar_type());
  const int64_t count = static_cast<int64_t>(adapters.size());
  // Each adapter's rows are found on the host: one copy of a device index, no further device sync.
  const at::Tensor index = adapter_index.to(at::kCPU);
  if (index.numel() > 0) {
    const int64_t low = index.min().item<int64_t>(), high = index.max().item<int64_t>();
    TORCH_CHECK(low >= -1 && high < count, "DoraAdapterSet::forward: adapter_index holds ", low < -1 ? low : high,
                ", but the set has ", count, " adapters (valid: -1 for the base model, 0 .. ", count - 1, ")");
  }
  bool known = false;
  for (const DoraAdapter& a : adapters) known = known || a.layers.count(name) > 0;
  TORCH_CHECK(known || adapters.empty(), "DoraAdapterSet::forward: no adapter has a layer \"", name, "\"");

  const at::Tensor base = at::linear(x, weight);  // once for the whole batch
  at::Tensor out = base.clone();
  for (int64_t k = 0; k < count; ++k) {
    auto layer = adapters[k].layers.find(name);
    if (layer == adapters[k].layers.end()) continue;  // this adapter leaves the layer as it is
    const at::Tensor rows_k = (index == k).nonzero().view(-1);
    if (rows_k.numel() == 0) continue;
    const at::Tensor sel = rows_k.to(x.device());
    const DoraLayer& l = layer->second;
    const at::Tensor xk = x.index_select(0, sel), base_k = base.index_select(0, sel);
    const at::Tensor lora = at::linear(at::linear(xk, l.lora_A), l.lora_B);
    // DoraLayer::forward's stable delta with the precomputed norm, then + base
    out.index_copy_(0, sel, compose_delta(base_k, lora, l.magnitude, l.norm, l.scale).add_(base_k));
  }
  if (bias.has_value() && bias->defined()) out.add_(*bias);
  return out;
}

DoraAdapterSet DoraAdapterSet::to(c10::Device device, at::ScalarType dtype) const {
  DoraAdapterSet out;
  for (const DoraAdapter& a : adapters) out.adapters.push_back(a.to(device, dtype));
  return out;
}

DoraAdapterSet load_adapter_set(const std::vector<std::string>& paths) {
  DoraAdapterSet out;
  for (const std::string& path : paths) out.adapters.push_back(load_adapter(path));
  return out;
}

}  // namespace dora_ext
