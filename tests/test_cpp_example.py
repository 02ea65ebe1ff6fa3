"""The C++ path end to end: build the library with CMake, install it, build examples/cpp against the
installed package (find_package(dora_ext)), run it on adapters exported from Python and compare with
Python and with the float64 reference (DESIGN.md section 6 tolerances).

The build is CPU-only here (-DDORA_EXT_WITH_CUDA=OFF: the eager path; a short build) unless a GPU is
visible, then it includes the fused path for that GPU's arch only. Needs `cmake` (requirements-test.txt)
and a C++ compiler; a missing cmake fails the test rather than skipping it, so CI cannot pass silently.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import dora_ext.export
from dora_ext.nn import DoRALinear
from reference import rel_err
from script_loader import load_script

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "cpp"
CUDA = torch.cuda.is_available()


make_example = load_script(EXAMPLE / "make_example.py")


def _cmake() -> str:
    found = shutil.which("cmake")
    if found is None:
        try:
            import cmake  # the pip package ships the binary

            found = str(Path(cmake.CMAKE_BIN_DIR) / "cmake")
        except ImportError:
            pass
    if found is None:
        pytest.fail("cmake not found: install it (`pip install cmake`, listed in requirements-test.txt)")
    return found


def _run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    assert out.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{out.stdout[-4000:]}\n{out.stderr[-4000:]}"
    return out


@pytest.fixture(scope="module")
def example_exe(tmp_path_factory) -> Path:
    """Configure, build and install the library into a temporary prefix, then build the example
    against that prefix (DORA_EXT_TEST_PREFIX: use that installed library instead). Prints the time
    each step took."""
    cmake = _cmake()
    work = tmp_path_factory.mktemp("cpp")
    jobs = os.environ.get("MAX_JOBS") or str(os.cpu_count() or 1)
    lib_args = [f"-DCMAKE_INSTALL_PREFIX={work / 'prefix'}", f"-DPython3_EXECUTABLE={sys.executable}"]
    if CUDA:
        major, minor = torch.cuda.get_device_capability()
        lib_args += ["-DDORA_EXT_WITH_CUDA=ON", f"-DDORA_EXT_CUDA_ARCHS={major}{minor}"]
    else:
        lib_args += ["-DDORA_EXT_WITH_CUDA=OFF"]
    prefix = work / "prefix"
    steps = [
        ("configure library", [cmake, "-S", str(ROOT), "-B", str(work / "build"), *lib_args]),
        ("build library", [cmake, "--build", str(work / "build"), "-j", jobs]),
        ("install library", [cmake, "--install", str(work / "build")]),
    ]
    if os.environ.get("DORA_EXT_TEST_PREFIX"):  # scripts/cpp_check.sh: the library it just installed
        prefix, steps = Path(os.environ["DORA_EXT_TEST_PREFIX"]), []
    steps += [
        ("configure example", [cmake, "-S", str(EXAMPLE), "-B", str(work / "example"),
                               f"-DCMAKE_PREFIX_PATH={prefix}"]),
        ("build example", [cmake, "--build", str(work / "example"), "-j", jobs]),
    ]
    timings = {}
    for name, cmd in steps:
        start = time.perf_counter()
        _run(cmd)
        timings[name] = round(time.perf_counter() - start, 1)
    print(f"\ntest_cpp_example build times (s, {jobs} jobs): {json.dumps(timings)}")
    installed = {p.relative_to(prefix).as_posix() for p in prefix.rglob("*") if p.is_file()}
    assert {"include/dora_ext/dora_ext.h", "include/dora_ext/adapter.h", "include/dora_ext/tensor_file.h"} <= installed
    assert any(p.endswith("cmake/dora_ext/dora_extConfig.cmake") for p in installed)
    exe = work / "example" / "dora_mlp"
    assert exe.is_file()
    return exe


@pytest.fixture(scope="module")
def trained():
    return make_example.trained_model()


def _ref_forward(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The MLP in float64 with every DoRA layer's dense weight m * (W + sBA) / ||W + sBA||_row."""
    def linear(layer: DoRALinear, h: torch.Tensor) -> torch.Tensor:
        W = layer.base_layer.weight.double()
        dense = W + layer.scaling * (layer.lora_B.weight.double() @ layer.lora_A.weight.double())
        Wp = layer.lora_magnitude_vector.double()[:, None] * dense / dense.norm(dim=1, keepdim=True).clamp_min(1e-6)
        return h @ Wp.T + layer.base_layer.bias.double()

    with torch.no_grad():
        h = x.double()
        for b in model.blocks:
            n = torch.nn.functional.layer_norm(h, (h.shape[-1],), b.norm.weight.double(), b.norm.bias.double(),
                                               make_example.LAYER_NORM_EPS)
            h = h + linear(b.fc2, torch.nn.functional.gelu(linear(b.fc1, n)))
        return linear(model.head, h)


