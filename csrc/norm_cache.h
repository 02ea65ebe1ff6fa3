#pragma once
// The row-norm cache. DoRA's norm depends only on the frozen weight W, the
// adapters A and B and the scale: recomputing it on every decode step, every
// eval batch and every checkpoint recompute wastes a pass over W. But several
// writers change parameters without bumping their version counters (fused and
// foreach-free optimizers such as AdamW(fused=True), writes through `p.data`,
// bitsandbytes and DeepSpeed optimizers, FSDP refills), so the cache does not
// trust version counters alone. Its rule:
//
//  1. A forward that records gradients (training) computes the norm fresh,
//     except inside a backward pass: a checkpoint recompute reuses the norm its
//     own forward computed.
//  2. A norm used by a backward op is dropped when that backward pass ends (an
//     optimizer step may follow any backward).
//  3. invalidate_norm_cache() drops every norm; the Python package calls it
//     after every torch.optim optimizer step (a global step hook).
//  4. Otherwise (eval, no-grad, inference) a norm is reused while W, A, B and
//     the scale keep their identity, storage and version. A write there that
//     bypasses the version counter must be followed by invalidate_norm_cache().
//
// One entry per base weight holds ||W||^2 and the norms of up to 64 adapters on it (with their
// g = m / n): switching adapters (PEFT's set_adapter) and mixed-adapter batches reuse each
// adapter's norm. Everything in an entry goes with it. Bypassed
// (computed fresh, nothing stored) for inference-mode tensors (they have no
// version counter), while a CUDA stream is being captured (a replayed graph
// must recompute), and with the norm_cache option off (DORA_EXT_NORM_CACHE=0, options.h).
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <functional>

namespace dora_ext {

// Computes the norm. `cached_weight_sq` is ||W_i||^2 when the cache has it
// (undefined otherwise); a computation that forms ||W_i||^2 itself stores it in
// `*weight_sq` so the next change of A or B reuses it.
using NormCompute = std::function<at::Tensor(const at::Tensor& cached_weight_sq, at::Tensor* weight_sq)>;

// Whether values derived from `tensors` may be kept for later calls, by this cache or any other
// cache of values derived from parameters (adapter_stack.h): the norm_cache option on, no inference
// tensors (no version counter), no CUDA-graph capture on the first tensor's device.
bool may_cache(at::TensorList tensors);

// Whether the calling forward records gradients (rule 1 above).
enum class NormUse { Inference, Recording };

// The row norm of (weight, lora_A, lora_B, scale), reused under the rules above.
// The result is shared with the cache: callers must not write to it.
at::Tensor cached_row_norm(const at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B, double scale,
                           NormUse use, const NormCompute& compute);

// g = m / norm (see magnitude_scale), contiguous, reused while the magnitude is
// unchanged and `norm` is the one the cache holds for `weight`.
at::Tensor cached_magnitude_scale(const at::Tensor& weight, const at::Tensor& magnitude, const at::Tensor& norm);

// Called by every backward op with the norm its forward used (rule 2): that norm
// is dropped when the running backward pass ends, or now outside one.
void norm_used_by_backward(const at::Tensor& norm);

// Drops every cached norm (rule 3). Counts as one invalidation.
void invalidate_norm_cache();

// How many invalidations (rules 2 and 3) happened so far; never reset. Caches
// of other quantities derived from parameters (the Python package's adapter
// casts) key on it.
int64_t norm_cache_generation();

struct NormCacheStats {
  int64_t norm_hits = 0;
  int64_t norm_misses = 0;
  int64_t weight_sq_hits = 0;  // misses of the norm that reused ||W||^2
  int64_t scale_hits = 0;
  int64_t bypassed = 0;
  int64_t entries = 0;        // filled in by norm_cache_stats()
  int64_t invalidations = 0;  // backward passes that dropped norms, and invalidate_norm_cache() calls
};
NormCacheStats norm_cache_stats();
void clear_norm_cache();  // also resets the counters

}  // namespace dora_ext
