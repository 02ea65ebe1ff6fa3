#include "launcher.h"

#include <c10/util/Exception.h>

#include <set>

#ifdef DORA_EXT_WITH_CUDA
#include "cuda_driver.h"

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include <cstring>
#include <map>
#include <mutex>
#include <tuple>
#endif

namespace dora_ext {

std::vector<int64_t> compiled_archs() {
  std::set<int64_t> archs;
  for (const KernelImage& image : kernel_images()) archs.insert(image.arch);
  return {archs.begin(), archs.end()};
}

#ifdef DORA_EXT_WITH_CUDA
namespace {

constexpr int kDefaultSharedLimit = 48 * 1024;  // above this a kernel must opt in

bool serves(int image_arch, int device_arch) {
  if (image_arch == device_arch) return true;
  // sm_90+ cubins are compiled arch-specific ("sm_90a"); older ones run on
  // every later minor of the same major.
  return image_arch < 90 && image_arch / 10 == device_arch / 10 && image_arch < device_arch;
}

std::mutex& cache_mutex() {
  static std::mutex m;
  return m;
}

// Loads the module of `image` into the primary context of `device`. Modules
// stay loaded for the life of the process (unloading at exit races the driver's
// own teardown).
CUfunction load_function(const KernelImage& image, c10::DeviceIndex device) {
  const CudaDriver* drv = cuda_driver();
  TORCH_CHECK(drv != nullptr, "dora_ext: CUDA driver unavailable: ", cuda_driver_error());
  c10::cuda::CUDAGuard guard(device);
  // A kernel's first launch may come inside a CUDA-graph capture: module loads
  // are illegal while a stream captures in global mode, so this thread relaxes
  // the mode while loading (nothing done here is captured).
  c10::cuda::CUDAStreamCaptureModeGuard relaxed(cudaStreamCaptureModeRelaxed);
  CUcontext ctx = nullptr;
  DORA_CU_CHECK(drv, drv->ctxGetCurrent(&ctx));
  if (ctx == nullptr) {
    // The runtime creates the primary context lazily; make it current.
    C10_CUDA_CHECK(cudaFree(nullptr));
  }
  CUmodule module = nullptr;
  DORA_CU_CHECK(drv, drv->moduleLoadData(&module, image.cubin));
  CUfunction fn = nullptr;
  DORA_CU_CHECK(drv, drv->moduleGetFunction(&fn, module, image.function));
  if (image.shared_bytes > kDefaultSharedLimit) {
    DORA_CU_CHECK(drv, drv->funcSetAttribute(fn, CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, image.shared_bytes));
  }
  return fn;
}

CUfunction function_for(const KernelImage& image, c10::DeviceIndex device) {
  static std::map<std::pair<const KernelImage*, c10::DeviceIndex>, CUfunction> functions;
  std::lock_guard<std::mutex> lock(cache_mutex());
  auto key = std::make_pair(&image, device);
  auto it = functions.find(key);
  if (it != functions.end()) return it->second;
  CUfunction fn = load_function(image, device);  // throws without caching on failure
  functions.emplace(key, fn);
  return fn;
}

}  // namespace

const DeviceInfo& device_info(c10::DeviceIndex device) {
  static std::map<c10::DeviceIndex, DeviceInfo> infos;
  std::lock_guard<std::mutex> lock(cache_mutex());
  auto it = infos.find(device);
  if (it != infos.end()) return it->second;
  int major = 0, minor = 0;
  DeviceInfo info{};
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&info.multiprocessors, cudaDevAttrMultiProcessorCount, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&info.shared_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&info.shared_per_sm, cudaDevAttrMaxSharedMemoryPerMultiprocessor, device));
  info.arch = major * 10 + minor;
  return infos.emplace(device, info).first->second;
}

int device_arch(c10::DeviceIndex device) {
  return device_info(device).arch;
}

