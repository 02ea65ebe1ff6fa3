// load_adapter: an adapter file (dora_ext.export.save_adapter) into checked DoraLayers.
// Kept apart from the layer's forward so that the loader builds and is fuzzed on its own.
#include "dora_ext/adapter.h"
#include "dora_ext/tensor_file.h"

#include <c10/util/Exception.h>

#include <array>
#include <cmath>

namespace dora_ext {
namespace {

constexpr std::array<const char*, 5> kParts = {"lora_A", "lora_B", "magnitude", "norm", "scale"};

bool is_float(const at::Tensor& t) {
  return at::isFloatingType(t.scalar_type());
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
  TORCH_CHECK(l.lora_A.scalar_type() == l.lora_B.scalar_type() && is_float(l.lora_A), where,
              ": lora_A and lora_B must share one floating dtype, got ", l.lora_A.scalar_type(), " and ",
              l.lora_B.scalar_type());
  TORCH_CHECK(is_float(l.magnitude) && is_float(l.norm), where, ": magnitude and norm must be floating, got ",
              l.magnitude.scalar_type(), " and ", l.norm.scalar_type());
  TORCH_CHECK(std::isfinite(l.scale), where, ": scale must be finite, got ", l.scale);
}

}  // namespace

DoraAdapter load_adapter(const std::string& path) {
  TensorFile file = load_tensor_file(path);
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
    TORCH_CHECK(p["scale"].numel() == 1 && is_float(p["scale"]), where,
                ": scale must hold one floating number, got shape ", p["scale"].sizes(), " of ",
                p["scale"].scalar_type());
    DoraLayer l{p["lora_A"], p["lora_B"], p["magnitude"], p["norm"], p["scale"].to(at::kDouble).item<double>()};
    check_layer(where, l);
    out.layers.emplace(name, std::move(l));
  }
  TORCH_CHECK(!out.layers.empty(), "load_adapter: ", path, " holds no layers");
  return out;
}

}  // namespace dora_ext
