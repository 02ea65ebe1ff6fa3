#include "dora_ext/safetensors.h"

#include "json.h"

#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstring>
#include <fstream>
#include <tuple>
#include <vector>

namespace dora_ext {
namespace {

// The format is little-endian; so is every platform LibTorch ships for.
static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "safetensors I/O assumes a little-endian host");

// Headers above this are refused before allocating (the reference implementation's limit).
constexpr uint64_t kMaxHeaderBytes = 100u << 20;

const std::vector<std::pair<std::string, at::ScalarType>>& dtype_names() {
  static const std::vector<std::pair<std::string, at::ScalarType>> names = {
      {"F64", at::kDouble}, {"F32", at::kFloat}, {"F16", at::kHalf}, {"BF16", at::kBFloat16}, {"I64", at::kLong},
      {"I32", at::kInt},    {"I16", at::kShort}, {"I8", at::kChar},  {"U8", at::kByte},       {"BOOL", at::kBool}};
  return names;
}

at::ScalarType parse_dtype(const std::string& name, const std::string& where) {
  for (const auto& [n, t] : dtype_names()) {
    if (n == name) return t;
  }
  TORCH_CHECK(false, where, ": unsupported dtype \"", name,
              "\" (supported: F64, F32, F16, BF16, I64, I32, I16, I8, U8, BOOL)");
}

std::string dtype_name(at::ScalarType type, const std::string& key) {
  for (const auto& [n, t] : dtype_names()) {
    if (t == type) return n;
  }
  TORCH_CHECK(false, "save_safetensors: tensor \"", key, "\" has dtype ", type,
              ", which safetensors I/O does not support");
}

int64_t header_int(const json::Value& v, const std::string& where) {
  TORCH_CHECK(v.kind == json::Value::Kind::Integer && v.integer >= 0, where, " must be a non-negative integer");
  return v.integer;
}

}  // namespace

SafetensorsFile load_safetensors(const std::string& path) {
  std::ifstream in(path, std::ios::binary | std::ios::ate);
  TORCH_CHECK(in.good(), "load_safetensors: cannot open ", path);
  const auto file_size = static_cast<uint64_t>(in.tellg());
  in.seekg(0);
  TORCH_CHECK(file_size >= 8, "load_safetensors: ", path, " is ", file_size, " bytes, too short for a header");
  unsigned char size_bytes[8];
  in.read(reinterpret_cast<char*>(size_bytes), 8);
  uint64_t header_size = 0;
  for (int i = 7; i >= 0; --i) header_size = (header_size << 8) | size_bytes[i];
  TORCH_CHECK(header_size <= kMaxHeaderBytes && header_size <= file_size - 8, "load_safetensors: ", path,
              " declares a header of ", header_size, " bytes, but the file has ", file_size, " bytes");
  std::string header(header_size, '\0');
  in.read(header.data(), static_cast<std::streamsize>(header_size));
  TORCH_CHECK(in.good(), "load_safetensors: cannot read the header of ", path);
  const uint64_t data_size = file_size - 8 - header_size;

  const json::Value root = json::parse(header, "load_safetensors: header of " + path);
  TORCH_CHECK(root.kind == json::Value::Kind::Object, "load_safetensors: the header of ", path,
              " is not a JSON object");

  SafetensorsFile out;
  std::vector<std::tuple<uint64_t, uint64_t, std::string>> ranges;
  for (const auto& [key, entry] : root.object) {
    const std::string where = "load_safetensors: " + path + ": \"" + key + "\"";
    TORCH_CHECK(entry.kind == json::Value::Kind::Object, where, " must map to a JSON object");
    if (key == "__metadata__") {
      for (const auto& [mk, mv] : entry.object) {
        TORCH_CHECK(mv.kind == json::Value::Kind::String, where, ": metadata value of \"", mk, "\" must be a string");
        out.metadata[mk] = mv.string;
      }
      continue;
    }
    TORCH_CHECK(out.tensors.count(key) == 0, where, " appears twice");
    const json::Value* dtype = entry.find("dtype");
    const json::Value* shape = entry.find("shape");
    const json::Value* offsets = entry.find("data_offsets");
    TORCH_CHECK(dtype && dtype->kind == json::Value::Kind::String, where, " needs a string \"dtype\"");
    TORCH_CHECK(shape && shape->kind == json::Value::Kind::Array, where, " needs an array \"shape\"");
    TORCH_CHECK(offsets && offsets->kind == json::Value::Kind::Array && offsets->array.size() == 2, where,
                " needs \"data_offsets\": [begin, end]");
    const at::ScalarType type = parse_dtype(dtype->string, where);
    std::vector<int64_t> sizes;
    uint64_t numel = 1;
    for (const auto& dim : shape->array) {
      const int64_t d = header_int(dim, where + " shape entry");
      sizes.push_back(d);
      TORCH_CHECK(d == 0 || numel <= data_size / static_cast<uint64_t>(d), where, " has a shape larger than the file");
      numel *= static_cast<uint64_t>(d);
    }
    const auto begin = static_cast<uint64_t>(header_int(offsets->array[0], where + " data_offsets[0]"));
    const auto end = static_cast<uint64_t>(header_int(offsets->array[1], where + " data_offsets[1]"));
    TORCH_CHECK(begin <= end && end <= data_size, where, " has byte range [", begin, ", ", end,
                ") outside the data section of ", data_size, " bytes");
    const uint64_t nbytes = numel * c10::elementSize(type);
    TORCH_CHECK(end - begin == nbytes, where, " has ", end - begin, " bytes, but ", dtype->string, " of shape ",
                c10::IntArrayRef(sizes), " needs ", nbytes);
    at::Tensor t = at::empty(sizes, at::TensorOptions().dtype(type));
    if (nbytes > 0) {
      in.seekg(static_cast<std::streamoff>(8 + header_size + begin));
      in.read(static_cast<char*>(t.data_ptr()), static_cast<std::streamsize>(nbytes));
      TORCH_CHECK(in.good(), where, ": read failed");
    }
    ranges.emplace_back(begin, end, key);
    out.tensors.emplace(key, std::move(t));
  }
  std::sort(ranges.begin(), ranges.end());
  for (size_t i = 1; i < ranges.size(); ++i) {
    TORCH_CHECK(std::get<0>(ranges[i]) >= std::get<1>(ranges[i - 1]), "load_safetensors: ", path, ": tensors \"",
                std::get<2>(ranges[i - 1]), "\" and \"", std::get<2>(ranges[i]), "\" overlap");
  }
  return out;
}

