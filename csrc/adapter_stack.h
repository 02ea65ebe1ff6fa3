#pragma once
// Several adapters of one layer laid side by side along the rank, for the mixed-batch kernels
// (mixed_stacked.h): h = x A_cat^T holds every adapter's term, and a kernel applies each row's own
// columns of h and B_cat (the others are masked).
#include <ATen/core/Tensor.h>

#include <vector>

namespace dora_ext {

// K adapters stacked along the rank R (their ranks' sum, padded with zeros to a multiple of 16).
struct AdapterStack {
  at::Tensor lora_A;  // [R, d_in]: adapter k's rows from adapter_columns(...)[k] on
  at::Tensor lora_B;  // [d_out, R]: adapter k's columns at the same place
  at::Tensor g;       // [K + 1, d_out] float32: g_k = m_k / n_k of a DoRA adapter, ones for plain
                      // LoRA adapters and, in the last row, for base-model rows
};

// Where adapter k's columns start in the stack: K + 1 offsets, the last one the sum of the ranks.
std::vector<int64_t> adapter_columns(at::TensorList lora_A);

// The stack's rank R: the ranks' sum, padded.
int64_t stacked_rank(at::TensorList lora_A);

// The stack of K >= 1 adapters of one dtype on `weight`; g[k] is adapter k's g (float32 [d_out], from
// the norm cache), undefined for plain LoRA. The last stack made for each weight is reused while
// every lora_A[k] and lora_B[k] keeps its identity, storage and version and no invalidation of the
// norm cache happened (its rules, norm_cache.h; with the norm_cache option off nothing is kept); its
// G while each g is the same tensor. The result is shared with the cache: not to be written to.
AdapterStack stack_adapters(const at::Tensor& weight, at::TensorList lora_A, at::TensorList lora_B,
                            const std::vector<at::Tensor>& g);

}  // namespace dora_ext
