// A LibTorch program that runs a DoRA model exported from Python, with no Python.
//
//   dora_mlp --base base.pt --adapter adapter.pt --input input.pt \
//            --out out.pt [--device cpu|cuda] [--dtype float32|float64|bfloat16|float16]
//            [--threads N] [--iters N]
//   dora_mlp --base base.pt --adapter a.pt,b.pt --adapter-index 0,1,-1 ...   (mixed-adapter batch)
//   dora_mlp --aoti model.pt2 --input input.pt --out out.pt [--device cpu|cuda]
//
// The model mirrors examples/cpp/make_example.py: residual blocks
// x + fc2(gelu(fc1(layer_norm(x)))) and a head, every linear a DoRA layer run
// with the norm precomputed at export, through a dora_ext::DoraAdapterSet: with several
// adapters, batch row i uses adapter --adapter-index[i] (-1: the base model; default: every row
// adapter 0). With
// --aoti it runs an AOTInductor package instead, whose dora_ext ops are found
// through the PyTorch dispatcher (this program links dora_ext::dora_ext).
//
// Writes to --out: "y" (one call on the main thread) and, with --threads N,
// "thread.<i>": the output of thread i, all N threads making the model's first
// calls at once. Prints one JSON line: device, dtype, tier, median latency.
#include <dora_ext/adapter.h>
#include <dora_ext/dora_ext.h>
#include <dora_ext/tensor_file.h>

#include <ATen/ATen.h>
#include <c10/core/InferenceMode.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/cuda.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <functional>
#include <iostream>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

namespace {

constexpr double kLayerNormEps = 1e-5;  // nn.LayerNorm's default, as in make_example.py

struct Linear {
  std::string name;  // the layer's module path in the adapters
  at::Tensor weight;
  std::optional<at::Tensor> bias;
};

struct Block {
  at::Tensor norm_weight, norm_bias;
  Linear fc1, fc2;
};

class DoraMLP {
 public:
  DoraMLP(const std::string& base_path, const std::vector<std::string>& adapter_paths, c10::Device device,
          at::ScalarType dtype)
      : adapters_(dora_ext::load_adapter_set(adapter_paths).to(device, dtype)) {
    dora_ext::TensorFile base = dora_ext::load_tensor_file(base_path);
    auto tensor = [&](const std::string& key) {
      auto it = base.tensors.find(key);
      TORCH_CHECK(it != base.tensors.end(), "dora_mlp: ", base_path, " has no tensor \"", key, "\"");
      return it->second.to(device, dtype);
    };
    auto linear = [&](const std::string& name) {
      std::optional<at::Tensor> bias;
      if (base.tensors.count(name + ".bias")) bias = tensor(name + ".bias");
      for (const auto& a : adapters_.adapters) a.layer(name);  // every adapter adapts every layer here
      return Linear{name, tensor(name + ".weight"), bias};
    };
    for (int i = 0; base.tensors.count("blocks." + std::to_string(i) + ".fc1.weight"); ++i) {
      const std::string p = "blocks." + std::to_string(i) + ".";
      blocks_.push_back(
          Block{tensor(p + "norm.weight"), tensor(p + "norm.bias"), linear(p + "fc1"), linear(p + "fc2")});
    }
    TORCH_CHECK(!blocks_.empty(), "dora_mlp: ", base_path, " has no blocks.0.fc1.weight");
    head_ = linear("head");
  }

  // Batch row i with adapter adapter_index[i] (-1: the base model).
  at::Tensor forward(at::Tensor x, const at::Tensor& adapter_index) const {
    auto linear = [&](const Linear& l, const at::Tensor& in) {
      return adapters_.forward(l.name, in, l.weight, l.bias, adapter_index);
    };
    for (const Block& b : blocks_) {
      at::Tensor h = at::layer_norm(x, {x.size(-1)}, b.norm_weight, b.norm_bias, kLayerNormEps);
      x = x + linear(b.fc2, at::gelu(linear(b.fc1, h)));
    }
    return linear(head_, x);
  }

