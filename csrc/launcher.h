#pragma once
// Runs the ahead-of-time compiled Triton kernels: finds the cubin for a
// device's arch, loads it once per device (thread-safe, lazily), and launches
// it on the current PyTorch CUDA stream. Errors are C++ exceptions.
#include "kernel_registry.h"

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>

#include <array>
#include <cstdint>
#include <string>
#include <vector>

namespace dora_ext {

// One kernel argument, typed as the cubin expects it (see KernelImage::params).
class KernelArg {
 public:
  KernelArg(const at::Tensor& t) : kind_('p') {
    value_.p = t.defined() ? t.data_ptr() : nullptr;
  }
  KernelArg(int64_t v) : kind_('l') {
    value_.l = v;
  }
  KernelArg(float v) : kind_('f') {
    value_.f = v;
  }
  static KernelArg null_pointer() {
    return KernelArg(at::Tensor());
  }

  char kind() const {
    return kind_;
  }
  void* address() {
    return &value_;
  }

 private:
  char kind_;
  union {
    void* p;
    int64_t l;
    float f;
  } value_;
};

// What the launcher needs to know of a CUDA device (read once per device).
struct DeviceInfo {
  int arch;  // compute capability as 10 * major + minor (90 for sm_90)
  int multiprocessors;
  int shared_optin;   // most shared memory one block may opt in to, bytes
  int shared_per_sm;  // shared memory of one multiprocessor, bytes
};
const DeviceInfo& device_info(c10::DeviceIndex device);

// Compute capability of a CUDA device as 10 * major + minor.
int device_arch(c10::DeviceIndex device);

// The image of `kernel` / `variant` that runs on `device`, or nullptr when
// none was compiled for its arch or it needs more shared memory than the
// device has. Images for sm_80..sm_89 also serve later minors of their major;
// sm_90 and later images are arch-specific.
const KernelImage* find_kernel(const char* kernel, const std::string& variant, c10::DeviceIndex device);

// Whether the fused kernels can run on `device` at all; otherwise `why` says
// why not (no driver, no cubin for its arch).
bool fused_kernels_available(c10::DeviceIndex device, std::string* why);

// Launches `image` with a grid of (x, y, z) programs on the current stream of `device`.
void launch(const KernelImage& image, c10::DeviceIndex device, std::array<int64_t, 3> grid,
            std::vector<KernelArg> args);

// Archs with at least one compiled image, ascending.
std::vector<int64_t> compiled_archs();

}  // namespace dora_ext
