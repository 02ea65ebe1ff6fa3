#include "adapter_stack.h"

#include "fingerprint.h"
#include "never_destroyed.h"
#include "norm_cache.h"

#include <ATen/ATen.h>

#include <mutex>
#include <unordered_map>

namespace dora_ext {
namespace {

// The stack's rank is padded to this many columns: h's and B's row strides then keep the 16-element
// alignment the aligned kernel variants promise (vector loads), whatever the adapters' ranks, and
// dora_mixed_lora_kernel's rank tiles (MIXED_LORA_BLOCK_R in triton_src/specs.py, which must divide
// it) never pass the stack's last column.
constexpr int64_t kRankQuantum = 32;

std::pair<at::Tensor, at::Tensor> stack_factors(at::TensorList lora_A, at::TensorList lora_B) {
  const int64_t d_in = lora_A[0].size(1), d_out = lora_B[0].size(0);
  const int64_t pad = stacked_rank(lora_A) - adapter_columns(lora_A).back();
  std::vector<at::Tensor> a(lora_A.begin(), lora_A.end()), b(lora_B.begin(), lora_B.end());
  if (pad > 0) {
    a.push_back(at::zeros({pad, d_in}, lora_A[0].options()));
    b.push_back(at::zeros({d_out, pad}, lora_B[0].options()));
  }
  return {at::cat(a, 0), at::cat(b, 1)};
}

at::Tensor stack_g(const std::vector<at::Tensor>& g, int64_t d_out, const at::TensorOptions& options) {
  const at::Tensor ones = at::ones({1, d_out}, options.dtype(at::kFloat));
  std::vector<at::Tensor> rows;
  for (const at::Tensor& gk : g) rows.push_back(gk.defined() ? gk.to(at::kFloat).view({1, d_out}) : ones);
  rows.push_back(ones);  // base-model rows
  return at::cat(rows, 0);
}

// What the stack's G was made from, besides the factors: W, each magnitude (none: plain LoRA) and
// the scales. The norm and g of each adapter are functions of these and of the factors alone.
struct GInputs {
  Fingerprint weight;
  std::vector<std::optional<Fingerprint>> magnitudes;
  std::vector<double> scales;

  static GInputs of(const at::Tensor& weight, const c10::List<std::optional<at::Tensor>>& magnitude,
                    at::ArrayRef<double> scale) {
    GInputs inputs{Fingerprint::of(weight), {}, scale.vec()};
    for (size_t k = 0; k < magnitude.size(); ++k) {
      const std::optional<at::Tensor> m = magnitude.get(k);
      inputs.magnitudes.push_back(m.has_value() && m->defined() ? std::optional(Fingerprint::of(*m)) : std::nullopt);
    }
    return inputs;
  }
  bool match(const at::Tensor& w, const c10::List<std::optional<at::Tensor>>& magnitude,
             at::ArrayRef<double> scale) const {
    if (!weight.matches(w) || !scale.equals(scales) || magnitudes.size() != magnitude.size()) return false;
    for (size_t k = 0; k < magnitudes.size(); ++k) {
      const std::optional<at::Tensor> m = magnitude.get(k);
      const bool dora = m.has_value() && m->defined();
      if (dora != magnitudes[k].has_value() || (dora && !magnitudes[k]->matches(*m))) return false;
    }
    return true;
  }
};

// The stack last made for a base weight (one per weight: a layer serving another set of adapters
// replaces it, so the cache holds at most one copy of each layer's adapters).
struct Entry {
  int64_t generation = 0;  // norm_cache_generation() when made: invalidations drop it
  WeakImpl weight{c10::intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>()};  // the key: swept once dead
  std::vector<Fingerprint> factors;  // lora_A[0], lora_B[0], lora_A[1], ...
  GInputs g_inputs;                  // what G was made from, with
  std::vector<at::Tensor> g;         // the g tensors G was made of (undefined: plain LoRA)
  AdapterStack stack;

