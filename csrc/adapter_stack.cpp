#include "adapter_stack.h"

#include <ATen/ATen.h>

namespace dora_ext {
namespace {

// The stack's rank is padded to this many columns: h's and B's row strides then keep the 16-element
// alignment the aligned kernel variants promise (vector loads), whatever the adapters' ranks.
constexpr int64_t kRankQuantum = 16;

}  // namespace

std::vector<int64_t> adapter_columns(at::TensorList lora_A) {
  std::vector<int64_t> columns{0};
  for (const at::Tensor& a : lora_A) columns.push_back(columns.back() + a.size(0));
  return columns;
}

AdapterStack stack_adapters(at::TensorList lora_A, at::TensorList lora_B, const std::vector<at::Tensor>& g) {
  TORCH_CHECK(!lora_A.empty(), "stack_adapters: lora_A must list at least one adapter");
  const int64_t rank = adapter_columns(lora_A).back(), d_in = lora_A[0].size(1), d_out = lora_B[0].size(0);
  const int64_t pad = (kRankQuantum - rank % kRankQuantum) % kRankQuantum;
  std::vector<at::Tensor> a(lora_A.begin(), lora_A.end()), b(lora_B.begin(), lora_B.end());
  if (pad > 0) {
    a.push_back(at::zeros({pad, d_in}, lora_A[0].options()));
    b.push_back(at::zeros({d_out, pad}, lora_B[0].options()));
  }
  const at::Tensor ones = at::ones({1, d_out}, lora_B[0].options().dtype(at::kFloat));
  std::vector<at::Tensor> rows;
  for (const at::Tensor& gk : g) rows.push_back(gk.defined() ? gk.to(at::kFloat).view({1, d_out}) : ones);
  rows.push_back(ones);  // base-model rows
  return {at::cat(a, 0), at::cat(b, 1), at::cat(rows, 0)};
}

}  // namespace dora_ext
