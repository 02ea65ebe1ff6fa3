#include "norm_cache.h"

#include "capture.h"
#include "eager.h"
#include "fingerprint.h"
#include "never_destroyed.h"
#include "options.h"

#include <c10/util/Exception.h>
#include <torch/csrc/autograd/engine.h>
#include <torch/csrc/autograd/graph_task.h>

#include <algorithm>
#include <atomic>
#include <mutex>
#include <unordered_map>
#include <unordered_set>
#include <vector>

namespace dora_ext {
namespace {

// One adapter's norm on a weight (and g = m / norm for one magnitude).
struct AdapterNorm {
  Fingerprint lora_A, lora_B;
  double scale = 0.0;
  at::Tensor norm;
  Fingerprint magnitude;
  at::Tensor g;  // m / norm for `norm` above, undefined until computed

  bool matches(const at::Tensor& a, const at::Tensor& b, double s) const {
    return lora_A.matches(a) && lora_B.matches(b) && scale == s;
  }
};

// Several adapters of one base weight live side by side (PEFT's set_adapter, mixed-adapter batches):
// up to this many norms per weight, the oldest dropped first.
constexpr size_t kAdaptersPerWeight = 64;

struct Entry {
  uint64_t epoch = 0;  // Cache::epoch when computed: older entries are stale (rule 3)
  Fingerprint weight;
  at::Tensor weight_sq;               // ||W_i||^2, undefined until a computation produced it
  std::vector<AdapterNorm> adapters;  // oldest first

  AdapterNorm* find(const at::Tensor& a, const at::Tensor& b, double s) {
    for (AdapterNorm& n : adapters) {
      if (n.matches(a, b, s)) return &n;
    }
    return nullptr;
  }
  AdapterNorm* holding(const at::Tensor& norm) {
    for (AdapterNorm& n : adapters) {
      if (n.norm.is_same(norm)) return &n;
    }
    return nullptr;
  }
};

// Entries are dropped when their weight dies, checked whenever the table has
// grown past this many entries since the last sweep.
constexpr size_t kSweepEvery = 1024;

struct Cache {
  std::mutex mutex;
  std::unordered_map<const c10::TensorImpl*, Entry> entries;
  size_t sweep_at = kSweepEvery;
  NormCacheStats stats;
  uint64_t epoch = 0;  // bumped by invalidate_norm_cache()
  // Norms used by backward ops, per running backward pass (graph task id), dropped when it ends.
  std::unordered_map<int, std::vector<at::Tensor>> used_by_backward;

  // The live entry of `weight`: same tensor, storage and version, current epoch.
  Entry* live_entry_locked(const at::Tensor& weight) {
    auto it = entries.find(weight.unsafeGetTensorImpl());
    if (it == entries.end() || it->second.epoch != epoch || !it->second.weight.matches(weight)) return nullptr;
    return &it->second;
  }

