#include "fused_norm.h"

#include "dispatch.h"
#include "eager.h"
#include "fused_common.h"

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>

namespace dora_ext {
namespace {

// Every BLOCK_K in triton_src/specs.py divides this: a split of d_in starts on a
// block boundary and stays 16-aligned.
constexpr int64_t kSplitQuantum = 128;
// A split of d_in shorter than this spends more time in its epilogue than in its loop.
constexpr int64_t kMinSplitColumns = 512;

int64_t rank_tile(int64_t rank) {
  return rank <= 16 ? 16 : rank <= 32 ? 32 : rank <= 64 ? 64 : 128;
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
  const KernelImage* partials =
      find_kernel("dora_norm_partials_kernel",
                  std::string(dtype_key(dtype)) + "_r" + std::to_string(block_r) + (want_wsq ? "_wsq" : "_nowsq") +
                      (a16 ? "_a16" : "_any"),
                  device);
  const KernelImage* finish = find_kernel("dora_norm_finish_kernel", "fp32", device);
  if (partials == nullptr || finish == nullptr) return {};

  c10::cuda::CUDAGuard guard(weight.device());
  const int64_t row_tiles = cdiv(d_out, partials->tile_rows);
  const int64_t rank_tiles = cdiv(rank, block_r);
  // Split d_in until the grid covers every SM about twice: at small ranks the
  // pass is a read of W, and a read needs the whole GPU to reach HBM bandwidth.
  const int64_t sms = device_info(device).multiprocessors;
  int64_t splits = std::clamp<int64_t>(cdiv(2 * sms, row_tiles * rank_tiles), 1,
                                       std::max<int64_t>(1, d_in / kMinSplitColumns));
  const int64_t k_per_split = cdiv(cdiv(d_in, splits), kSplitQuantum) * kSplitQuantum;
  splits = cdiv(d_in, k_per_split);

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
