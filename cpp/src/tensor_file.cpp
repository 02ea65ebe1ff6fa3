#include "dora_ext/tensor_file.h"

#include <ATen/EmptyTensor.h>
#include <ATen/core/Dict.h>
#include <c10/util/Exception.h>
#include <caffe2/serialize/inline_container.h>
#include <torch/csrc/jit/serialization/export.h>
#include <torch/csrc/jit/serialization/pickler.h>
#include <torch/csrc/jit/serialization/unpickler.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <fstream>
#include <unordered_map>

namespace dora_ext {
namespace {

constexpr std::array<at::ScalarType, 10> kSupported = {at::kDouble, at::kFloat, at::kHalf, at::kBFloat16, at::kLong,
                                                       at::kInt,    at::kShort, at::kChar, at::kByte,     at::kBool};

// The unpickler asks for classes it does not know (anything but tensors, containers and
// scalars); a tensor file holds none.
c10::StrongTypePtr refuse_class(const c10::QualifiedName& name) {
  TORCH_CHECK(false, "the file refers to the class ", name.qualifiedName(),
              "; a tensor file holds only dicts of strings and tensors");
}

// Every storage the unpickler asked for, by the address of its bytes: how many bytes the
// archive's record really holds. The unpickler sizes a storage from the pickle's element
// count, not from the record, so a short record must be caught here before any tensor is read.
class RecordReader {
 public:
  explicit RecordReader(caffe2::serialize::PyTorchStreamReader& archive) : archive_(archive) {}

  at::DataPtr operator()(const std::string& key) {
    auto [data, bytes] = archive_.getRecord("data/" + key);
    record_bytes_[data.get()] = bytes;
    return std::move(data);
  }

  // The bytes of the record behind `storage`; -1 for a storage that no record backs.
  int64_t bytes_behind(const c10::Storage& storage) const {
    auto it = record_bytes_.find(storage.data_ptr().get());
    return it == record_bytes_.end() ? -1 : static_cast<int64_t>(it->second);
  }