def _export(model, folder: Path, dtype: torch.dtype, tokens: int = 5) -> torch.Tensor:
    folder.mkdir(parents=True, exist_ok=True)
    dora_ext.export.save_base(model, folder / "base.pt", dtype=dtype)
    dora_ext.export.save_adapter(model, folder / "adapter.pt", dtype=dtype)
    x = make_example.make_input(model.blocks[0].fc1.in_features, dtype, seed=int(time.time_ns() % 2**31),
                                tokens=tokens)
    dora_ext.export.save_tensors({"x": x}, folder / "input.pt")
    return x


def _run_example(exe: Path, folder: Path, *flags: str) -> tuple[dict[str, torch.Tensor], dict]:
    out = folder / f"out_{len(list(folder.glob('out_*')))}.pt"
    args = [str(exe), "--input", str(folder / "input.pt"), "--out", str(out), *flags]
    if "--aoti" not in flags:
        args += ["--base", str(folder / "base.pt"), "--adapter", str(folder / "adapter.pt")]
    proc = _run(args)
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    return dora_ext.export.load_tensors(out)[0], summary


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12), (torch.bfloat16, 1e-2)])
def test_cpp_matches_python_and_reference(example_exe, trained, tmp_path, dtype, tol):
    """C++ (4 threads making the first calls at once, then the main thread) against the float64
    reference and against Python's own output at the same dtype."""
    x = _export(trained, tmp_path, dtype)
    outputs, summary = _run_example(example_exe, tmp_path, "--threads", "4")
    assert summary["tier"] == "eager" and summary["device"] == "cpu"
    ref = _ref_forward(trained, x)
    model = copy.deepcopy(trained).to(dtype)  # a copy: the fixture stays float32
    if dtype != torch.float64:  # the exported magnitudes are float32; keep Python's the same
        for m in model.modules():
            if isinstance(m, DoRALinear):
                m.lora_magnitude_vector.data = m.lora_magnitude_vector.data.float()
    with torch.no_grad():
        py = model(x)
    assert set(outputs) == {"y", "thread.0", "thread.1", "thread.2", "thread.3"}
    for key, y in outputs.items():
        assert y.dtype == dtype and y.shape == ref.shape
        assert rel_err(y, ref) < tol, (key, rel_err(y, ref))
        assert rel_err(y, py) < tol, (key, rel_err(y, py))
    assert rel_err(py, ref) < tol


def test_cpp_aoti_package(example_exe, trained, tmp_path):
    """torch.export + AOTInductor package of the same model, run by the C++ example (2 threads)."""
    x = _export(trained, tmp_path, torch.float32)
    start = time.perf_counter()
    make_example.aoti_package(trained, x, tmp_path / "model.pt2")
    print(f"\nAOTInductor package: {time.perf_counter() - start:.1f} s")
    outputs, summary = _run_example(example_exe, tmp_path, "--aoti", str(tmp_path / "model.pt2"), "--threads", "2")
    assert summary["mode"] == "aoti"
    ref = _ref_forward(trained, x)
    with torch.no_grad():
        py = trained(x)
    for key, y in outputs.items():
        assert rel_err(y, ref) < 1e-5, (key, rel_err(y, ref))
        assert rel_err(y, py) < 1e-5, (key, rel_err(y, py))


