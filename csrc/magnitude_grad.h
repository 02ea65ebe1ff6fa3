#pragma once
// The first pass of dora_linear's backward over the output gradient gy: gz = gy * g (the GEMMs'
// input) and the magnitude gradient grad_m = colsum(gy * z) / norm, z = x W^T + s (x A^T) B^T,
// from whatever the training forward kept of size [T, d_out] (options.h, SavedActivation):
//  - z itself (saved_activation=z; the dropout op's z of the dropped input);
//  - the layer's output y = g z + bias (saved_activation=output): grad_m = colsum(gy (y - bias)) / (g norm)
//    where that keeps z's precision, the other columns recomputed exactly from x
//    (docs/DESIGN.md section 11 has the precision argument);
//  - nothing (saved_activation=recompute; output while a CUDA graph is captured, where finding the
//    columns to recompute would read device data on the host): z recomputed from x.
#include <ATen/core/Tensor.h>
#include <c10/core/Event.h>

#include <memory>
#include <optional>
#include <utility>

namespace dora_ext {

// {gz = gy * g in gy's dtype, grad_m = colsum(gy * z) / norm in norm's dtype}; 2-D gy and z.
std::pair<at::Tensor, at::Tensor> grad_prologue(const at::Tensor& gy, const at::Tensor& z, const at::Tensor& g,
                                                const at::Tensor& norm, bool fused);

// z's columns `cols` (int64 indices; every column when undefined) recomputed from the saved 2-D x
// and h = x A^T as the forward made them, in x's dtype.
at::Tensor recompute_z(const at::Tensor& x2d, const at::Tensor& weight, const at::Tensor& lora_B, const at::Tensor& h,
                       double scale, const at::Tensor& cols);

// The prologue from the output: gz, grad_m in norm's dtype with the columns the output cannot
// give precisely (`unrecovered`, bool [d_out]) still zero, and their count on its way to the host
// (on CUDA: a pinned int64 copied behind the prologue, `counted` recorded after the copy).
struct OutputPrologue {
  at::Tensor gz;
  at::Tensor grad_m;
  at::Tensor unrecovered;
  at::Tensor unrecovered_count;
  std::shared_ptr<c10::Event> counted;
};
OutputPrologue grad_prologue_from_output(const at::Tensor& gy, const at::Tensor& y, const at::Tensor& g,
                                         const at::Tensor& norm, const std::optional<at::Tensor>& bias, bool fused);

// Fills the unrecovered columns of p.grad_m exactly, from x. Waits for their count on the host
// (until the prologue's copy lands, not for work queued after it): call it after the backward's
// GEMMs are queued, so the GPU runs them meanwhile. Only when some column is unrecovered does it
// sync the device (to gather those columns).
void recompute_unrecovered(OutputPrologue& p, const at::Tensor& gy, const at::Tensor& x2d, const at::Tensor& weight,
                           const at::Tensor& lora_B, const at::Tensor& h, double scale, const at::Tensor& norm);

}  // namespace dora_ext
