#include "mixed_row_table.h"

#include "capture.h"
#include "mixed_rows.h"
#include "never_destroyed.h"

#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>

#include <cstring>
#include <map>
#include <mutex>
#include <utility>

namespace dora_ext {
namespace {

// Int32 fields per token of the row table (mixed_row_table.h).
constexpr int64_t kRowFields = 4;

// What a table is made of, compared by value: the same values give the same table, whoever wrote the
// index tensor and however (no version counter is trusted).
struct TableKey {
  std::vector<int64_t> index;
  int64_t repeat = 0;
  std::vector<int64_t> columns;
  std::vector<double> scales;

  bool operator==(const TableKey& other) const {
    return repeat == other.repeat && index == other.index && columns == other.columns && scales == other.scales;
  }
};

at::Tensor make_table(const TableKey& key, const at::Device& device) {
  const int64_t rows = static_cast<int64_t>(key.index.size()), adapters = static_cast<int64_t>(key.scales.size());
  at::Tensor table =
      at::empty({rows * key.repeat, kRowFields}, at::TensorOptions().dtype(at::kInt).pinned_memory(true));
  int32_t* out = table.mutable_data_ptr<int32_t>();
  for (const int64_t k : key.index) {
    int32_t fields[kRowFields] = {static_cast<int32_t>(adapters), 0, 0, 0};  // base model: G's ones, no columns
    if (k >= 0) {
      const float s = static_cast<float>(key.scales[k]);
      fields[0] = static_cast<int32_t>(k);
      fields[1] = static_cast<int32_t>(key.columns[2 * k]);
      fields[2] = static_cast<int32_t>(key.columns[2 * k + 1]);
      std::memcpy(&fields[3], &s, sizeof(s));
    }
    for (int64_t j = 0; j < key.repeat; ++j, out += kRowFields) std::memcpy(out, fields, sizeof(fields));
  }
  return table.to(device, /*non_blocking=*/true);
}

// One table per (device, stream): a table is only ever read on the stream it was made for, so
// replacing it frees memory that stream no longer reads.
struct TableCache {
  std::mutex mutex;
  std::map<std::pair<c10::DeviceIndex, c10::StreamId>, std::pair<TableKey, at::Tensor>> last;
};

}  // namespace

at::Tensor row_table(const at::Tensor& adapter_index, int64_t repeat, const std::vector<int64_t>& columns,
                     at::ArrayRef<double> scale, const at::Device& device) {
  const at::Tensor index = host_index(adapter_index);
  const int64_t* values = index.const_data_ptr<int64_t>();
  TableKey key{{values, values + index.numel()}, repeat, columns, scale.vec()};
  if (stream_capturing(device)) {
    return make_table(key, device);  // a replayed graph reads its own copy
  }
  const auto stream = std::make_pair(device.index(), c10::cuda::getCurrentCUDAStream(device.index()).id());
  TableCache& cache = never_destroyed<TableCache>();
  {
    std::lock_guard<std::mutex> lock(cache.mutex);
    auto it = cache.last.find(stream);
    if (it != cache.last.end() && it->second.first == key) return it->second.second;
  }
  at::Tensor table = make_table(key, device);
  std::lock_guard<std::mutex> lock(cache.mutex);
  cache.last[stream] = {std::move(key), table};
  return table;
}

}  // namespace dora_ext
