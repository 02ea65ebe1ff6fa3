#pragma once
// Which tensor, holding which data, at which write count: how the caches of values derived from
// parameters (norm_cache.cpp, adapter_stack.cpp) recognise their inputs without keeping them alive.
// A freed tensor whose address is reused by a new one fails the weak-pointer check. Not for
// inference tensors (they have no version counter).
#include <ATen/core/Tensor.h>
#include <c10/util/intrusive_ptr.h>

#include <cstdint>

namespace dora_ext {

using WeakImpl = c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>;

struct Fingerprint {
  WeakImpl impl{c10::intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>()};
  const void* data = nullptr;
  uint32_t version = 0;

  static Fingerprint of(const at::Tensor& t) {
    return {WeakImpl(t.getIntrusivePtr()), t.const_data_ptr(),
            t.unsafeGetTensorImpl()->version_counter().current_version()};
  }
  bool matches(const at::Tensor& t) const {
    return !impl.expired() && impl._unsafe_get_target() == t.unsafeGetTensorImpl() && data == t.const_data_ptr() &&
           version == t.unsafeGetTensorImpl()->version_counter().current_version();
  }
};

}  // namespace dora_ext