const KernelImage* find_kernel(const char* kernel, const std::string& variant, c10::DeviceIndex device) {
  static std::map<std::tuple<std::string, std::string, c10::DeviceIndex>, const KernelImage*> found;
  {
    std::lock_guard<std::mutex> lock(cache_mutex());
    auto it = found.find({kernel, variant, device});
    if (it != found.end()) return it->second;
  }
  const DeviceInfo& info = device_info(device);
  const KernelImage* best = nullptr;
  for (const KernelImage& image : kernel_images()) {
    if (std::strcmp(image.kernel, kernel) != 0 || variant != image.variant) continue;
    if (!serves(image.arch, info.arch) || image.shared_bytes > info.shared_optin) continue;
    if (best == nullptr || image.arch > best->arch) best = &image;
  }
  std::lock_guard<std::mutex> lock(cache_mutex());
  found[{kernel, variant, device}] = best;
  return best;
}

bool fused_kernels_available(c10::DeviceIndex device, std::string* why) {
  if (cuda_driver() == nullptr) {
    if (why) *why = "CUDA driver unavailable (" + cuda_driver_error() + ")";
    return false;
  }
  const int arch = device_arch(device);
  for (const KernelImage& image : kernel_images()) {
    if (serves(image.arch, arch)) return true;
  }
  if (why) {
    std::string archs;
    for (int64_t a : compiled_archs()) archs += (archs.empty() ? "sm_" : ", sm_") + std::to_string(a);
    *why = "no cubin for sm_" + std::to_string(arch) + " (built for: " + (archs.empty() ? "none" : archs) + ")";
  }
  return false;
}

void launch(const KernelImage& image, c10::DeviceIndex device, std::array<int64_t, 3> grid,
            std::vector<KernelArg> args) {
  const size_t expected = std::strlen(image.params);
  TORCH_CHECK(args.size() == expected, "dora_ext: kernel ", image.kernel, ":", image.variant, " takes ", expected,
              " arguments, got ", args.size());
  for (size_t i = 0; i < expected; ++i) {
    TORCH_CHECK(args[i].kind() == image.params[i], "dora_ext: kernel ", image.kernel, ":", image.variant, " argument ",
                i, " has kind '", args[i].kind(), "', expected '", image.params[i], "'");
  }
  const auto [grid_x, grid_y, grid_z] = grid;
  if (grid_x == 0 || grid_y == 0 || grid_z == 0) return;  // empty tensor: nothing to launch
  TORCH_CHECK(grid_x <= INT32_MAX && grid_y <= 65535 && grid_z <= 65535, "dora_ext: launch grid (", grid_x, ", ",
              grid_y, ", ", grid_z, ") of ", image.kernel, " exceeds the CUDA limits");
  std::vector<void*> params;
  params.reserve(expected + image.trailing_null_params);
  for (KernelArg& arg : args) params.push_back(arg.address());
  std::vector<void*> nulls(image.trailing_null_params, nullptr);
  for (void*& null : nulls) params.push_back(&null);

  CUfunction fn = function_for(image, device);
  c10::cuda::CUDAGuard guard(device);
  const CudaDriver* drv = cuda_driver();
  CUstream stream = c10::cuda::getCurrentCUDAStream(device).stream();
  DORA_CU_CHECK(drv, drv->launchKernel(fn, static_cast<unsigned>(grid_x), static_cast<unsigned>(grid_y),
                                       static_cast<unsigned>(grid_z), 32 * image.num_warps, 1, 1, image.shared_bytes,
                                       stream, params.data(), nullptr));
}

#else  // a library built without CUDA: the eager path only

const DeviceInfo& device_info(c10::DeviceIndex) {
  TORCH_CHECK(false, "dora_ext was built without CUDA");
}

int device_arch(c10::DeviceIndex) {
  TORCH_CHECK(false, "dora_ext was built without CUDA");
}

const KernelImage* find_kernel(const char*, const std::string&, c10::DeviceIndex) {
  return nullptr;
}

bool fused_kernels_available(c10::DeviceIndex, std::string* why) {
  if (why) *why = "dora_ext was built without CUDA (DORA_EXT_WITH_CUDA=0 or no CUDA toolkit)";
  return false;
}

void launch(const KernelImage&, c10::DeviceIndex, std::array<int64_t, 3>, std::vector<KernelArg>) {
  TORCH_CHECK(false, "dora_ext was built without CUDA");
}

#endif  // DORA_EXT_WITH_CUDA

}  // namespace dora_ext
