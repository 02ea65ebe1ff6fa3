#pragma once
// The tier choice: which implementation of a DoRA op runs for given inputs.
//
//   fused_training   fused forward that saves what the fused backward needs
//   fused_inference  fused forward only (no gradient needed)
//   eager            ATen ops: CPU, float64, no cubin for the device's arch,
//                    no CUDA driver, or shapes below the measured crossover
//
// The tier option (DORA_EXT_TIER=auto|eager|fused|prefer_fused, options.h)
// overrides the choice for debugging and benchmarks: "fused" fails with a clear error where fused cannot
// run; "prefer_fused" runs fused wherever kernels exist (ignoring the
// crossover) and falls back to eager with a one-time warning elsewhere. The
// last decision per thread is kept for tests and tools (last_tier()).
#include <ATen/core/Tensor.h>

#include <string>

namespace dora_ext {

enum class Tier { Eager, FusedInference, FusedTraining };

struct TierDecision {
  Tier tier;
  std::string reason;
};

const char* tier_name(Tier tier);

// Whether AOT kernels exist for activations of this dtype (fp16, bf16, fp32;
// the DTYPES of triton_src/specs.py).
bool has_fused_kernels_for(at::ScalarType dtype);

// Decides the tier for activations `x` ([..., d_in] or [T, d_out]) against a
// layer with `d_out` outputs. `training` asks for the path that saves for backward.
// `honor_forced_tier` false treats the tier option as "auto".
TierDecision choose_tier(const at::Tensor& x, int64_t d_out, bool training, bool honor_forced_tier = true);

// Records and reads the decision of the last DoRA op run on this thread.
void record_tier(const TierDecision& decision);
const TierDecision& last_tier();

}  // namespace dora_ext
