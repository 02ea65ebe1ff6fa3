#pragma once
// The preamble of every op implementation, after it validated its arguments:
// the activations' device made current, the tier chosen by the dispatcher and
// recorded for last_tier(). One place, so every op and every backend does the
// same (ops_impl.cpp).
#include "dispatch.h"

#include <ATen/core/Tensor.h>
#include <c10/core/DeviceGuard.h>

#include <string>

namespace dora_ext {

class OpScope {
 public:
  // `activations` give the device and the token count ([..., features]); `d_out` the
  // layer's width; `training` asks for the path that saves for backward;
  // `honor_forced_tier` false ignores the tier option (choose_tier).
  OpScope(const at::Tensor& activations, int64_t d_out, bool training, bool honor_forced_tier = true)
      : guard_(activations.device()), decision_(choose_tier(activations, d_out, training, honor_forced_tier)) {
    record_tier(decision_);
  }

  bool fused() const {
    return decision_.tier != Tier::Eager;
  }

  // An op-specific rule sends a fused decision to the eager path (recorded).
  void fall_back(std::string why) {
    decision_ = {Tier::Eager, std::move(why)};
    record_tier(decision_);
  }

  // Which fused variant serves the call, appended to the recorded reason.
  void note(const std::string& detail) {
    decision_.reason += "; " + detail;
    record_tier(decision_);
  }

 private:
  c10::DeviceGuard guard_;
  TierDecision decision_;
};

}  // namespace dora_ext
