#include "cuda_driver.h"

#include <dlfcn.h>

namespace dora_ext {
namespace {

struct LoadedDriver {
  CudaDriver api{};
  bool ok = false;
  std::string error;
};

template <typename Fn>
bool resolve(void* lib, const char* name, Fn& out, std::string& error) {
  out = reinterpret_cast<Fn>(dlsym(lib, name));
  if (out == nullptr) error = std::string("libcuda has no symbol ") + name;
  return out != nullptr;
}

LoadedDriver load() {
  LoadedDriver d;
  void* lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
  if (lib == nullptr) {
    const char* why = dlerror();
    d.error = std::string("cannot load libcuda.so.1: ") + (why ? why : "unknown");
    return d;
  }
  d.ok = resolve(lib, "cuGetErrorString", d.api.getErrorString, d.error) &&
         resolve(lib, "cuCtxGetCurrent", d.api.ctxGetCurrent, d.error) &&
         resolve(lib, "cuModuleLoadData", d.api.moduleLoadData, d.error) &&
         resolve(lib, "cuModuleGetFunction", d.api.moduleGetFunction, d.error) &&
         resolve(lib, "cuFuncSetAttribute", d.api.funcSetAttribute, d.error) &&
         resolve(lib, "cuLaunchKernel", d.api.launchKernel, d.error);
  return d;
}

const LoadedDriver& loaded() {
  static const LoadedDriver driver = load();  // thread-safe one-time init
  return driver;
}

}  // namespace

const CudaDriver* cuda_driver() {
  return loaded().ok ? &loaded().api : nullptr;
}

const std::string& cuda_driver_error() {
  return loaded().error;
}

}  // namespace dora_ext
