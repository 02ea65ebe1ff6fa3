#pragma once
// The row-norm cache. DoRA's norm depends only on the frozen weight W, the
// adapters A and B and the scale, which change once per optimizer step (or
// never, in eval): recomputing it on every forward, every gradient-accumulation
// micro-step and every checkpoint recompute wastes a pass over W. Entries are
// keyed on each tensor's identity, storage pointer and version counter (which
// every in-place write, optimizer steps and load_state_dict included, bumps),
// so a changed tensor is never served a stale norm.
//
// Bypassed (computed fresh, nothing stored) for inference-mode tensors (they
// have no version counter), while a CUDA stream is being captured (a replayed
// graph must recompute), and when DORA_EXT_NORM_CACHE=0.
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <functional>

namespace dora_ext {

// Computes the norm. `cached_weight_sq` is ||W_i||^2 when the cache has it
// (undefined otherwise); a computation that forms ||W_i||^2 itself stores it in
// `*weight_sq` so the next change of A or B reuses it.
using NormCompute = std::function<at::Tensor(const at::Tensor& cached_weight_sq, at::Tensor* weight_sq)>;

// The row norm of (weight, lora_A, lora_B, scale), reused while none changed.
// The result is shared with the cache: callers must not write to it.
at::Tensor cached_row_norm(const at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B, double scale,
                           const NormCompute& compute);

// g = magnitude / norm (see magnitude_scale), contiguous, reused while the
// magnitude is unchanged and `norm` is the one the cache holds for `weight`.
at::Tensor cached_magnitude_scale(const at::Tensor& weight, const at::Tensor& magnitude, const at::Tensor& norm);

struct NormCacheStats {
  int64_t norm_hits = 0;
  int64_t norm_misses = 0;
  int64_t weight_sq_hits = 0;  // misses of the norm that reused ||W||^2
  int64_t scale_hits = 0;
  int64_t bypassed = 0;
  int64_t entries = 0;         // filled in by norm_cache_stats()
};
NormCacheStats norm_cache_stats();
void clear_norm_cache();  // also resets the counters

}  // namespace dora_ext
