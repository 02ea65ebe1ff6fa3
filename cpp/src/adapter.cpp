#include "dora_ext/adapter.h"

#include "dora_ext/dora_ext.h"
#include "dora_ext/safetensors.h"

#include <ATen/ops/linear.h>
#include <c10/util/Exception.h>

#include <array>

namespace dora_ext {
namespace {

constexpr std::array<const char*, 5> kParts = {"lora_A", "lora_B", "magnitude", "norm", "scale"};

at::ScalarType accumulate(at::ScalarType dtype) {
  return dtype == at::kDouble ? at::kDouble : at::kFloat;
}

void check_layer(const std::string& where, const DoraLayer& l) {
  TORCH_CHECK(l.lora_A.dim() == 2 && l.lora_B.dim() == 2, where, ": lora_A and lora_B must be 2-D, got ",
              l.lora_A.sizes(), " and ", l.lora_B.sizes());
  const int64_t r = l.lora_A.size(0), d_out = l.lora_B.size(0);
  TORCH_CHECK(l.lora_B.size(1) == r, where, ": lora_B must be [d_out, r] with r = ", r, " (lora_A is ",
              l.lora_A.sizes(), "), got ", l.lora_B.sizes());
  TORCH_CHECK(l.magnitude.dim() == 1 && l.magnitude.size(0) == d_out, where, ": magnitude must be [", d_out, "], got ",
              l.magnitude.sizes());
  TORCH_CHECK(l.norm.dim() == 1 && l.norm.size(0) == d_out, where, ": norm must be [", d_out, "], got ",
              l.norm.sizes());
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

DoraAdapter load_adapter(const std::string& path) {
  SafetensorsFile file = load_safetensors(path);
  auto format = file.metadata.find("format");
  auto version = file.metadata.find("format_version");
  TORCH_CHECK(format != file.metadata.end() && format->second == kAdapterFormat, "load_adapter: ", path,
              " is not a dora_ext adapter (metadata \"format\" must be \"", kAdapterFormat,
              "\"; write it with dora_ext.export.save_adapter)");
  TORCH_CHECK(version != file.metadata.end() && version->second == kAdapterFormatVersion, "load_adapter: ", path,
              " has format_version \"", version == file.metadata.end() ? "" : version->second,
              "\"; this reader understands \"", kAdapterFormatVersion, "\"");

  std::map<std::string, std::map<std::string, at::Tensor>> parts;
  for (auto& [key, tensor] : file.tensors) {
    const auto dot = key.rfind('.');
    const std::string part = dot == std::string::npos ? key : key.substr(dot + 1);
    bool known = false;
    for (const char* p : kParts) known = known || part == p;
    TORCH_CHECK(known && dot != std::string::npos && dot > 0, "load_adapter: ", path, ": unexpected tensor \"", key,
                "\" (expected <layer>.{lora_A,lora_B,magnitude,norm,scale})");
    parts[key.substr(0, dot)][part] = tensor;
  }
  DoraAdapter out;
  out.metadata = std::move(file.metadata);
  for (auto& [name, p] : parts) {
    const std::string where = "load_adapter: " + path + ": layer \"" + name + "\"";
    for (const char* part : kParts) {
      TORCH_CHECK(p.count(part), where, " has no \"", name, ".", part, "\"");
    }
    TORCH_CHECK(p["scale"].numel() == 1, where, ": scale must hold one number, got shape ", p["scale"].sizes());
    DoraLayer l{p["lora_A"], p["lora_B"], p["magnitude"], p["norm"], p["scale"].to(at::kDouble).item<double>()};
    check_layer(where, l);
    out.layers.emplace(name, std::move(l));
  }
  TORCH_CHECK(!out.layers.empty(), "load_adapter: ", path, " holds no layers");
  return out;
}

}  // namespace dora_ext
