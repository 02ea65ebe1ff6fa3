#include "dispatch.h"

#include "crossover.h"
#include "launcher.h"
#include "options.h"

#include <c10/util/Exception.h>

namespace dora_ext {
namespace {

using Override = TierOverride;

const Crossover& crossover_for(int arch) {
  for (const Crossover& c : kCrossovers) {
    if (c.arch == arch) return c;
  }
  return kDefaultCrossover;
}

thread_local TierDecision last_decision{Tier::Eager, "no DoRA op has run on this thread"};

}  // namespace

const char* tier_name(Tier tier) {
  switch (tier) {
    case Tier::Eager:
      return "eager";
    case Tier::FusedInference:
      return "fused_inference";
    case Tier::FusedTraining:
      return "fused_training";
  }
  return "unknown";
}

bool has_fused_kernels_for(at::ScalarType dtype) {
  return dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kFloat;
}

TierDecision choose_tier(const at::Tensor& x, int64_t d_out, bool training, bool honor_forced_tier) {
  const Override forced = honor_forced_tier ? current_options().tier : Override::Auto;
  const Tier fused = training ? Tier::FusedTraining : Tier::FusedInference;
  auto cannot_fuse = [&](std::string why) -> TierDecision {
    TORCH_CHECK(forced != Override::Fused, "DORA_EXT_TIER=fused, but the fused path cannot run: ", why);
    if (forced == Override::PreferFused) {
      TORCH_WARN_ONCE("dora_ext: DORA_EXT_TIER=prefer_fused, but the fused path cannot run here (", why,
                      "); running the eager path. Warned once per process; dora_ext.last_tier() tells per call.");
    }
    return {Tier::Eager, std::move(why)};
  };
  if (!x.is_cuda()) return cannot_fuse(std::string("device ") + x.device().str() + " has no fused kernels");
  if (!has_fused_kernels_for(x.scalar_type())) {
    return cannot_fuse(std::string("dtype ") + c10::toString(x.scalar_type()) + " has no fused kernels");
  }
  std::string why;
  if (!fused_kernels_available(x.device().index(), &why)) return cannot_fuse(why);
  if (forced == Override::Eager) return {Tier::Eager, "forced by DORA_EXT_TIER=eager"};
  if (forced == Override::Fused) return {fused, "forced by DORA_EXT_TIER=fused"};
  if (forced == Override::PreferFused) return {fused, "asked for by DORA_EXT_TIER=prefer_fused"};
  const Crossover& c = crossover_for(device_arch(x.device().index()));
  const int64_t tokens = x.dim() == 0 ? 1 : x.numel() / std::max<int64_t>(x.size(-1), 1);
  const int64_t min_elements = training ? c.min_elements_training : c.min_elements_inference;
  if (tokens * d_out < min_elements) {
    return {Tier::Eager, "below the crossover (tokens*d_out " + std::to_string(tokens * d_out) + " < " +
                             std::to_string(min_elements) + "; " + c.source + ")"};
  }
  return {fused, std::string("fused kernels for this device (") + c.source + ")"};
}

void record_tier(const TierDecision& decision) {
  last_decision = decision;
}

const TierDecision& last_tier() {
  return last_decision;
}

}  // namespace dora_ext