  bool factors_match(at::TensorList lora_A, at::TensorList lora_B) const {
    if (factors.size() != 2 * lora_A.size()) return false;
    for (size_t k = 0; k < lora_A.size(); ++k) {
      if (!factors[2 * k].matches(lora_A[k]) || !factors[2 * k + 1].matches(lora_B[k])) return false;
    }
    return true;
  }
  // g comes from the norm cache, which hands out the same tensor while the norm and the magnitude are
  // unchanged and never writes to it: being the same tensor is being the same values.
  bool g_matches(const std::vector<at::Tensor>& other) const {
    if (g.size() != other.size()) return false;
    for (size_t k = 0; k < g.size(); ++k) {
      if (g[k].defined() != other[k].defined() || (g[k].defined() && !g[k].is_same(other[k]))) return false;
    }
    return true;
  }
};

struct Cache {
  std::mutex mutex;
  std::unordered_map<const c10::TensorImpl*, Entry> entries;
};

Cache& cache() {
  return never_destroyed<Cache>();
}

// Drops the entries of dead weights and adapters and those an invalidation made stale (called when
// one is added: the misses are few, and nothing else frees their memory).
void sweep_locked(Cache& c, int64_t generation) {
  for (auto it = c.entries.begin(); it != c.entries.end();) {
    bool dead = it->second.generation != generation || it->second.weight.expired();
    for (const Fingerprint& f : it->second.factors) dead = dead || f.impl.expired();
    it = dead ? c.entries.erase(it) : std::next(it);
  }
}

}  // namespace

std::vector<int64_t> adapter_columns(at::TensorList lora_A) {
  std::vector<int64_t> columns{0};
  for (const at::Tensor& a : lora_A) columns.push_back(columns.back() + a.size(0));
  return columns;
}

int64_t stacked_rank(at::TensorList lora_A) {
  return (adapter_columns(lora_A).back() + kRankQuantum - 1) / kRankQuantum * kRankQuantum;
}

AdapterStack stack_adapters(const at::Tensor& weight, at::TensorList lora_A, at::TensorList lora_B,
                            const c10::List<std::optional<at::Tensor>>& magnitude, at::ArrayRef<double> scale,
                            const MakeG& make_g) {
  TORCH_CHECK(!lora_A.empty(), "stack_adapters: lora_A must list at least one adapter");
  const int64_t d_out = lora_B[0].size(0);
  const at::TensorOptions options = lora_B[0].options();
  std::vector<at::Tensor> inputs{weight};
  inputs.insert(inputs.end(), lora_A.begin(), lora_A.end());
  inputs.insert(inputs.end(), lora_B.begin(), lora_B.end());
  for (size_t k = 0; k < magnitude.size(); ++k) {
    const std::optional<at::Tensor> m = magnitude.get(k);
    if (m.has_value() && m->defined()) inputs.push_back(*m);
  }
  if (!may_cache(inputs)) {
    auto [a, b] = stack_factors(lora_A, lora_B);
    return {a, b, stack_g(make_g(), d_out, options)};
  }
  Cache& c = cache();
  const int64_t generation = norm_cache_generation();
  auto live = [&]() -> Entry* {  // the entry of these factors, if any (caller holds the lock)
    auto it = c.entries.find(weight.unsafeGetTensorImpl());
    const bool valid = it != c.entries.end() && it->second.generation == generation && !it->second.weight.expired() &&
                       it->second.factors_match(lora_A, lora_B);
    return valid ? &it->second : nullptr;
  };
  {
    std::lock_guard<std::mutex> lock(c.mutex);
    const Entry* e = live();
    if (e != nullptr && e->g_inputs.match(weight, magnitude, scale)) return e->stack;  // no norm-cache lookup
  }
  // The norm-cache lookups (and any norm computation) run outside the lock.
  const std::vector<at::Tensor> g = make_g();
  GInputs g_inputs = GInputs::of(weight, magnitude, scale);
  {
    std::lock_guard<std::mutex> lock(c.mutex);
    if (Entry* e = live()) {  // W, a magnitude or a scale changed: G only (a [K + 1, d_out] copy)
      if (!e->g_matches(g)) {
        e->stack.g = stack_g(g, d_out, options);
        e->g = g;
      }
      e->g_inputs = std::move(g_inputs);
      return e->stack;
    }
  }
  // Made outside the lock; two threads making the same stack both get a correct one, the last is kept.
  auto [a, b] = stack_factors(lora_A, lora_B);
  Entry e{generation, WeakImpl(weight.getIntrusivePtr()), {}, std::move(g_inputs),
          g,          {a, b, stack_g(g, d_out, options)}};
  for (size_t k = 0; k < lora_A.size(); ++k) {
    e.factors.push_back(Fingerprint::of(lora_A[k]));
    e.factors.push_back(Fingerprint::of(lora_B[k]));
  }
  const AdapterStack stack = e.stack;
  std::lock_guard<std::mutex> lock(c.mutex);
  sweep_locked(c, generation);
  c.entries[weight.unsafeGetTensorImpl()] = std::move(e);
  return stack;
}

}  // namespace dora_ext
