#pragma once
// The rows of a mixed-adapter batch grouped by adapter (dora_linear_mixed, mixed.h): on the host,
// from the adapter index PEFT passes on the CPU, so that no group needs a device-to-host copy.
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

namespace dora_ext {

// The leading rows of x that use one adapter (or the base model: adapter -1). A group whose rows are
// consecutive is read and written through views; the others are gathered with `rows` (a slice of one
// device tensor holding every gathered group's row numbers).
struct RowGroup {
  int64_t adapter = -1;
  int64_t first = 0, count = 0;  // consecutive rows: [first, first + count)
  bool consecutive = true;
  at::Tensor rows;  // the row numbers on the device, when not consecutive
};

// `adapter_index` as a contiguous int64 CPU tensor: itself when it is one (PEFT's), else a copy (an
// index on the GPU is read back: a synchronisation).
at::Tensor host_index(const at::Tensor& adapter_index);

// The groups of `adapter_index` (validated: -1 .. adapters - 1), adapters in order and the base
// model's rows last. The scattered groups' row numbers reach `device` in one copy from pinned memory
// that does not wait for the GPU's queue.
std::vector<RowGroup> group_rows(const at::Tensor& adapter_index, int64_t adapters, const at::Device& device);

}  // namespace dora_ext
