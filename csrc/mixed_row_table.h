#pragma once
// The row table the stacked mixed-batch kernels read (mixed_stacked.h): per token, its row of G, the
// first and one-past-last column of its adapter in h and B, and the float32 bits of its scale.
#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

#include <cstdint>
#include <vector>

namespace dora_ext {

// The int32 [rows * repeat, 4] table of `adapter_index` (validated: -1 .. adapters - 1; on the
// CPU, else read back) on `device`, each leading row's entry repeated `repeat` times; `columns` are
// the stack's column ranges (AdapterStack::columns, adapter_stack.h). Built in pinned host memory and copied without
// waiting for the GPU's queue. The table of the last call on each device and stream is kept and returned again for the
// same index values, repeat, columns and scales (a decode step calls every layer with the same ones), except while the
// stream is being captured. Shared with that cache: not to be written to.
at::Tensor row_table(const at::Tensor& adapter_index, int64_t repeat, const std::vector<int64_t>& columns,
                     at::ArrayRef<double> scale, const at::Device& device);

}  // namespace dora_ext
