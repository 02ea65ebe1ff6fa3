#pragma once
// Named tensors with string metadata in PyTorch's own file format: the zip archive
// that torch.save writes (a pickled dict, one record per storage), read and written
// through LibTorch's serialization (caffe2::serialize and the TorchScript unpickler),
// so Python opens the same files with torch.load(path, weights_only=True).
// dora_ext adapters and base weights are stored this way; see docs/CPP.md.
//
// The file holds {"metadata": {str: str}, "tensors": {str: Tensor}}.
#include <ATen/core/Tensor.h>

#include <map>
#include <string>

namespace dora_ext {

struct TensorFile {
  std::map<std::string, at::Tensor> tensors;    // contiguous CPU tensors owning their memory
  std::map<std::string, std::string> metadata;  // string to string
};

// Reads a whole file. Supported dtypes: float64, float32, float16, bfloat16, int64,
// int32, int16, int8, uint8, bool. A file that is not such an archive, a record that is
// missing or shorter than its tensor, an unexpected layout or value type, or any other
// malformed content throws c10::Error naming the file (never reads out of bounds).
TensorFile load_tensor_file(const std::string& path);

// Writes `tensors` (any device; copied to CPU, made contiguous) and `metadata`.
void save_tensor_file(const std::string& path, const std::map<std::string, at::Tensor>& tensors,
                      const std::map<std::string, std::string>& metadata = {});

}  // namespace dora_ext
