#pragma once
// Several adapters of one layer laid side by side along the rank, for the mixed-batch kernels
// (mixed_stacked.h): h = x A_cat^T holds every adapter's term, and a kernel applies each row's own
// columns of h and B_cat (the others are masked).
#include <ATen/core/List.h>
#include <ATen/core/Tensor.h>

#include <functional>
#include <optional>
#include <utility>
#include <vector>

namespace dora_ext {

// K adapters side by side along the rank R (a multiple of 32; the columns no adapter of the call owns
// are zeros or other adapters of a shared stack, see stack_in_shared_storage).
struct AdapterStack {
  at::Tensor lora_A;             // [R, d_in]: adapter k's rows are columns[2k] .. columns[2k + 1] - 1
  at::Tensor lora_B;             // [d_out, R] (row stride: lora_B.stride(0)): adapter k's columns, the same
  at::Tensor g;                  // [K + 1, d_out] float32: g_k = m_k / n_k of a DoRA adapter, ones for plain
                                 // LoRA adapters and, in the last row, for base-model rows
  std::vector<int64_t> columns;  // 2K: adapter k owns columns [columns[2k], columns[2k + 1])
};

// The column ranges of K adapters packed one after another from column 0 (2K entries, as
// AdapterStack::columns).
std::vector<int64_t> packed_columns(at::TensorList lora_A);

// The packed stack's rank R: the ranks' sum, padded.
int64_t stacked_rank(at::TensorList lora_A);

// K adapters of one dtype and device (lora_A[k] [r_k, d_in], lora_B[k] [d_out, r_k]) copied into one
// new zero-padded stack at their packed_columns: returns the stack (A [R, d_in], B [d_out, R]), which
// the caller cuts into per-adapter views (adapter k's rows of A, its columns of B: a row stride of R).
// Mixed batches over views of one such stack, any of its adapters in any order, read them where they
// are: stack_adapters copies nothing (the stack is known by its storage, kept weakly: it lives as long
// as a view of it). Serving then holds each adapter once. The stack itself is returned, not the views,
// because a custom op's outputs may not alias each other.
std::pair<at::Tensor, at::Tensor> stack_in_shared_storage(at::TensorList lora_A, at::TensorList lora_B);

// Each adapter's g (float32 [d_out]; undefined for plain LoRA), from the norm cache.
using MakeG = std::function<std::vector<at::Tensor>()>;

// The stack of K >= 1 adapters of one dtype on `weight` (magnitude[k] None: plain LoRA): the adapters'
// own shared stack when they are views of one (stack_in_shared_storage), else a packed copy. The last stack
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
