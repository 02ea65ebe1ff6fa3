#include "dora_ext/adapter.h"

#include "dora_ext/dora_ext.h"

#include <ATen/ops/linear.h>
#include <c10/util/Exception.h>

namespace dora_ext {
namespace {

at::ScalarType accumulate(at::ScalarType dtype) {
  return dtype == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace

at::Tensor DoraLayer::forward(const at::Tensor& x, const at::Tensor& weight,
                              const std::optional<at::Tensor>& bias) const {
  TORCH_CHECK(weight.dim() == 2 && weight.size(0) == lora_B.size(0) && weight.size(1) == lora_A.size(1),
              "DoraLayer::forward: weight must be [d_out, d_in] = [", lora_B.size(0), ", ", lora_A.size(1), "], got ",
              weight.sizes());
  at::Tensor base = at::linear(x, weight);
  at::Tensor lora = at::linear(at::linear(x, lora_A), lora_B);
  // The stable delta (g - 1) base + g s lora, then + base: never g (base + s lora) - base.
  at::Tensor out = compose_delta(base, lora, magnitude, norm, scale);
  out.add_(base);
  if (bias.has_value() && bias->defined()) out.add_(*bias);
  return out;
}

void DoraLayer::recompute_norm(const at::Tensor& weight) {
  norm = row_norm(weight, lora_A.to(weight.scalar_type()), lora_B.to(weight.scalar_type()), scale);
}

DoraLayer DoraLayer::to(c10::Device device, at::ScalarType dtype) const {
  const auto acc = at::TensorOptions().device(device).dtype(accumulate(dtype));
  const auto opts = at::TensorOptions().device(device).dtype(dtype);
  return DoraLayer{lora_A.to(opts), lora_B.to(opts), magnitude.to(acc), norm.to(acc), scale};
}

const DoraLayer& DoraAdapter::layer(const std::string& name) const {
  auto it = layers.find(name);
  if (it == layers.end()) {
    std::string known;
    for (const auto& [k, v] : layers) known += (known.empty() ? "" : ", ") + k;
    TORCH_CHECK(false, "DoraAdapter: no layer \"", name, "\" (the adapter has: ", known, ")");
  }
  return it->second;
}

DoraAdapter DoraAdapter::to(c10::Device device, at::ScalarType dtype) const {
  DoraAdapter out{{}, metadata};
  for (const auto& [name, l] : layers) out.layers.emplace(name, l.to(device, dtype));
  return out;
}

}  // namespace dora_ext
