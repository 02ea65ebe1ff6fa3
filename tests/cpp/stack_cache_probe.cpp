// A window on the stack cache of the mixed-batch kernels (csrc/adapter_stack.h) for
// tests/test_adapter_stack_cache.py: the CUDA kernels are its only callers, so without this the
// cache's reuse rules and its reading of shared stacks in place would be tested on a GPU only.
// Built as a Python extension linked against the installed dora_ext library (one cache, the
// library's own).
#include "adapter_stack.h"

#include <torch/extension.h>

#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

namespace {

// stack_adapters as csrc/mixed_stacked.cpp calls it, with a make_g that counts its calls and gives
// adapter k the g (k + 1) * ones (undefined for plain LoRA): returns (make_g calls, the stack's A,
// its B, its G, its column ranges).
std::tuple<int64_t, at::Tensor, at::Tensor, at::Tensor, std::vector<int64_t>> stack(
    const at::Tensor& weight, const std::vector<at::Tensor>& lora_A, const std::vector<at::Tensor>& lora_B,
    const std::vector<std::optional<at::Tensor>>& magnitude, const std::vector<double>& scale) {
  c10::List<std::optional<at::Tensor>> magnitudes;
  for (const std::optional<at::Tensor>& m : magnitude) magnitudes.push_back(m);
  int64_t calls = 0;
  const dora_ext::AdapterStack s = dora_ext::stack_adapters(weight, lora_A, lora_B, magnitudes, scale, [&] {
    ++calls;
    std::vector<at::Tensor> g(lora_A.size());
    for (size_t k = 0; k < lora_A.size(); ++k) {
      if (magnitude[k].has_value()) g[k] = at::full({weight.size(0)}, static_cast<double>(k + 1), at::kFloat);
    }
    return g;
  });
  return {calls, s.lora_A, s.lora_B, s.g, s.columns};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("stack", &stack);
}
