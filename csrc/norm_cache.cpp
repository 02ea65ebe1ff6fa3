#include "norm_cache.h"

#include "eager.h"

#include <c10/util/Exception.h>
#include <c10/util/intrusive_ptr.h>

#include <cstdlib>
#include <cstring>
#include <mutex>
#include <unordered_map>

#ifdef DORA_EXT_WITH_CUDA
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#endif

namespace dora_ext {
namespace {

using WeakImpl = c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>;

// Which tensor, holding which data, at which write count. A freed tensor whose
// address is reused by a new one fails the weak-pointer check.
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

struct Entry {
  Fingerprint weight;
  at::Tensor weight_sq;  // ||W_i||^2, undefined until a computation produced it
  Fingerprint lora_A, lora_B;
  double scale = 0.0;
  at::Tensor norm;       // undefined until computed
  Fingerprint magnitude;
  at::Tensor g;          // m / norm for `norm` above, undefined until computed
};

// Entries are dropped when their weight dies, checked whenever the table has
// grown past this many entries since the last sweep.
constexpr size_t kSweepEvery = 1024;

struct Cache {
  std::mutex mutex;
  std::unordered_map<const c10::TensorImpl*, Entry> entries;
  size_t sweep_at = kSweepEvery;
  NormCacheStats stats;

  void sweep_locked() {
    for (auto it = entries.begin(); it != entries.end();) {
      it = it->second.weight.impl.expired() ? entries.erase(it) : std::next(it);
    }
    sweep_at = entries.size() + kSweepEvery;
  }
};

Cache& cache() {
  static Cache* c = new Cache();  // leaked on purpose: tensors must not be freed after CUDA teardown at exit
  return *c;
}

bool disabled_by_env() {
  const char* env = std::getenv("DORA_EXT_NORM_CACHE");  // read per call, like DORA_EXT_TIER
  return env != nullptr && std::strcmp(env, "0") == 0;
}

bool capturing(const at::Tensor& t) {
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

// The entry of `weight` that holds `norm`, or nullptr (the caller holds the lock): g is only
// stored alongside the norm it was computed from.
Entry* entry_holding(Cache& c, const at::Tensor& weight, const at::Tensor& norm) {
  auto it = c.entries.find(weight.unsafeGetTensorImpl());
  if (it == c.entries.end() || !it->second.weight.matches(weight) || !it->second.norm.is_same(norm)) return nullptr;
  return &it->second;
}

bool cacheable(std::initializer_list<const at::Tensor*> tensors) {
  if (disabled_by_env()) return false;
  for (const at::Tensor* t : tensors) {
    if (t->is_inference()) return false;  // no version counter to key on
  }
  return !capturing(**tensors.begin());
}

}  // namespace

at::Tensor cached_row_norm(const at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B, double scale,
                           const NormCompute& compute) {
  Cache& c = cache();
  if (!cacheable({&weight, &lora_A, &lora_B})) {
    std::lock_guard<std::mutex> lock(c.mutex);
    ++c.stats.bypassed;
    return compute(at::Tensor(), nullptr);
  }
  at::Tensor weight_sq;
  {
    std::lock_guard<std::mutex> lock(c.mutex);
    auto it = c.entries.find(weight.unsafeGetTensorImpl());
    if (it != c.entries.end() && it->second.weight.matches(weight)) {
      const Entry& e = it->second;
      if (e.norm.defined() && e.lora_A.matches(lora_A) && e.lora_B.matches(lora_B) && e.scale == scale) {
        ++c.stats.norm_hits;
        return e.norm;
      }
      weight_sq = e.weight_sq;
    }
    ++c.stats.norm_misses;
    if (weight_sq.defined()) ++c.stats.weight_sq_hits;
  }
  // Computed outside the lock: another thread may compute the same norm
  // concurrently; both results are equal and the last one is kept.
  at::Tensor new_weight_sq;
  at::Tensor norm = compute(weight_sq, weight_sq.defined() ? nullptr : &new_weight_sq);
  std::lock_guard<std::mutex> lock(c.mutex);
  if (c.entries.size() >= c.sweep_at) c.sweep_locked();
  Entry& e = c.entries[weight.unsafeGetTensorImpl()];
  e = Entry{};
  e.weight = Fingerprint::of(weight);
  e.weight_sq = weight_sq.defined() ? weight_sq : new_weight_sq;
  e.lora_A = Fingerprint::of(lora_A);
  e.lora_B = Fingerprint::of(lora_B);
  e.scale = scale;
  e.norm = norm;
  return norm;
}

at::Tensor cached_magnitude_scale(const at::Tensor& weight, const at::Tensor& magnitude, const at::Tensor& norm) {
  Cache& c = cache();
  const bool use_cache = cacheable({&weight, &magnitude});
  if (use_cache) {
    std::lock_guard<std::mutex> lock(c.mutex);
    const Entry* e = entry_holding(c, weight, norm);
    if (e != nullptr && e->g.defined() && e->magnitude.matches(magnitude)) {
      ++c.stats.scale_hits;
      return e->g;
    }
  }
  at::Tensor g = magnitude_scale(magnitude, norm).contiguous();
  if (use_cache) {
    std::lock_guard<std::mutex> lock(c.mutex);
    // a norm computed outside the cache has no entry to attach g to
    if (Entry* e = entry_holding(c, weight, norm)) {
      e->magnitude = Fingerprint::of(magnitude);
      e->g = g;
    }
  }
  return g;
}

NormCacheStats norm_cache_stats() {
  Cache& c = cache();
  std::lock_guard<std::mutex> lock(c.mutex);
  NormCacheStats s = c.stats;
  s.entries = static_cast<int64_t>(c.entries.size());
  return s;
}

void clear_norm_cache() {
  Cache& c = cache();
  std::lock_guard<std::mutex> lock(c.mutex);
  c.entries.clear();
  c.sweep_at = kSweepEvery;
  c.stats = NormCacheStats{};
}

}  // namespace dora_ext