def test_cpp_runs_a_peft_export(example_exe, tmp_path):
    """An adapter exported from a stock PEFT DoRA model runs in C++ and matches PEFT's output."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(3)
    base = make_example.MLP()
    config = peft.LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["fc1", "fc2", "head"])
    model = peft.get_peft_model(base, config).eval()
    with torch.no_grad():  # a "trained" adapter: B != 0, m != ||W||
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
            elif "lora_magnitude_vector" in name:
                p.mul_(1 + 0.3 * torch.rand_like(p))
    x = _export(model, tmp_path, torch.float32)
    outputs, _ = _run_example(example_exe, tmp_path)
    with torch.no_grad():
        expected = model(x)
    assert rel_err(outputs["y"], expected) < 1e-5


def _with_adapter(model: torch.nn.Module, seed: int, identity: bool = False) -> torch.nn.Module:
    """A copy of ``model`` with another adapter on the same base weights (or, ``identity``, the adapter
    that leaves the base model as it is: B = 0, m = ||W||_row)."""
    out = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in out.modules():
            if isinstance(m, DoRALinear):
                if identity:
                    m.lora_B.weight.zero_()
                    m.lora_magnitude_vector.copy_(m.base_layer.weight.norm(dim=1))
                else:
                    m.lora_B.weight.add_(torch.randn(m.lora_B.weight.shape, generator=gen) * 0.2)
                    m.lora_magnitude_vector.mul_(1 + 0.2 * torch.rand(m.lora_magnitude_vector.shape, generator=gen))
    return out


def test_cpp_mixed_adapter_batch(example_exe, trained, tmp_path):
    """dora_ext::DoraAdapterSet: two adapters of one base model and base-model rows in one batch, each
    row against that row alone in float64 (the adapters' precomputed norms, no Python)."""
    other = _with_adapter(trained, seed=4)
    x = _export(trained, tmp_path, torch.float32)  # base.pt, adapter.pt (the trained adapter), input.pt
    dora_ext.export.save_adapter(other, tmp_path / "other.pt", dtype=torch.float32)
    assert x.shape[0] == 3
    out = tmp_path / "mixed.pt"
    _run([str(example_exe), "--base", str(tmp_path / "base.pt"), "--adapter",
          f"{tmp_path / 'adapter.pt'},{tmp_path / 'other.pt'}", "--adapter-index", "1,-1,0",
          "--input", str(tmp_path / "input.pt"), "--out", str(out)])
    y = dora_ext.export.load_tensors(out)[0]["y"]
    base_model = _with_adapter(trained, seed=0, identity=True)
    for row, model in enumerate([other, base_model, trained]):
        ref = _ref_forward(model, x[row:row + 1])
        assert rel_err(y[row:row + 1], ref) < 1e-5, row
    bad = subprocess.run([str(example_exe), "--base", str(tmp_path / "base.pt"), "--adapter",
                          str(tmp_path / "adapter.pt"), "--adapter-index", "0,2,0", "--input",
                          str(tmp_path / "input.pt"), "--out", str(out)], capture_output=True, text=True)
    assert bad.returncode == 1 and "adapter_index holds 2, but the set has 1 adapters" in bad.stderr


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("tokens", [5, 64], ids=["decode-size", "prefill-size"])
def test_cpp_cuda_mixed_adapter_batch(example_exe, trained, tmp_path, dtype, tol, tokens):
    """DoraAdapterSet on CUDA (with bfloat16, the stacked mixed-batch kernels where they serve), each row
    against that row alone in float64."""
    other = _with_adapter(trained, seed=4)
    x = _export(trained, tmp_path, dtype, tokens=tokens)
    dora_ext.export.save_adapter(other, tmp_path / "other.pt", dtype=dtype)
    out = tmp_path / "mixed.pt"
    _run([str(example_exe), "--base", str(tmp_path / "base.pt"), "--adapter",
          f"{tmp_path / 'adapter.pt'},{tmp_path / 'other.pt'}", "--adapter-index", "1,-1,0",
          "--input", str(tmp_path / "input.pt"), "--out", str(out), "--device", "cuda"])
    y = dora_ext.export.load_tensors(out)[0]["y"]
    base_model = _with_adapter(trained, seed=0, identity=True)
    for row, model in enumerate([other, base_model, trained]):
        assert rel_err(y[row:row + 1], _ref_forward(model, x[row:row + 1])) < tol, row


def test_cpp_rejects_a_corrupt_adapter(example_exe, trained, tmp_path):
    """A truncated adapter file is an error naming the file, not a crash or garbage output."""
    _export(trained, tmp_path, torch.float32)
    adapter = tmp_path / "adapter.pt"
    adapter.write_bytes(adapter.read_bytes()[:-100])
    out = subprocess.run([str(example_exe), "--base", str(tmp_path / "base.pt"), "--adapter", str(adapter),
                          "--input", str(tmp_path / "input.pt"), "--out", str(tmp_path / "o.pt")],
                         capture_output=True, text=True)
    assert out.returncode == 1
    assert "adapter.pt" in out.stderr and "not a readable tensor file" in out.stderr


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_cpp_cuda_matches_reference(example_exe, trained, tmp_path, dtype, tol):
    """The C++ example on CUDA (library built with the fused path for this GPU), 4 threads + main."""
    x = _export(trained, tmp_path, dtype, tokens=64)
    outputs, summary = _run_example(example_exe, tmp_path, "--device", "cuda", "--threads", "4")
    assert summary["device"].startswith("cuda")
    ref = _ref_forward(trained, x)
    for key, y in outputs.items():
        assert rel_err(y, ref) < tol, (key, rel_err(y, ref))
