// Schemas of every dora_ext op (defined once, here) and the public C++ API,
// which calls them through the dispatcher.
#include "dora_ext.h"

#include "adapter_stack.h"
#include "dispatch.h"
#include "eager.h"
#include "kernel_registry.h"
#include "launcher.h"
#include "norm_cache.h"
#include "options.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>
#include <torch/version.h>

namespace dora_ext {
namespace {

#ifdef DORA_EXT_WITH_CUDA
constexpr const char* kCudaBuild = "true";
#else
constexpr const char* kCudaBuild = "false";
#endif

std::tuple<std::string, std::string> select_tier_op(const at::Tensor& x, const at::Tensor& weight,
                                                    const at::Tensor& lora_A, bool training) {
  TORCH_CHECK(weight.dim() == 2, "select_tier: weight must be 2-D [d_out, d_in], got shape ", weight.sizes());
  (void)lora_A;  // part of the signature so the decision can depend on the rank
  TierDecision d = choose_tier(x, weight.size(0), training);
  return {tier_name(d.tier), d.reason};
}

std::tuple<std::string, std::string> last_tier_op() {
  const TierDecision& d = last_tier();
  return {tier_name(d.tier), d.reason};
}

std::tuple<bool, std::string> fused_available_op(int64_t device) {
  std::string why;
  bool ok = fused_kernels_available(static_cast<c10::DeviceIndex>(device), &why);
  return {ok, why};
}

std::tuple<int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t> norm_cache_stats_op() {
  const NormCacheStats s = norm_cache_stats();
  return {s.norm_hits, s.norm_misses, s.weight_sq_hits, s.scale_hits, s.bypassed, s.entries, s.invalidations};
}

std::tuple<at::Tensor, at::Tensor> shared_adapter_stack_op(at::TensorList lora_A, at::TensorList lora_B) {
  auto [a, b] = stack_in_shared_storage(lora_A, lora_B);
  return {std::move(a), std::move(b)};
}

std::string build_info_op() {
  std::string archs;
  for (int64_t arch : compiled_archs()) archs += (archs.empty() ? "" : ", ") + std::to_string(arch);
  return std::string("{\"torch_version\": \"") + TORCH_VERSION + "\", \"triton_version\": \"" + aot_triton_version() +
         "\", \"cuda_build\": " + kCudaBuild + ", \"archs\": [" + archs +
         "], \"kernels\": " + std::to_string(kernel_images().size()) + "}";
}

}  // namespace

TORCH_LIBRARY(dora_ext, m) {
  // Public ops.
  m.def("row_norm(Tensor weight, Tensor lora_A, Tensor lora_B, float scale) -> Tensor");
  // The squared norm before clamp and root, for column shards of W and A (sums over d_in add up).
  m.def("row_norm_sq(Tensor weight, Tensor lora_A, Tensor lora_B, float scale) -> Tensor");
  // The clamp of the norm: a zero row gets this norm (g = 0, output = bias).
  m.def("norm_epsilon() -> float", [] { return kNormEpsilon; });
  m.def(
      "dora_linear(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B, Tensor magnitude, "
      "float scale) -> Tensor");
  // dora_linear with PEFT's lora_dropout: x_dropped = lora_dropout(x) feeds the adapter's terms,
  // y = x W^T + bias + (g - 1) (x_dropped W^T) + g s (x_dropped A^T) B^T (csrc/dropout.h).
  m.def(
      "dora_linear_dropout(Tensor x, Tensor x_dropped, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B, "
      "Tensor magnitude, float scale) -> Tensor");
  // Mixed-adapter batches (inference): leading row i of x uses adapter adapter_index[i] (-1: the base
  // model); magnitude[k] None makes adapter k plain LoRA (csrc/mixed.h).
  m.def(
      "dora_linear_mixed(Tensor x, Tensor weight, Tensor? bias, Tensor[] lora_A, Tensor[] lora_B, "
      "Tensor?[] magnitude, float[] scale, Tensor adapter_index) -> Tensor");
  // The adapters of one layer copied into one new stack at packed columns (ranks summed, padded to 32);
  // views of it, which share_adapter_storage cuts, are read in place by mixed batches (adapter_stack.h).
  m.def("shared_adapter_stack(Tensor[] lora_A, Tensor[] lora_B) -> (Tensor lora_A_stack, Tensor lora_B_stack)");
  m.def("compose_delta(Tensor base, Tensor lora, Tensor magnitude, Tensor norm, float scale) -> Tensor");
  // Training forward and backward behind dora_linear's and compose_delta's autograd.
  // z is [T, d_out] with keep_z, else empty; the backward's magnitude gradient takes z, else the
  // output, else recomputes z (csrc/magnitude_grad.h; the saved_activation option picks).
  m.def(
      "dora_linear_forward(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B, "
      "Tensor magnitude, float scale, bool keep_z) -> (Tensor out, Tensor z, Tensor h, Tensor norm)");
  m.def(
      "dora_linear_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B, "
      "Tensor magnitude, Tensor norm, Tensor? z, Tensor? out, Tensor h, float scale, bool[5] output_mask) "
      "-> (Tensor grad_x, Tensor grad_lora_A, Tensor grad_lora_B, Tensor grad_magnitude, Tensor grad_bias)");
  m.def(
      "dora_linear_dropout_forward(Tensor x, Tensor x_dropped, Tensor weight, Tensor? bias, Tensor lora_A, "
      "Tensor lora_B, Tensor magnitude, float scale, bool keep_z) "
      "-> (Tensor out, Tensor z_dropped, Tensor h, Tensor norm)");
  // z_dropped None (saved_activation=recompute): the backward recomputes it from x_dropped.
  m.def(
      "dora_linear_dropout_backward(Tensor grad_out, Tensor x_dropped, Tensor weight, Tensor lora_A, Tensor lora_B, "
      "Tensor magnitude, Tensor norm, Tensor? z_dropped, Tensor h, float scale, bool[6] output_mask) "
      "-> (Tensor grad_x, Tensor grad_x_dropped, Tensor grad_lora_A, Tensor grad_lora_B, Tensor grad_magnitude, "
      "Tensor grad_bias)");
  m.def(
      "compose_delta_backward(Tensor grad_out, Tensor base, Tensor lora, Tensor magnitude, Tensor norm, "
      "float scale, bool[3] output_mask) -> (Tensor grad_base, Tensor grad_lora, Tensor grad_magnitude)");
  // Introspection.
  m.def("select_tier(Tensor x, Tensor weight, Tensor lora_A, bool training) -> (str tier, str reason)",
        &select_tier_op);
  m.def("last_tier() -> (str tier, str reason)", &last_tier_op);
  m.def("fused_available(int device) -> (bool available, str reason)", &fused_available_op);
  m.def("build_info() -> str", &build_info_op);
  // The row-norm cache (norm_cache.h).
  m.def(
      "norm_cache_stats() -> (int norm_hits, int norm_misses, int weight_sq_hits, int scale_hits, int bypassed, "
      "int entries, int invalidations)",
      &norm_cache_stats_op);
  m.def("clear_norm_cache() -> ()", &clear_norm_cache);
  m.def("invalidate_norm_cache() -> ()", &invalidate_norm_cache);
  // Run-time options (options.h): process-wide, and per thread.
  m.def("set_option(str name, str value) -> ()", &set_option);
  m.def("get_option(str name) -> str", &get_option);
  m.def("thread_option(str name) -> str?", &thread_option);
  m.def("set_thread_option(str name, str? value) -> ()", &set_thread_option);
  m.def("norm_cache_generation() -> int", &norm_cache_generation);
}

// One kernel for every device, below autograd (the stacks it returns are plain tensors), so that the
// fake kernel in dora_ext/ops.py serves tracing.
TORCH_LIBRARY_IMPL(dora_ext, CompositeExplicitAutograd, m) {
  m.impl("shared_adapter_stack", &shared_adapter_stack_op);
}

at::Tensor row_norm(const at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B, double scale) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("dora_ext::row_norm", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, double)>();
  return op.call(weight, lora_A, lora_B, scale);
}

