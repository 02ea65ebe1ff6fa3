#pragma once
// The run-time options of dora_ext, in one place.
//
//   name                    environment variable              default
//   tier                    DORA_EXT_TIER                     auto   (auto|eager|fused|prefer_fused)
//   norm_cache              DORA_EXT_NORM_CACHE               1      (0 turns the row-norm cache off)
//   decode_max_tokens       DORA_EXT_DECODE_MAX_TOKENS        16     (0 turns the decode kernels off)
//   fp32_parts_min_tokens   DORA_EXT_FP32_PARTS_MIN_TOKENS    512
//   saved_activation        DORA_EXT_SAVED_ACTIVATION         output (output|z|recompute)
//
// The process-wide values are read from the environment once, on first use,
// and changed with set_option (torch.ops.dora_ext.set_option; Python:
// dora_ext.set_options). A thread may override any of them for a scope
// (ThreadOptionsGuard; Python: `with dora_ext.options(...)`); the autograd
// functions carry the options of a forward into its backward, which autograd
// runs on another thread for CUDA. Nothing reads the environment per call.
#include <array>
#include <cstdint>
#include <optional>
#include <string>

namespace dora_ext {

enum class TierOverride { Auto, Eager, Fused, PreferFused };

// What a training dora_linear keeps of size [T, d_out] for its magnitude gradient, which needs
// z = x W^T + s (x A^T) B^T (csrc/magnitude_grad.h):
//   Output     the layer's output y, which the next op often keeps anyway (attention keeps v,
//              the MLP's activation and product keep gate and up): z = (y - bias) / g, with the
//              columns where that loses precision recomputed exactly (docs/DESIGN.md section 11);
//   Z          a private copy of z: the fastest backward, the most memory;
//   Recompute  nothing: the backward recomputes z from x (one more GEMM of the forward's size).
enum class SavedActivation { Output, Z, Recompute };

struct Options {
  TierOverride tier = TierOverride::Auto;
  bool norm_cache = true;
  int64_t decode_max_tokens = 16;
  int64_t fp32_parts_min_tokens = 512;
  SavedActivation saved_activation = SavedActivation::Output;
};

// The options in effect on this thread: the process-wide ones with this
// thread's overrides on top. A malformed environment variable raises here, naming it.
Options current_options();

// Process-wide: `name` as in the table above, `value` as its environment
// variable would spell it; an unknown name or a malformed value raises.
void set_option(const std::string& name, const std::string& value);

// `name`'s value in effect on this thread, spelled as set_option takes it.
std::string get_option(const std::string& name);

// This thread's override of `name`, if any; set_thread_option with no value removes it.
std::optional<std::string> thread_option(const std::string& name);
void set_thread_option(const std::string& name, const std::optional<std::string>& value);

// Values a thread overrides: `values` where `set` says so, the process-wide value elsewhere
// (indexed in the order of the table above).
struct OptionOverrides {
  Options values;
  std::array<bool, 5> set{};
};

// Makes `options` this thread's complete set for its lifetime (an autograd
// backward runs with its forward's options), then restores the overrides before.
class ThreadOptionsGuard {
 public:
  explicit ThreadOptionsGuard(const Options& options);
  ~ThreadOptionsGuard();
  ThreadOptionsGuard(const ThreadOptionsGuard&) = delete;
  ThreadOptionsGuard& operator=(const ThreadOptionsGuard&) = delete;

 private:
  OptionOverrides previous_;
};

}  // namespace dora_ext
