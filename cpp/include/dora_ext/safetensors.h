#pragma once
// Reading and writing safetensors files (https://github.com/huggingface/safetensors
// format: an 8-byte little-endian header length, a JSON header naming each
// tensor's dtype, shape and byte range, then the raw little-endian bytes).
// dora_ext adapters and base weights are stored this way; see docs/CPP.md.
#include <ATen/core/Tensor.h>

#include <map>
#include <string>

namespace dora_ext {

struct SafetensorsFile {
  std::map<std::string, at::Tensor> tensors;    // contiguous CPU tensors owning their memory
  std::map<std::string, std::string> metadata;  // the header's "__metadata__" (string to string)
};

// Reads a whole file. Supported dtypes: F64, F32, F16, BF16, I64, I32, I16, I8,
// U8, BOOL. Any malformed header, out-of-range or overlapping byte range, or
// size that does not match dtype x shape throws c10::Error naming the file.
SafetensorsFile load_safetensors(const std::string& path);

// Writes `tensors` (any device; copied to CPU, made contiguous) and `metadata`.
void save_safetensors(const std::string& path, const std::map<std::string, at::Tensor>& tensors,
                      const std::map<std::string, std::string>& metadata = {});

}  // namespace dora_ext
