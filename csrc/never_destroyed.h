#pragma once
// A process-lifetime object that is never destroyed: the caches holding CUDA tensors (norm_cache.cpp,
// adapter_stack.cpp) must not free them after the CUDA runtime has shut down at exit.
#include <memory>

namespace dora_ext {

// The one T of this process (one per type: each cache type is private to its file).
template <typename T>
T& never_destroyed() {
  static T* const object = std::make_unique<T>().release();
  return *object;
}

}  // namespace dora_ext
