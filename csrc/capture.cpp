#include "capture.h"

#ifdef DORA_EXT_WITH_CUDA
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#endif

namespace dora_ext {

bool stream_capturing(const at::Tensor& t) {
#ifdef DORA_EXT_WITH_CUDA
  if (t.is_cuda()) {
    cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
    C10_CUDA_CHECK(cudaStreamIsCapturing(c10::cuda::getCurrentCUDAStream(t.device().index()).stream(), &status));
    return status != cudaStreamCaptureStatusNone;
  }
#endif
  (void)t;
  return false;
}

}  // namespace dora_ext