  void sweep_locked() {
    for (auto it = entries.begin(); it != entries.end();) {
      it = it->second.weight.impl.expired() ? entries.erase(it) : std::next(it);
    }
    sweep_at = entries.size() + kSweepEvery;
  }
};

Cache& cache() {
  return never_destroyed<Cache>();
}

std::atomic<int64_t> generation{0};  // norm_cache_generation(): every invalidation, never reset

int current_backward_pass() {
  return torch::autograd::get_current_graph_task_id();  // -1 outside a backward pass
}

// Rule 2: drop the entries holding any of `norms` (the caller holds the lock).
void drop_entries_holding_locked(Cache& c, const std::vector<at::Tensor>& norms) {
  std::unordered_set<const c10::TensorImpl*> used;
  for (const at::Tensor& n : norms) used.insert(n.unsafeGetTensorImpl());
  for (auto it = c.entries.begin(); it != c.entries.end();) {
    bool holds = false;
    for (const AdapterNorm& n : it->second.adapters) holds = holds || used.count(n.norm.unsafeGetTensorImpl()) > 0;
    it = holds ? c.entries.erase(it) : std::next(it);
  }
  ++c.stats.invalidations;
  ++generation;
}

// The adapter norm of `weight` that is `norm`, or nullptr (the caller holds the lock): g is only
// stored alongside the norm it was computed from.
AdapterNorm* norm_holding(Cache& c, const at::Tensor& weight, const at::Tensor& norm) {
  Entry* e = c.live_entry_locked(weight);
  return e != nullptr ? e->holding(norm) : nullptr;
}

}  // namespace

bool may_cache(at::TensorList tensors) {
  if (!current_options().norm_cache) return false;
  for (const at::Tensor& t : tensors) {
    if (t.is_inference()) return false;  // no version counter to key on
  }
  return !stream_capturing(tensors.front());
}

at::Tensor cached_row_norm(const at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B, double scale,
                           NormUse use, const NormCompute& compute) {
  Cache& c = cache();
  if (!may_cache({weight, lora_A, lora_B})) {
    std::lock_guard<std::mutex> lock(c.mutex);
    ++c.stats.bypassed;
    return compute(at::Tensor(), nullptr);
  }
  // Rule 1: a recording forward reuses nothing from earlier calls, unless it is a
  // checkpoint recompute inside the backward pass that follows its own forward.
  const bool may_reuse = use == NormUse::Inference || current_backward_pass() != -1;
  at::Tensor weight_sq;
  uint64_t epoch = 0;
  {
    std::lock_guard<std::mutex> lock(c.mutex);
    epoch = c.epoch;
    Entry* e = may_reuse ? c.live_entry_locked(weight) : nullptr;
    if (e != nullptr) {
      if (const AdapterNorm* n = e->find(lora_A, lora_B, scale)) {
        ++c.stats.norm_hits;
        return n->norm;
      }
      weight_sq = e->weight_sq;
    }
    ++c.stats.norm_misses;
    if (weight_sq.defined()) ++c.stats.weight_sq_hits;
  }
  // Computed outside the lock: another thread may compute the same norm
  // concurrently; both results are equal and the last one is kept. An
  // invalidation meanwhile leaves this result stale (its epoch is the one before).
  at::Tensor new_weight_sq;
  at::Tensor norm = compute(weight_sq, weight_sq.defined() ? nullptr : &new_weight_sq);
  std::lock_guard<std::mutex> lock(c.mutex);
  if (c.entries.size() >= c.sweep_at) c.sweep_locked();
  Entry& e = c.entries[weight.unsafeGetTensorImpl()];
  if (e.epoch != epoch || !e.weight.matches(weight)) {  // a new weight, or a stale entry: start over
    e = Entry{};
    e.epoch = epoch;
    e.weight = Fingerprint::of(weight);
  }
  if (!e.weight_sq.defined()) e.weight_sq = weight_sq.defined() ? weight_sq : new_weight_sq;
  // This adapter's earlier norm (same A and B objects, now changed) and the oldest beyond the cap go.
  auto& adapters = e.adapters;
  adapters.erase(std::remove_if(adapters.begin(), adapters.end(),
                                [&](const AdapterNorm& n) {
                                  return n.lora_A.impl._unsafe_get_target() == lora_A.unsafeGetTensorImpl() &&
                                         n.lora_B.impl._unsafe_get_target() == lora_B.unsafeGetTensorImpl();
                                }),
                 adapters.end());
  if (adapters.size() >= kAdaptersPerWeight) adapters.erase(adapters.begin());
  adapters.push_back(AdapterNorm{Fingerprint::of(lora_A), Fingerprint::of(lora_B), scale, norm, {}, {}});
  return norm;
}

at::Tensor cached_magnitude_scale(const at::Tensor& weight, const at::Tensor& magnitude, const at::Tensor& norm) {
  Cache& c = cache();
  const bool use_cache = may_cache({weight, magnitude});
  if (use_cache) {
    std::lock_guard<std::mutex> lock(c.mutex);
    const AdapterNorm* n = norm_holding(c, weight, norm);
    if (n != nullptr && n->g.defined() && n->magnitude.matches(magnitude)) {
      ++c.stats.scale_hits;
      return n->g;
    }
  }
  at::Tensor g = magnitude_scale(magnitude, norm).contiguous();
  if (use_cache) {
    std::lock_guard<std::mutex> lock(c.mutex);
    // a norm computed outside the cache has no entry to attach g to
    if (AdapterNorm* n = norm_holding(c, weight, norm)) {
      n->magnitude = Fingerprint::of(magnitude);
      n->g = g;
    }
  }
  return g;
}

void norm_used_by_backward(const at::Tensor& norm) {
  Cache& c = cache();
  const int pass = current_backward_pass();
  {
    std::lock_guard<std::mutex> lock(c.mutex);
    if (pass == -1) {  // a backward op called directly: its forward's norm may be stale from now on
      drop_entries_holding_locked(c, {norm});
      return;
    }
    std::vector<at::Tensor>& used = c.used_by_backward[pass];
    used.push_back(norm);
    if (used.size() > 1) return;  // the first backward op of this pass queued the drop already
  }
  // Outside the lock: the engine takes its own. Runs when this backward pass (the
  // innermost one, for reentrant checkpointing) has finished.
  torch::autograd::Engine::get_default_engine().queue_callback([pass] {
    Cache& c = cache();
    std::lock_guard<std::mutex> lock(c.mutex);
    auto it = c.used_by_backward.find(pass);
    if (it == c.used_by_backward.end()) return;
    drop_entries_holding_locked(c, it->second);
    c.used_by_backward.erase(it);
  });
}

void invalidate_norm_cache() {
  Cache& c = cache();
  std::lock_guard<std::mutex> lock(c.mutex);
  ++c.epoch;
  c.entries.clear();
  ++c.stats.invalidations;
  ++generation;
}

int64_t norm_cache_generation() {
  return generation.load();
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
  ++c.epoch;
  c.entries.clear();
  c.used_by_backward.clear();
  c.sweep_at = kSweepEvery;
  c.stats = NormCacheStats{};
  ++generation;  // casts derived from parameters (norm_cache_generation) go with the norms
}

}  // namespace dora_ext
