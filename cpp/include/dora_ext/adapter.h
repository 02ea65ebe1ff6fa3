#pragma once
// DoRA adapters exported from Python by dora_ext.export (a tensor file, tensor_file.h; see
// docs/CPP.md): load them in C++ and run DoRA layers with the row norm that was
// computed at export time, so inference never recomputes it.
#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>

#include <map>
#include <optional>
#include <string>
#include <vector>

namespace dora_ext {

// The "format" metadata value of an adapter file, and the version this reader understands.
inline constexpr const char* kAdapterFormat = "dora_ext.adapter";
inline constexpr const char* kAdapterFormatVersion = "2";

// One DoRA layer: W' = m * (W + s B A) / norm, with W (and the bias) kept by the caller.
struct DoraLayer {
  at::Tensor lora_A;     // [r, d_in]
  at::Tensor lora_B;     // [d_out, r]
  at::Tensor magnitude;  // [d_out]
  at::Tensor norm;       // [d_out] = ||W + s B A||_row, float32 (float64 for float64 factors)
  double scale = 1.0;    // s = alpha / r (alpha / sqrt(r) with rsLoRA)

  // y = base + compose_delta(base, (x A^T) B^T, m, norm, s) + bias with base = x W^T:
  // exactly dora_linear's function, without recomputing the norm. x is [..., d_in]
  // in the dtype of A, B and W; y is [..., d_out] in that dtype.
  at::Tensor forward(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) const;

  // Recomputes the norm for a base weight other than the one the adapter was exported with.
  void recompute_norm(const at::Tensor& weight);

  // A copy on `device` computing in `dtype`: A and B in `dtype`, the magnitude and the
  // norm in float32 (float64 when `dtype` is float64). A float32 norm moved to float64
  // keeps float32 accuracy: export in float64 to run in float64.
  DoraLayer to(c10::Device device, at::ScalarType dtype) const;
};

struct DoraAdapter {
  std::map<std::string, DoraLayer> layers;      // by module path, e.g. "blocks.0.fc1"
  std::map<std::string, std::string> metadata;  // the file's metadata (format, dtype, source, ...)

  // The layer at `name`; throws c10::Error listing the known layers if there is none.
  const DoraLayer& layer(const std::string& name) const;
  DoraAdapter to(c10::Device device, at::ScalarType dtype) const;
};

// Several adapters of one base model, each row of a batch with its own (serving): the base GEMM
// once for the batch, then each adapter's rows with its precomputed norm, as DoraLayer::forward
// computes them; rows with adapter index -1 (or whose adapter lacks the layer) get the base output.
struct DoraAdapterSet {
  std::vector<DoraAdapter> adapters;  // adapter k of adapter_index

  // Layer `name` on x [rows, ..., d_in] whose leading row i uses adapter adapter_index[i] (int64 [rows]
  // on the CPU or x's device; -1: the base model): [rows, ..., d_out] in x's dtype. Each row equals
  // DoraLayer::forward of that row alone with its adapter's layer. An out-of-range index, a wrong
  // length or a layer no adapter has throws c10::Error naming it.
  at::Tensor forward(const std::string& name, const at::Tensor& x, const at::Tensor& weight,
                     const std::optional<at::Tensor>& bias, const at::Tensor& adapter_index) const;
  DoraAdapterSet to(c10::Device device, at::ScalarType dtype) const;
};

// Reads the adapter files written by dora_ext.export.save_adapter, in order (adapter k = paths[k]).
DoraAdapterSet load_adapter_set(const std::vector<std::string>& paths);

// Reads an adapter file written by dora_ext.export.save_adapter. Checks the format,
// that every layer has lora_A, lora_B, magnitude, norm and scale with matching shapes.
DoraAdapter load_adapter(const std::string& path);

}  // namespace dora_ext