at::Tensor row_norm_sq(const at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B, double scale) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("dora_ext::row_norm_sq", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, double)>();
  return op.call(weight, lora_A, lora_B, scale);
}

at::Tensor dora_linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                       const at::Tensor& lora_A, const at::Tensor& lora_B, const at::Tensor& magnitude, double scale) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("dora_ext::dora_linear", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                         const at::Tensor&, const at::Tensor&, const at::Tensor&, double)>();
  return op.call(x, weight, bias, lora_A, lora_B, magnitude, scale);
}

at::Tensor dora_linear_dropout(const at::Tensor& x, const at::Tensor& x_dropped, const at::Tensor& weight,
                               const std::optional<at::Tensor>& bias, const at::Tensor& lora_A,
                               const at::Tensor& lora_B, const at::Tensor& magnitude, double scale) {
  static auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("dora_ext::dora_linear_dropout", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                            const at::Tensor&, const at::Tensor&, const at::Tensor&, double)>();
  return op.call(x, x_dropped, weight, bias, lora_A, lora_B, magnitude, scale);
}

at::Tensor dora_linear_mixed(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                             at::TensorList lora_A, at::TensorList lora_B,
                             const c10::List<std::optional<at::Tensor>>& magnitude, at::ArrayRef<double> scale,
                             const at::Tensor& adapter_index) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("dora_ext::dora_linear_mixed", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                         at::TensorList, at::TensorList, const c10::List<std::optional<at::Tensor>>&,
                                         at::ArrayRef<double>, const at::Tensor&)>();
  return op.call(x, weight, bias, lora_A, lora_B, magnitude, scale, adapter_index);
}

std::pair<std::vector<at::Tensor>, std::vector<at::Tensor>> share_adapter_storage(at::TensorList lora_A,
                                                                                  at::TensorList lora_B) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("dora_ext::shared_adapter_stack", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(at::TensorList, at::TensorList)>();
  std::vector<at::Tensor> a_in, b_in;  // detached: the views are plain tensors, whatever requires a gradient
  for (const at::Tensor& t : lora_A) a_in.push_back(t.detach());
  for (const at::Tensor& t : lora_B) b_in.push_back(t.detach());
  const auto [a_stack, b_stack] = op.call(a_in, b_in);
  std::vector<at::Tensor> a, b;
  const std::vector<int64_t> columns = packed_columns(lora_A);
  for (size_t k = 0; k < lora_A.size(); ++k) {
    const int64_t first = columns[2 * k], r = columns[2 * k + 1] - first;
    a.push_back(a_stack.narrow(0, first, r));
    b.push_back(b_stack.narrow(1, first, r));
  }
  return {std::move(a), std::move(b)};
}

at::Tensor compose_delta(const at::Tensor& base, const at::Tensor& lora, const at::Tensor& magnitude,
                         const at::Tensor& norm, double scale) {
  static auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("dora_ext::compose_delta", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, double)>();
  return op.call(base, lora, magnitude, norm, scale);
}

std::pair<std::string, std::string> select_tier(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_A,
                                                bool training) {
  auto [tier, reason] = select_tier_op(x, weight, lora_A, training);
  return {tier, reason};
}

std::pair<std::string, std::string> last_tier_used() {
  auto [tier, reason] = last_tier_op();
  return {tier, reason};
}

std::string build_info() {
  return build_info_op();
}

}  // namespace dora_ext
