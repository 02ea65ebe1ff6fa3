// The C++ readers of tensor and adapter files, alone (no ops), for tests/test_tensor_file.py,
// which builds this with AddressSanitizer and UndefinedBehaviorSanitizer:
//
//   load_check tensors FILE...   one line per file: "OK <name>:<dtype>:<d0>x<d1>...:<sum> ..." or "ERROR <message>"
//   load_check adapter FILE...   one line per file: "OK <layer>:<r>x<d_in>->(<d_out>) ..." or "ERROR <message>"
//   load_check save FILE         writes a tensor file of known content (for Python to read back)
#include <dora_ext/adapter.h>
#include <dora_ext/tensor_file.h>

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <iostream>
#include <sstream>
#include <string>

namespace {

std::string one_line(std::string s) {
  for (char& c : s) {
    if (c == '\n' || c == '\r') c = ' ';
  }
  return s;
}

std::string describe_tensors(const std::string& path) {
  std::ostringstream out;
  out.precision(17);
  for (const auto& [name, t] : dora_ext::load_tensor_file(path).tensors) {
    out << " " << name << ":" << t.scalar_type() << ":";
    for (int64_t d = 0; d < t.dim(); ++d) out << (d ? "x" : "") << t.size(d);
    out << ":" << (t.numel() ? t.to(at::kDouble).sum().item<double>() : 0.0);
  }
  return out.str();
}

std::string describe_adapter(const std::string& path) {
  std::ostringstream out;
  for (const auto& [name, l] : dora_ext::load_adapter(path).layers) {
    out << " " << name << ":" << l.lora_A.size(0) << "x" << l.lora_A.size(1) << "->(" << l.lora_B.size(0) << ")";
  }
  return out.str();
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 3) {
    std::cerr << "usage: load_check tensors|adapter|save FILE..." << std::endl;
    return 2;
  }
  const std::string mode = argv[1];
  if (mode == "save") {
    std::map<std::string, at::Tensor> tensors = {
        {"f32", at::arange(12, at::kFloat).reshape({3, 4}).div(7)},
        {"bf16", at::arange(5, at::kFloat).to(at::kBFloat16)},
        {"i64", at::arange(6, at::kLong)},
        {"view", at::arange(20, at::kDouble).slice(0, 3, 9, 2)},  // a strided view of a larger storage
        {"empty", at::empty({0, 3}, at::kHalf)}};
    dora_ext::save_tensor_file(argv[2], tensors, {{"written_by", "load_check"}});
    std::cout << "SAVED" << std::endl;
    return 0;
  }
  for (int i = 2; i < argc; ++i) {
    try {
      const std::string description = mode == "adapter" ? describe_adapter(argv[i]) : describe_tensors(argv[i]);
      std::cout << "OK" << description << std::endl;
    } catch (const c10::Error& e) {
      std::cout << "ERROR " << one_line(e.what_without_backtrace()) << std::endl;
    }
  }
  return 0;
}