void save_safetensors(const std::string& path, const std::map<std::string, at::Tensor>& tensors,
                      const std::map<std::string, std::string>& metadata) {
  std::vector<at::Tensor> data;
  std::string header = "{";
  if (!metadata.empty()) {
    header += "\"__metadata__\":{";
    bool first = true;
    for (const auto& [k, v] : metadata) {
      header += (first ? "" : ",") + json::quote(k) + ":" + json::quote(v);
      first = false;
    }
    header += "}";
  }
  uint64_t offset = 0;
  for (const auto& [key, tensor] : tensors) {
    TORCH_CHECK(key != "__metadata__", "save_safetensors: \"__metadata__\" is reserved and cannot name a tensor");
    TORCH_CHECK(tensor.defined(), "save_safetensors: tensor \"", key, "\" is undefined");
    at::Tensor t = tensor.to(at::kCPU).contiguous();
    const uint64_t nbytes = static_cast<uint64_t>(t.numel()) * t.element_size();
    header += (header.size() > 1 ? "," : "") + json::quote(key) + ":{\"dtype\":\"" + dtype_name(t.scalar_type(), key) +
              "\",\"shape\":[";
    for (int64_t d = 0; d < t.dim(); ++d) header += (d ? "," : "") + std::to_string(t.size(d));
    header += "],\"data_offsets\":[" + std::to_string(offset) + "," + std::to_string(offset + nbytes) + "]}";
    offset += nbytes;
    data.push_back(std::move(t));
  }
  header += "}";
  header.append((8 - header.size() % 8) % 8, ' ');  // the data section starts 8-byte aligned

  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  TORCH_CHECK(out.good(), "save_safetensors: cannot open ", path, " for writing");
  uint64_t size = header.size();
  unsigned char size_bytes[8];
  for (int i = 0; i < 8; ++i) size_bytes[i] = static_cast<unsigned char>(size >> (8 * i));
  out.write(reinterpret_cast<const char*>(size_bytes), 8);
  out.write(header.data(), static_cast<std::streamsize>(header.size()));
  for (const at::Tensor& t : data) {
    out.write(static_cast<const char*>(t.data_ptr()), static_cast<std::streamsize>(t.numel() * t.element_size()));
  }
  TORCH_CHECK(out.good(), "save_safetensors: writing ", path, " failed");
}

}  // namespace dora_ext
