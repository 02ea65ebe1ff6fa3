#pragma once
// Several adapters of one layer laid side by side along the rank, for the mixed-batch kernels
// (mixed_stacked.h): h = x A_cat^T holds every adapter's term, and a kernel applies each row's own
// columns of h and B_cat (the others are masked).
#include <ATen/core/List.h>
#include <ATen/core/Tensor.h>

#include <functional>
#include <optional>
#include <vector>

namespace dora_ext {

// K adapters stacked along the rank R (their ranks' sum, padded with zeros to a multiple of 32).
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

// Each adapter's g (float32 [d_out]; undefined for plain LoRA), from the norm cache.
using MakeG = std::function<std::vector<at::Tensor>()>;

// The stack of K >= 1 adapters of one dtype on `weight` (magnitude[k] None: plain LoRA). The last stack
// made for each weight is reused whole, G included and `make_g` not called, while W, every lora_A[k],
// lora_B[k] and magnitude[k] keeps its identity, storage and version, the scales are the same and no
// invalidation of the norm cache happened: the norm cache's own rule for reusing a norm and g
// (norm_cache.h), checked once for the whole stack instead of once per adapter. When only W, a
// magnitude or a scale changed, the factors are kept and G is remade from `make_g` (a [K + 1, d_out]
// copy, skipped when every g is the tensor G was made of). With the norm_cache option off nothing is
// kept. The result is shared with the cache: not to be written to.
AdapterStack stack_adapters(const at::Tensor& weight, at::TensorList lora_A, at::TensorList lora_B,
                            const c10::List<std::optional<at::Tensor>>& magnitude, at::ArrayRef<double> scale,
                            const MakeG& make_g);

}  // namespace dora_ext
