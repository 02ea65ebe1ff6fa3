#pragma once
// Whether the current CUDA stream of a tensor's device is being captured into a CUDA graph. Work
// done while capturing is replayed without the host: nothing may read device data on the host
// (a device-to-host copy is illegal), and nothing computed then may be kept for later calls.
#include <ATen/core/Tensor.h>

namespace dora_ext {

// False for CPU tensors and devices, and in builds without CUDA.
bool stream_capturing(const at::Device& device);
bool stream_capturing(const at::Tensor& t);

}  // namespace dora_ext
