#include "adapter_stack.h"

#include "fingerprint.h"
#include "never_destroyed.h"
#include "norm_cache.h"

#include <ATen/ATen.h>
#include <c10/core/GradMode.h>
#include <c10/core/InferenceMode.h>

#include <algorithm>
#include <mutex>
#include <unordered_map>

namespace dora_ext {
namespace {

// The stack's rank is padded to this many columns: h's and B's row strides then keep the 16-element
// alignment the aligned kernel variants promise (vector loads), whatever the adapters' ranks, and
// dora_mixed_lora_kernel's rank tiles (MIXED_LORA_BLOCK_R in triton_src/specs.py, which must divide
// it) never pass the stack's last column.
constexpr int64_t kRankQuantum = 32;

int64_t rank_sum(at::TensorList lora_A) {
  int64_t sum = 0;
  for (const at::Tensor& a : lora_A) sum += a.size(0);
  return sum;
}

int64_t round_up(int64_t columns) {
  return (columns + kRankQuantum - 1) / kRankQuantum * kRankQuantum;
}

// The packed copy: the adapters one after another, then zero columns up to the stack's rank.
std::pair<at::Tensor, at::Tensor> stack_factors(at::TensorList lora_A, at::TensorList lora_B) {
  const int64_t d_in = lora_A[0].size(1), d_out = lora_B[0].size(0);
  const int64_t pad = stacked_rank(lora_A) - rank_sum(lora_A);
  std::vector<at::Tensor> a(lora_A.begin(), lora_A.end()), b(lora_B.begin(), lora_B.end());
  if (pad > 0) {
    a.push_back(at::zeros({pad, d_in}, lora_A[0].options()));
    b.push_back(at::zeros({d_out, pad}, lora_B[0].options()));
  }
  return {at::cat(a, 0), at::cat(b, 1)};
}

// A stack made by stack_in_shared_storage, known by the storage of its A (weakly: never kept alive).
using WeakStorage = c10::weak_intrusive_ptr<c10::StorageImpl>;

struct SharedStack {
  WeakStorage a{c10::intrusive_ptr<c10::StorageImpl>()}, b{c10::intrusive_ptr<c10::StorageImpl>()};
  int64_t rank = 0, d_in = 0, d_out = 0;
  at::ScalarType dtype = at::kFloat;

