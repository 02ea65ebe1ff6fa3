#pragma once
// Where fused beats eager, per GPU arch: below these sizes the eager path is
// chosen in auto mode. The entries are measured, not guessed:
// scripts/crossover.py times both paths over a (tokens x d_out) grid on a GPU
// and rewrites that arch's line in crossover_table.inc. An arch with no entry
// uses kDefaultCrossover.
#include <cstdint>

namespace dora_ext {

struct Crossover {
  int arch;                        // 10 * major + minor
  int64_t min_elements_inference;  // fused inference when tokens * d_out >= this
  int64_t min_elements_training;   // fused training when tokens * d_out >= this
  const char* source;              // where the numbers come from
};

// With no measurement for an arch, fused runs at every size: the fused passes
// do no more work than the eager chain of elementwise kernels they replace.
constexpr Crossover kDefaultCrossover{0, 0, 0, "default: fused at every size (no measurement for this arch)"};

constexpr Crossover kCrossovers[] = {
#include "crossover_table.inc"
    kDefaultCrossover,
};

}  // namespace dora_ext
