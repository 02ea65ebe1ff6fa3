#pragma once
// The few CUDA driver API entry points the kernel launcher needs, resolved
// from libcuda at first use. The library never links libcuda, so it loads
// (and runs its eager path) on machines with no GPU and no driver.
#include <cuda.h>

#include <string>

namespace dora_ext {

struct CudaDriver {
  decltype(&::cuGetErrorString) getErrorString;
  decltype(&::cuCtxGetCurrent) ctxGetCurrent;
  decltype(&::cuModuleLoadData) moduleLoadData;
  decltype(&::cuModuleGetFunction) moduleGetFunction;
  decltype(&::cuFuncSetAttribute) funcSetAttribute;
  decltype(&::cuLaunchKernel) launchKernel;
};

// The driver, or nullptr when libcuda cannot be loaded. Thread-safe; the
// library is opened once per process and never closed.
const CudaDriver* cuda_driver();

// Why cuda_driver() is null ("" when it is not).
const std::string& cuda_driver_error();

}  // namespace dora_ext

// Throws a c10::Error naming the driver call and its error string.
#define DORA_CU_CHECK(driver, expr)                                                                                    \
  do {                                                                                                                 \
    CUresult dora_cu_status_ = (expr);                                                                                 \
    if (dora_cu_status_ != CUDA_SUCCESS) {                                                                             \
      const char* dora_cu_msg_ = nullptr;                                                                              \
      (driver)->getErrorString(dora_cu_status_, &dora_cu_msg_);                                                        \
      TORCH_CHECK(false, "dora_ext: CUDA driver call ", #expr,                                                         \
                  " failed: ", dora_cu_msg_ ? dora_cu_msg_ : "unknown error", " (", static_cast<int>(dora_cu_status_), \
                  ")");                                                                                                \
    }                                                                                                                  \
  } while (0)