  bool holds(const at::Tensor& t, const WeakStorage& storage) const {
    return !storage.expired() && storage._unsafe_get_target() == t.storage().unsafeGetStorageImpl();
  }
};

struct SharedStacks {
  std::mutex mutex;
  std::unordered_map<const c10::StorageImpl*, SharedStack> by_a;
};

SharedStacks& shared_stacks() {
  return never_destroyed<SharedStacks>();
}

// Where adapter k's rows of A sit in its shared stack `s`: its first column, or -1 where lora_A[k] and
// lora_B[k] are not views of its rows and columns at one place (another storage, layout or shape).
int64_t shared_column(const SharedStack& s, const at::Tensor& a, const at::Tensor& b) {
  const int64_t r = a.size(0);
  if (!s.holds(a, s.a) || !s.holds(b, s.b) || a.scalar_type() != s.dtype || b.scalar_type() != s.dtype) return -1;
  if (a.size(1) != s.d_in || b.size(0) != s.d_out || b.size(1) != r) return -1;
  if (a.storage_offset() % s.d_in != 0 || a.stride(1) != 1 || (r > 1 && a.stride(0) != s.d_in)) return -1;
  const int64_t column = a.storage_offset() / s.d_in;
  if (b.storage_offset() != column || b.stride(0) != s.rank || (r > 1 && b.stride(1) != 1)) return -1;
  return column + r <= s.rank ? column : -1;
}

// The adapters' own stack when every one is a view of the same shared stack: its columns from the
// first tile holding an adapter of the call to the last (the columns outside them are never read).
std::optional<AdapterStack> shared_stack(at::TensorList lora_A, at::TensorList lora_B) {
  SharedStacks& stacks = shared_stacks();
  SharedStack s;
  {
    std::lock_guard<std::mutex> lock(stacks.mutex);
    auto it = stacks.by_a.find(lora_A[0].storage().unsafeGetStorageImpl());
    if (it == stacks.by_a.end()) return std::nullopt;
    s = it->second;
  }
  std::vector<int64_t> columns;
  int64_t first = s.rank, last = 0;
  for (size_t k = 0; k < lora_A.size(); ++k) {
    const int64_t column = shared_column(s, lora_A[k], lora_B[k]);
    if (column < 0) return std::nullopt;
    columns.push_back(column);
    columns.push_back(column + lora_A[k].size(0));
    first = std::min(first, column);
    last = std::max(last, column + lora_A[k].size(0));
  }
  first = first / kRankQuantum * kRankQuantum;
  last = round_up(last);  // <= s.rank: the shared stack's rank is rounded up too
  for (int64_t& c : columns) c -= first;
  const at::Tensor a = lora_A[0].detach().as_strided({last - first, s.d_in}, {s.d_in, 1}, first * s.d_in);
  const at::Tensor b = lora_B[0].detach().as_strided({s.d_out, last - first}, {s.rank, 1}, first);
  return AdapterStack{a, b, at::Tensor(), std::move(columns)};
}

// The stack of the call's factors: their shared stack, else a packed copy.
AdapterStack factors_stack(at::TensorList lora_A, at::TensorList lora_B) {
  if (std::optional<AdapterStack> shared = shared_stack(lora_A, lora_B)) return *std::move(shared);
  auto [a, b] = stack_factors(lora_A, lora_B);
  return AdapterStack{a, b, at::Tensor(), packed_columns(lora_A)};
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

std::vector<int64_t> packed_columns(at::TensorList lora_A) {
  std::vector<int64_t> columns;
  int64_t next = 0;
  for (const at::Tensor& a : lora_A) {
    columns.push_back(next);
    columns.push_back(next += a.size(0));
  }
  return columns;
}

int64_t stacked_rank(at::TensorList lora_A) {
  return round_up(rank_sum(lora_A));
}

std::pair<at::Tensor, at::Tensor> stack_in_shared_storage(at::TensorList lora_A, at::TensorList lora_B) {
  constexpr const char* op = "shared_adapter_stack";
  TORCH_CHECK(!lora_A.empty(), op, ": lora_A must list at least one adapter");
  TORCH_CHECK(lora_B.size() == lora_A.size(), op, ": lora_A and lora_B must list the same adapters, got ",
              lora_A.size(), " and ", lora_B.size(), " entries");
  const at::Tensor& a0 = lora_A[0];
  TORCH_CHECK(a0.dim() == 2 && lora_B[0].dim() == 2, op, ": lora_A[0] must be [r, d_in] and lora_B[0] [d_out, r], got ",
              a0.sizes(), " and ", lora_B[0].sizes());
  const int64_t d_in = a0.size(1), d_out = lora_B[0].size(0);
  for (size_t k = 0; k < lora_A.size(); ++k) {
    const at::Tensor &a = lora_A[k], &b = lora_B[k];
    TORCH_CHECK(a.dim() == 2 && a.size(1) == d_in && a.size(0) >= 1, op, ": lora_A[", k, "] must be [r, d_in] = [r, ",
                d_in, "] with r >= 1, got ", a.sizes());
    TORCH_CHECK(b.dim() == 2 && b.size(0) == d_out && b.size(1) == a.size(0), op, ": lora_B[", k,
                "] must be [d_out, r] = [", d_out, ", ", a.size(0), "], got ", b.sizes());
    TORCH_CHECK(at::isFloatingType(a.scalar_type()) && a.scalar_type() == a0.scalar_type() &&
                    b.scalar_type() == a0.scalar_type(),
                op, ": every lora_A and lora_B must have lora_A[0]'s floating dtype ", a0.scalar_type(), ", adapter ",
                k, " has ", a.scalar_type(), " and ", b.scalar_type());
    TORCH_CHECK(a.device() == a0.device() && b.device() == a0.device(), op,
                ": every adapter must be on lora_A[0]'s device ", a0.device(), ", adapter ", k, " has ", a.device(),
                " and ", b.device());
  }
  // Plain tensors outside autograd whatever the caller's mode: views of them become parameters' data.
  const c10::NoGradGuard no_grad;
  const c10::InferenceMode not_inference(false);
  const int64_t rank = stacked_rank(lora_A);
  at::Tensor a_stack = at::zeros({rank, d_in}, a0.options()), b_stack = at::zeros({d_out, rank}, a0.options());
  const std::vector<int64_t> columns = packed_columns(lora_A);
  for (size_t k = 0; k < lora_A.size(); ++k) {
    const int64_t first = columns[2 * k], r = columns[2 * k + 1] - first;
    a_stack.narrow(0, first, r).copy_(lora_A[k]);
    b_stack.narrow(1, first, r).copy_(lora_B[k]);
  }
  SharedStacks& stacks = shared_stacks();
  std::lock_guard<std::mutex> lock(stacks.mutex);
  for (auto it = stacks.by_a.begin(); it != stacks.by_a.end();) {  // forget the stacks no view holds any more
    it = it->second.a.expired() || it->second.b.expired() ? stacks.by_a.erase(it) : std::next(it);
  }
  stacks.by_a[a_stack.storage().unsafeGetStorageImpl()] = SharedStack{a_stack.storage().getWeakStorageImpl(),
                                                                      b_stack.storage().getWeakStorageImpl(),
                                                                      rank,
                                                                      d_in,
                                                                      d_out,
                                                                      a0.scalar_type()};
  return {std::move(a_stack), std::move(b_stack)};
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
    AdapterStack stack = factors_stack(lora_A, lora_B);
    stack.g = stack_g(make_g(), d_out, options);
    return stack;
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
  AdapterStack stack = factors_stack(lora_A, lora_B);
  stack.g = stack_g(g, d_out, options);
  Entry e{generation, WeakImpl(weight.getIntrusivePtr()), {}, std::move(g_inputs), g, std::move(stack)};
  for (size_t k = 0; k < lora_A.size(); ++k) {
    e.factors.push_back(Fingerprint::of(lora_A[k]));
    e.factors.push_back(Fingerprint::of(lora_B[k]));
  }
  const AdapterStack made = e.stack;
  std::lock_guard<std::mutex> lock(c.mutex);
  sweep_locked(c, generation);
  c.entries[weight.unsafeGetTensorImpl()] = std::move(e);
  return made;
}

}  // namespace dora_ext