 private:
  dora_ext::DoraAdapterSet adapters_;
  std::vector<Block> blocks_;
  Linear head_;
};

struct Args {
  std::string base, adapter, aoti, input, out, adapter_index;
  std::string device = "cpu";
  std::string dtype;  // default: the input's dtype
  int threads = 0;
  int iters = 0;
};

Args parse(int argc, char** argv) {
  Args a;
  for (int i = 1; i < argc; ++i) {
    const std::string flag = argv[i];
    TORCH_CHECK(i + 1 < argc, "dora_mlp: ", flag, " needs a value");
    const std::string value = argv[++i];
    if (flag == "--base")
      a.base = value;
    else if (flag == "--adapter")
      a.adapter = value;
    else if (flag == "--adapter-index")
      a.adapter_index = value;
    else if (flag == "--aoti")
      a.aoti = value;
    else if (flag == "--input")
      a.input = value;
    else if (flag == "--out")
      a.out = value;
    else if (flag == "--device")
      a.device = value;
    else if (flag == "--dtype")
      a.dtype = value;
    else if (flag == "--threads")
      a.threads = std::stoi(value);
    else if (flag == "--iters")
      a.iters = std::stoi(value);
    else
      TORCH_CHECK(false, "dora_mlp: unknown flag ", flag);
  }
  TORCH_CHECK(!a.input.empty() && !a.out.empty(), "dora_mlp: --input and --out are required");
  TORCH_CHECK(!a.aoti.empty() || (!a.base.empty() && !a.adapter.empty()),
              "dora_mlp: give --base and --adapter, or --aoti");
  return a;
}

std::vector<std::string> split(const std::string& list) {
  std::vector<std::string> out;
  size_t start = 0;
  while (start <= list.size()) {
    const size_t comma = std::min(list.find(',', start), list.size());
    out.push_back(list.substr(start, comma - start));
    start = comma + 1;
  }
  return out;
}

// --adapter-index as an int64 [rows] tensor; without it every row uses adapter 0.
at::Tensor adapter_index(const std::string& list, int64_t rows) {
  if (list.empty()) return at::zeros({rows}, at::kLong);
  std::vector<int64_t> values;
  for (const std::string& v : split(list)) values.push_back(std::stoll(v));
  return at::tensor(values, at::kLong);
}

at::ScalarType parse_dtype(const std::string& name) {
  static const std::map<std::string, at::ScalarType> names = {
      {"float32", at::kFloat}, {"float64", at::kDouble}, {"bfloat16", at::kBFloat16}, {"float16", at::kHalf}};
  auto it = names.find(name);
  TORCH_CHECK(it != names.end(), "dora_mlp: unknown dtype ", name);
  return it->second;
}

void synchronize(const c10::Device& device) {
  if (device.is_cuda()) torch::cuda::synchronize(device.index());
}

}  // namespace

int main(int argc, char** argv) try {
  const Args args = parse(argc, argv);
  const c10::Device device(args.device);
  at::Tensor x = dora_ext::load_tensor_file(args.input).tensors.at("x");
  const at::ScalarType dtype = args.dtype.empty() ? x.scalar_type() : parse_dtype(args.dtype);
  x = x.to(device, dtype);

  // One function for both model kinds; it must be safe to call from several threads at once.
  std::function<at::Tensor(const at::Tensor&)> run;
  std::shared_ptr<DoraMLP> mlp;
  std::shared_ptr<torch::inductor::AOTIModelPackageLoader> aoti;
  if (!args.aoti.empty()) {
    aoti = std::make_shared<torch::inductor::AOTIModelPackageLoader>(args.aoti, "model", /*run_single_threaded=*/false,
                                                                     /*num_runners=*/std::max(1, args.threads),
                                                                     device.is_cuda() ? device.index() : -1);
    run = [aoti](const at::Tensor& in) { return aoti->run({in}).at(0); };
  } else {
    mlp = std::make_shared<DoraMLP>(args.base, split(args.adapter), device, dtype);
    const at::Tensor index = adapter_index(args.adapter_index, x.size(0));
    run = [mlp, index](const at::Tensor& in) { return mlp->forward(in, index); };
  }

  std::map<std::string, at::Tensor> outputs;
  if (args.threads > 0) {
    // All threads start together so the first calls of the ops (their lazy setup) race.
    std::vector<at::Tensor> results(args.threads);
    std::atomic<bool> go{false};
    std::vector<std::thread> pool;
    for (int t = 0; t < args.threads; ++t) {
      pool.emplace_back([&, t] {
        c10::InferenceMode guard;  // thread-local: every thread sets it
        while (!go.load()) std::this_thread::yield();
        at::Tensor y;
        for (int k = 0; k < 3; ++k) y = run(x);
        synchronize(device);
        results[t] = y.cpu();
      });
    }
    go.store(true);
    for (auto& th : pool) th.join();
    for (int t = 0; t < args.threads; ++t) outputs["thread." + std::to_string(t)] = results[t];
  }

  c10::InferenceMode guard;
  at::Tensor y = run(x);
  synchronize(device);
  const auto tier = dora_ext::last_tier_used();
  outputs["y"] = y.cpu();

  double median_ms = -1.0;
  if (args.iters > 0) {
    for (int k = 0; k < 3; ++k) run(x);  // warm-up
    synchronize(device);
    std::vector<double> ms;
    for (int k = 0; k < args.iters; ++k) {
      const auto start = std::chrono::steady_clock::now();
      run(x);
      synchronize(device);
      ms.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count());
    }
    std::sort(ms.begin(), ms.end());
    median_ms = ms[ms.size() / 2];
  }
  dora_ext::save_tensor_file(args.out, outputs, {{"tier", tier.first}});
  std::cout << "{\"mode\": \"" << (args.aoti.empty() ? "adapter" : "aoti") << "\", \"device\": \"" << device.str()
            << "\", \"dtype\": \"" << c10::toString(dtype) << "\", \"tier\": \"" << tier.first
            << "\", \"threads\": " << args.threads << ", \"median_ms\": " << median_ms << "}" << std::endl;
  return 0;
} catch (const c10::Error& e) {
  std::cerr << "dora_mlp: " << e.what_without_backtrace() << std::endl;
  return 1;
} catch (const std::exception& e) {
  std::cerr << "dora_mlp: " << e.what() << std::endl;
  return 1;
}
