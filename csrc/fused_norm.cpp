#include "fused_norm.h"

#include "dispatch.h"
#include "eager.h"
#include "fused_common.h"

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <limits>

namespace dora_ext {
namespace {

// Every BLOCK_K in triton_src/specs.py divides this: a split of d_in starts on a
// block boundary and stays 16-aligned.
constexpr int64_t kSplitQuantum = 128;
// A split of d_in shorter than this spends more time in its epilogue than in its loop.
constexpr int64_t kMinSplitColumns = 512;

// A program's fixed cost in columns of d_in: its pipeline fills (stages x BLOCK_K, 192-256
// columns in triton_src/specs.py) before the first MMA, and its epilogue runs after the last.
constexpr int64_t kProgramOverheadColumns = 256;

int64_t rank_tile(int64_t rank) {
  return rank <= 16 ? 16 : rank <= 32 ? 32 : rank <= 64 ? 64 : 128;
}

// How many ways to split d_in. Every program of a launch does the same work, so the launch
// takes ceil(programs / slots) waves of one program each (slots: the programs the GPU runs at
// once); pick the split count with the least waves x (columns per program + fixed cost), the
// fewest splits on ties. E.g. 96 tiles on 132 one-program SMs: 3 splits (288 programs, 2.2
// waves) cost 3 x (2816 + 256) columns of an 8192-wide W; 4 splits (3 waves of 2048) cost
// 3 x (2048 + 256).
int64_t choose_splits(int64_t d_in, int64_t tiles, int64_t slots) {
  const int64_t max_splits = std::max<int64_t>(1, d_in / kMinSplitColumns);
  int64_t best = 1, best_cost = std::numeric_limits<int64_t>::max();
  for (int64_t splits = 1; splits <= max_splits; ++splits) {
    const int64_t columns = cdiv(cdiv(d_in, splits), kSplitQuantum) * kSplitQuantum;
    const int64_t cost = cdiv(tiles * cdiv(d_in, columns), slots) * (columns + kProgramOverheadColumns);
    if (cost < best_cost) best = splits, best_cost = cost;
  }
  return best;
}

}  // namespace

at::Tensor row_norm_fused(const at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B, double scale,
                          const at::Tensor& cached_weight_sq, at::Tensor* weight_sq) {
  const at::ScalarType dtype = weight.scalar_type();
  if (!has_fused_kernels_for(dtype)) return {};
  if (lora_A.scalar_type() != dtype) return {};  // float32 adapters on a 16-bit weight: the eager path
  const int64_t d_out = weight.size(0), d_in = weight.size(1), rank = lora_A.size(0);
  if (d_out == 0 || d_in == 0 || rank == 0) return {};
  // The kernel reads W and A along d_in with vector loads: unit stride and
  // 16-aligned rows, else the eager path (cuBLAS handles any layout).
  if (weight.stride(1) != 1 || lora_A.stride(1) != 1 || (rank > 1 && lora_B.stride(1) != 1)) return {};
  if (!all_aligned16({&weight, &lora_A}, {d_in, weight.stride(0), lora_A.stride(0)})) return {};
  const c10::DeviceIndex device = weight.device().index();
  const int64_t block_r = rank_tile(rank);
  const bool want_wsq = !cached_weight_sq.defined();
  // "a16" also promises r, B's row stride and B's pointer 16-aligned (vector loads
  // of B and G in the Gram epilogue).
  const bool a16 = all_aligned16({&lora_B}, {rank, lora_B.stride(0)});
  const KernelImage* partials = find_kernel(kernels::NormPartials{dtype, block_r, want_wsq, a16}, device);
  const KernelImage* finish = find_kernel(kernels::NormFinish{at::kFloat}, device);
  if (partials == nullptr || finish == nullptr) return {};

  c10::cuda::CUDAGuard guard(weight.device());
  const int64_t row_tiles = cdiv(d_out, partials->tile_rows);
  const int64_t rank_tiles = cdiv(rank, block_r);
  // Split d_in so that the programs fill whole waves of the GPU: at small ranks the pass is
  // a read of W, which needs every SM to reach HBM bandwidth; at large ones a last wave
  // that is mostly idle costs as much as a full one. Programs per SM: as many as shared
  // memory and threads allow (registers permitting).
  const DeviceInfo& info = device_info(device);
  const int64_t per_sm = std::clamp<int64_t>(
      std::min<int64_t>(info.shared_per_sm / std::max(partials->shared_bytes, 1), 64 / partials->num_warps), 1, 32);
  const int64_t slots = info.multiprocessors * per_sm;
  const int64_t k_per_split =
      cdiv(cdiv(d_in, choose_splits(d_in, row_tiles * rank_tiles, slots)), kSplitQuantum) * kSplitQuantum;
  const int64_t splits = cdiv(d_in, k_per_split);

  const at::TensorOptions f32 = weight.options().dtype(at::kFloat);
  // G = A A^T [r, r] in fp32: one small cuBLAS GEMM (split over d_in where r is tiny).
  const at::Tensor gram =
      (dtype == at::kFloat ? at::mm(lora_A, lora_A.t()) : at::mm(lora_A, lora_A.t(), at::kFloat)).contiguous();
  at::Tensor cross = at::empty({splits * rank_tiles, d_out}, f32);
  at::Tensor wsq_parts = want_wsq ? at::empty({splits, d_out}, f32) : cached_weight_sq;
  launch(*partials, device, {rank_tiles, row_tiles, splits},
         {weight, lora_A, lora_B, gram, cross, wsq_parts, d_out, d_in, rank, weight.stride(0), lora_A.stride(0),
          lora_B.stride(0), k_per_split, static_cast<float>(scale)});
  at::Tensor norm = at::empty({d_out}, f32);
  at::Tensor wsq_out = want_wsq && weight_sq != nullptr ? at::empty({d_out}, f32) : at::Tensor();
  launch(*finish, device, {cdiv(d_out, finish->tile_rows), 1, 1},
         {cross, wsq_parts, norm, wsq_out.defined() ? wsq_out : norm, d_out, splits * rank_tiles,
          want_wsq ? splits : static_cast<int64_t>(1), static_cast<int64_t>(wsq_out.defined()),
          static_cast<float>(scale), static_cast<float>(kNormEpsilon * kNormEpsilon)});
  if (wsq_out.defined()) *weight_sq = wsq_out;
  return norm;
}

}  // namespace dora_ext
