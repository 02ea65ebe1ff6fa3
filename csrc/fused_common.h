#pragma once
// Small helpers the CUDA impls share when choosing and launching AOT kernels.
#include "launcher.h"

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <initializer_list>
#include <string>

namespace dora_ext {

// The dtype part of a kernel variant name ("fp16", "bf16", "fp32").
inline const char* dtype_key(at::ScalarType dtype) {
  switch (dtype) {
    case at::kHalf:
      return "fp16";
    case at::kBFloat16:
      return "bf16";
    case at::kFloat:
      return "fp32";
    default:
      TORCH_CHECK(false, "dora_ext: no fused kernels for dtype ", dtype);
  }
}

inline bool aligned16(const at::Tensor& t) {
  return !t.defined() || reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
}

// True when every pointer is 16-byte aligned and every count is a multiple of
// 16 (what a spec's `aligned` arguments promise the compiler).
inline bool all_aligned16(std::initializer_list<const at::Tensor*> tensors, std::initializer_list<int64_t> counts) {
  for (const at::Tensor* t : tensors) {
    if (!aligned16(*t)) return false;
  }
  for (int64_t c : counts) {
    if (c % 16 != 0) return false;
  }
  return true;
}

inline int64_t cdiv(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

// The image of a kernel that the dispatcher already promised exists for this
// device (fused_kernels_available); a missing one is a build error.
inline const KernelImage& kernel_for(const char* kernel, const std::string& variant, c10::DeviceIndex device) {
  const KernelImage* image = find_kernel(kernel, variant, device);
  TORCH_CHECK(image != nullptr, "dora_ext: no compiled ", kernel, ":", variant, " for sm_", device_arch(device),
              " although the arch has fused kernels; rebuild with this arch in DORA_EXT_CUDA_ARCHS");
  return *image;
}

}  // namespace dora_ext
