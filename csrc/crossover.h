#pragma once
// Where fused beats eager, per GPU arch: below these sizes the eager path is
// chosen in auto mode. Regenerate the entries with scripts/crossover.py on the
// target GPU; an arch with no entry uses kDefaultCrossover.
#include <cstdint>

namespace dora_ext {

struct Crossover {
  int arch;                // 10 * major + minor
  int64_t min_d_out;       // fused only when d_out >= this
  int64_t min_elements;    // ... and tokens * d_out >= this
  const char* source;      // where the numbers come from
};

// The fused compose pass replaces a chain of elementwise ATen kernels over the
// same [T, d_out] data, so it does no more work than eager at any size; until a
// measurement on an arch says otherwise, fused is chosen at every size.
constexpr Crossover kDefaultCrossover{0, 0, 0, "default: fused at every size (no measurement for this arch)"};

constexpr Crossover kCrossovers[] = {
    kDefaultCrossover,
};

}  // namespace dora_ext