 private:
  caffe2::serialize::PyTorchStreamReader& archive_;
  std::unordered_map<const void*, size_t> record_bytes_;
};

// A checked, compact CPU copy of one unpickled tensor.
at::Tensor checked_tensor(const at::Tensor& t, const RecordReader& records, const std::string& where) {
  TORCH_CHECK(t.device().is_cpu(), where, " is on ", t.device(), "; expected a CPU tensor");
  TORCH_CHECK(std::find(kSupported.begin(), kSupported.end(), t.scalar_type()) != kSupported.end(), where,
              " has dtype ", t.scalar_type(),
              " (supported: float64, float32, float16, bfloat16, int64, int32, int16, int8, uint8, bool)");
  // The bytes the tensor's view reaches (throws on overflow), against the storage ...
  const size_t reach = at::detail::computeStorageNbytes(t.sizes(), t.strides(), t.element_size(),
                                                        static_cast<size_t>(t.storage_offset()));
  const size_t storage_bytes = t.storage().nbytes();
  TORCH_CHECK(reach <= storage_bytes, where, " (shape ", t.sizes(), ", strides ", t.strides(), ", offset ",
              t.storage_offset(), ") reaches ", reach, " bytes of a ", storage_bytes, "-byte storage");
  // ... and the storage against the record that holds its bytes.
  if (storage_bytes > 0) {
    const int64_t record = records.bytes_behind(t.storage());
    TORCH_CHECK(record >= 0 && static_cast<size_t>(record) >= storage_bytes, where, " declares a storage of ",
                storage_bytes, " bytes, but its record holds ", record < 0 ? 0 : record);
  }
  return t.clone(at::MemoryFormat::Contiguous);
}

std::string string_value(const c10::IValue& v, const std::string& where) {
  TORCH_CHECK(v.isString(), where, " must be a string, got ", v.tagKind());
  return v.toStringRef();
}

c10::impl::GenericDict dict_value(const c10::IValue& v, const std::string& where) {
  TORCH_CHECK(v.isGenericDict(), where, " must be a dict, got ", v.tagKind());
  return v.toGenericDict();
}

TensorFile read_archive(const std::string& path) {
  caffe2::serialize::PyTorchStreamReader archive(path);
  auto [pickle, pickle_bytes] = archive.getRecord("data.pkl");
  size_t offset = 0;
  auto read_pickle = [&, data = static_cast<const char*>(pickle.get())](char* buffer, size_t n) -> size_t {
    n = std::min(n, pickle_bytes - offset);
    std::memcpy(buffer, data + offset, n);
    offset += n;
    return n;
  };
  RecordReader records(archive);
  torch::jit::Unpickler unpickler(
      read_pickle, refuse_class, /*obj_loader=*/nullptr, [&](const std::string& key) { return records(key); },
      at::Device(at::kCPU));
  const c10::IValue root = unpickler.parse_ivalue();

  const std::string where = "load_tensor_file: " + path;
  const c10::impl::GenericDict top = dict_value(root, where + ": the file's object");
  TensorFile out;
  for (const auto& entry : top) {
    const std::string key = string_value(entry.key(), where + ": a top-level key");
    if (key == "metadata") {
      for (const auto& m : dict_value(entry.value(), where + ": \"metadata\"")) {
        const std::string name = string_value(m.key(), where + ": a metadata key");
        out.metadata[name] = string_value(m.value(), where + ": metadata \"" + name + "\"");
      }
    } else if (key == "tensors") {
      for (const auto& t : dict_value(entry.value(), where + ": \"tensors\"")) {
        const std::string name = string_value(t.key(), where + ": a tensor name");
        const std::string at = where + ": tensor \"" + name + "\"";
        TORCH_CHECK(t.value().isTensor(), at, " must be a tensor, got ", t.value().tagKind());
        out.tensors[name] = checked_tensor(t.value().toTensor(), records, at);
      }
    } else {
      TORCH_CHECK(false, where, ": unexpected top-level key \"", key, "\" (expected \"metadata\" and \"tensors\")");
    }
  }
  TORCH_CHECK(top.contains("tensors"), where, " has no \"tensors\" dict");
  return out;
}

}  // namespace

TensorFile load_tensor_file(const std::string& path) {
  TORCH_CHECK(std::ifstream(path, std::ios::binary).good(), "load_tensor_file: cannot open ", path);
  try {
    return read_archive(path);
  } catch (const c10::Error& e) {
    // LibTorch's own messages do not name the file: say which one, and keep theirs.
    const std::string msg = e.what_without_backtrace();
    if (msg.rfind("load_tensor_file: ", 0) == 0) throw;
    TORCH_CHECK(false, "load_tensor_file: ", path, " is not a readable tensor file: ", msg);
  } catch (const std::exception& e) {
    TORCH_CHECK(false, "load_tensor_file: ", path, " is not a readable tensor file: ", e.what());
  }
}

void save_tensor_file(const std::string& path, const std::map<std::string, at::Tensor>& tensors,
                      const std::map<std::string, std::string>& metadata) {
  c10::Dict<std::string, at::Tensor> tensor_dict;
  for (const auto& [name, tensor] : tensors) {
    TORCH_CHECK(tensor.defined(), "save_tensor_file: tensor \"", name, "\" is undefined");
    TORCH_CHECK(std::find(kSupported.begin(), kSupported.end(), tensor.scalar_type()) != kSupported.end(),
                "save_tensor_file: tensor \"", name, "\" has dtype ", tensor.scalar_type(),
                ", which tensor files do not hold");
    // A compact copy: a view would carry its whole storage into the file.
    tensor_dict.insert(name, tensor.detach().to(at::kCPU).clone(at::MemoryFormat::Contiguous));
  }
  c10::Dict<std::string, std::string> metadata_dict;
  for (const auto& [k, v] : metadata) metadata_dict.insert(k, v);
  c10::impl::GenericDict root(c10::StringType::get(), c10::AnyType::get());
  root.insert("metadata", metadata_dict);
  root.insert("tensors", tensor_dict);
  // torch.save's layout, written by LibTorch's pickler and zip writer; no type tags on the dicts,
  // which Python's weights-only unpickler would refuse.
  std::vector<char> pickle;
  torch::jit::Pickler pickler([&](const char* data, size_t n) { pickle.insert(pickle.end(), data, data + n); },
                              /*tensor_table=*/nullptr, /*type_renamer=*/nullptr, /*memoized_class_types=*/nullptr,
                              /*get_tensor_id=*/nullptr, /*tag_aggregates=*/false);
  pickler.protocol();
  pickler.pushIValue(root);
  pickler.stop();
  caffe2::serialize::PyTorchStreamWriter archive(path);
  torch::jit::writeArchiveAndTensors("data", pickle.data(), pickle.size(), pickler.tensorData(), archive);
  archive.writeEndOfFile();
}

}  // namespace dora_ext
