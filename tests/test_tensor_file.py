"""The C++ readers of tensor files and adapter files (cpp/src/tensor_file.cpp, adapter_file.cpp)
under AddressSanitizer and UndefinedBehaviorSanitizer, on valid files and on malformed ones.

The readers sit on LibTorch's own serialization (zip reader + TorchScript unpickler) and add the
checks LibTorch leaves to its caller; these tests build tests/cpp/load_check.cpp with both
sanitizers and feed it files from Python, from C++, and broken in every way we can think of
(truncated, bytes flipped, records short or missing, offsets out of range, shapes that overflow,
dtypes and classes that do not belong). Every file must give either its tensors or one c10::Error
naming the file: a sanitizer report, a crash or a hang fails the test.
"""
from __future__ import annotations

import collections
import io
import os
import pickle
import random
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest
import torch

import dora_ext.export

ROOT = Path(__file__).resolve().parents[1]
SANITIZER_EXIT = 99  # a sanitizer finding exits with this; a c10::Error is a line of output


@pytest.fixture(scope="module")
def load_check(tmp_path_factory) -> Path:
    from torch.utils.cpp_extension import include_paths, library_paths

    compiler = shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        pytest.fail("no C++ compiler: the loader test needs one (CI has g++)")
    out = tmp_path_factory.mktemp("load_check") / "load_check"
    std = "-std=c++20" if tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 14) else "-std=c++17"
    libs = library_paths()[0]
    cmd = [compiler, std, "-O1", "-g", "-fno-omit-frame-pointer",
           "-fsanitize=address,undefined", "-fno-sanitize=vptr", "-fno-sanitize-recover=undefined",
           f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
           "-I", str(ROOT / "cpp" / "include"), *[f"-I{p}" for p in include_paths()],
           str(ROOT / "tests" / "cpp" / "load_check.cpp"), str(ROOT / "cpp" / "src" / "tensor_file.cpp"),
           str(ROOT / "cpp" / "src" / "adapter_file.cpp"),
           f"-L{libs}", "-ltorch_cpu", "-lc10", f"-Wl,-rpath,{libs}", "-o", str(out)]
    build = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert build.returncode == 0, build.stderr[-4000:]
    return out


def _run(load_check: Path, mode: str, files: list[Path]) -> list[str]:
    env = dict(os.environ, ASAN_OPTIONS=f"detect_leaks=0:exitcode={SANITIZER_EXIT}",
               UBSAN_OPTIONS=f"print_stacktrace=1:exitcode={SANITIZER_EXIT}")
    proc = subprocess.run([str(load_check), mode, *map(str, files)], capture_output=True, text=True, timeout=600,
                          env=env, errors="replace")
    assert proc.returncode == 0, f"exit {proc.returncode}:\n{proc.stderr[-6000:]}"
    lines = proc.stdout.splitlines()
    assert len(lines) == len(files), proc.stdout[-3000:]
    return lines


def _assert_refused(lines: list[str], files: list[Path], expect: str = "") -> None:
    for line, path in zip(lines, files):
        assert line.startswith("ERROR "), (path.name, line)
        assert str(path) in line, (path.name, line)  # names the file
        assert expect in line, (path.name, expect, line)


# ---------------------------------------------------------------------------------------------
# Hand-made archives: the pickle torch.save would write, with any storage, offset, shape, stride.

class _Storage:
    def __init__(self, key: str, numel: int, cls: str = "FloatStorage", location: str = "cpu") -> None:
        self.key, self.numel, self.cls, self.location = key, numel, cls, location


class _Tensor:
    def __init__(self, storage: _Storage, offset: int, size: list[int], stride: list[int]) -> None:
        self.args = (storage, offset, tuple(size), tuple(stride), False, collections.OrderedDict())

    def __reduce__(self):
        return (torch._utils._rebuild_tensor_v2, self.args)


class _Class:
    """Pickles as a call of os.system: a reader that executed it would be a security hole."""

    def __reduce__(self):
        return (os.system, ("echo executed",))


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, _Storage):
            return ("storage", getattr(torch, obj.cls), obj.key, obj.location, obj.numel)
        return None


def _archive(path: Path, root, records: dict[str, bytes], compress: bool = False) -> Path:
    buf = io.BytesIO()
    _Pickler(buf, protocol=2).dump(root)
    mode = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
    with zipfile.ZipFile(path, "w", mode) as z:
        z.writestr("archive/data.pkl", buf.getvalue())
        for key, data in records.items():
            z.writestr(f"archive/data/{key}", data)
        z.writestr("archive/version", "3\n")
    return path


FOUR = torch.arange(4, dtype=torch.float32).numpy().tobytes()


def _file(tensors=None, metadata=None):
    return {"metadata": {} if metadata is None else metadata, "tensors": tensors}


def _nested(depth: int) -> list:
    out: list = []
    for _ in range(depth):
        out = [out]
    return out


def _crafted(tmp: Path) -> dict[str, tuple[Path, str]]:
    """name -> (file, a phrase its error must contain)."""
    s = _Storage("0", 4)
    cases = {
        "offset_out_of_range": (_file({"t": _Tensor(s, 3, [4], [1])}), {"0": FOUR}, "storage"),
        "size_beyond_storage": (_file({"t": _Tensor(s, 0, [1 << 40], [1])}), {"0": FOUR}, ""),
        "stride_beyond_storage": (_file({"t": _Tensor(s, 0, [2, 2], [3, 1])}), {"0": FOUR}, "storage"),
        "shape_overflows": (_file({"t": _Tensor(s, 0, [1 << 62, 1 << 62], [1 << 62, 1])}), {"0": FOUR}, "overflow"),
        "negative_size": (_file({"t": _Tensor(s, 0, [-4], [1])}), {"0": FOUR}, ""),
        "negative_stride": (_file({"t": _Tensor(s, 3, [4], [-1])}), {"0": FOUR}, "stride"),
        "short_record": (_file({"t": _Tensor(_Storage("0", 1000), 0, [1000], [1])}), {"0": FOUR}, "record holds 16"),
        "missing_record": (_file({"t": _Tensor(_Storage("7", 4), 0, [4], [1])}), {"0": FOUR}, "data/7"),
        "complex_dtype": (_file({"t": _Tensor(_Storage("0", 2, "ComplexFloatStorage"), 0, [2], [1])}), {"0": FOUR},
                          "dtype"),
        "class_reference": (_file({"t": _Class()}), {}, ""),
        "root_is_a_list": ([1, 2, 3], {}, "must be a dict"),
        "tensors_is_a_list": (_file([_Tensor(s, 0, [4], [1])]), {"0": FOUR}, "must be a dict"),
        "tensor_is_a_number": (_file({"t": 3.0}), {}, "must be a tensor"),
        "metadata_value_not_a_string": (_file({}, {"format": 1}), {}, "must be a string"),
        "metadata_has_a_tensor": (_file({}, {"format": _Tensor(s, 0, [4], [1])}), {"0": FOUR}, "must be a string"),
        "unknown_top_level_key": ({"metadata": {}, "tensors": {}, "code": "x"}, {}, "unexpected top-level key"),
        "no_tensors": ({"metadata": {}}, {}, "no \"tensors\""),
        "deep_nesting": ({"metadata": {}, "tensors": {}, "x": _nested(200)}, {}, ""),
    }
    out = {}
    for name, (root, records, phrase) in cases.items():
        out[name] = (_archive(tmp / f"{name}.pt", root, records), phrase)
    out["compressed_records"] = (_archive(tmp / "compressed.pt", _file({"t": _Tensor(s, 0, [4], [1])}),
                                          {"0": FOUR * 64}, compress=True), "")
    (tmp / "empty.pt").write_bytes(b"")
    out["empty_file"] = (tmp / "empty.pt", "")
    (tmp / "garbage.pt").write_bytes(bytes(random.Random(0).randrange(256) for _ in range(4096)))
    out["garbage"] = (tmp / "garbage.pt", "")
    return out


def test_valid_files_from_python_and_from_a_hand_made_archive(load_check, tmp_path):
    tensors = {"w": torch.randn(5, 7), "h": torch.randn(3, dtype=torch.float16),
               "b": torch.randn(2, 2, dtype=torch.bfloat16), "view": torch.arange(30.0, dtype=torch.float64)[3:21:3],
               "i": torch.arange(4, dtype=torch.int32), "mask": torch.tensor([True, False]),
               "empty": torch.empty(0, 3)}
    dora_ext.export.save_tensors(tensors, tmp_path / "py.pt", {"k": "v"})
    plain = _archive(tmp_path / "plain.pt", _file({"t": _Tensor(_Storage("0", 4), 1, [3], [1])}), {"0": FOUR})
    py_line, plain_line = _run(load_check, "tensors", [tmp_path / "py.pt", plain])
    assert py_line.startswith("OK"), py_line
    got = {part.split(":")[0]: float(part.rsplit(":", 1)[1]) for part in py_line.split()[1:]}
    assert got.keys() == tensors.keys()
    for name, t in tensors.items():
        assert got[name] == pytest.approx(t.double().sum().item(), rel=1e-6, abs=1e-6), name
    assert plain_line == "OK t:Float:3:6", plain_line


def test_cpp_writes_what_python_reads(load_check, tmp_path):
    path = tmp_path / "cpp.pt"
    env = dict(os.environ, ASAN_OPTIONS="detect_leaks=0")
    proc = subprocess.run([str(load_check), "save", str(path)], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    tensors, metadata = dora_ext.export.load_tensors(path)
    assert metadata == {"written_by": "load_check"}
    torch.testing.assert_close(tensors["f32"], torch.arange(12, dtype=torch.float32).reshape(3, 4) / 7)
    torch.testing.assert_close(tensors["bf16"], torch.arange(5, dtype=torch.bfloat16))
    torch.testing.assert_close(tensors["i64"], torch.arange(6))
    torch.testing.assert_close(tensors["view"], torch.arange(20, dtype=torch.float64)[3:9:2])
    assert tensors["view"].untyped_storage().nbytes() == 3 * 8  # written compact, not its whole storage
    assert tensors["empty"].shape == (0, 3) and tensors["empty"].dtype == torch.float16


def test_crafted_malformed_files_are_refused(load_check, tmp_path):
    cases = _crafted(tmp_path)
    files = [path for path, _ in cases.values()]
    lines = _run(load_check, "tensors", files)
    for (name, (path, phrase)), line in zip(cases.items(), lines):
        if name == "compressed_records" and line.startswith("OK"):
            continue  # a deflated archive may be read (LibTorch decides); it must not crash
        _assert_refused([line], [path], phrase)
    assert "executed" not in "".join(lines)


def _valid_bytes(tmp_path: Path) -> bytes:
    tensors = {"w": torch.randn(9, 5), "b": torch.randn(3, dtype=torch.bfloat16), "n": torch.arange(7)}
    dora_ext.export.save_tensors(tensors, tmp_path / "valid.pt", {"format": "x"})
    return (tmp_path / "valid.pt").read_bytes()


def test_every_truncation_is_refused(load_check, tmp_path):
    data = _valid_bytes(tmp_path)
    cuts = sorted(set(range(0, len(data), max(1, len(data) // 96))) | {1, 4, 22, len(data) - 22, len(data) - 1})
    files = []
    for cut in cuts:
        path = tmp_path / f"cut_{cut}.pt"
        path.write_bytes(data[:cut])
        files.append(path)
    _assert_refused(_run(load_check, "tensors", files), files)


def test_flipped_bytes_never_crash(load_check, tmp_path):
    """Random corruption anywhere: the file either still reads (a flip in tensor data) or is refused
    with the file named; the sanitizers watch every read."""
    data = _valid_bytes(tmp_path)
    rng = random.Random(1234)
    files = []
    for i in range(160):
        corrupt = bytearray(data)
        for _ in range(rng.choice((1, 2, 8))):
            corrupt[rng.randrange(len(corrupt))] = rng.randrange(256)
        path = tmp_path / f"flip_{i}.pt"
        path.write_bytes(bytes(corrupt))
        files.append(path)
    lines = _run(load_check, "tensors", files)
    refused = [(f, line) for f, line in zip(files, lines) if not line.startswith("OK")]
    _assert_refused([line for _, line in refused], [f for f, _ in refused])
    assert refused, "no corruption was detected at all: the test is not reaching the reader"


def _adapter_file(path: Path, tensors: dict, metadata: dict | None = None) -> Path:
    meta = {"format": "dora_ext.adapter", "format_version": dora_ext.export.FORMAT_VERSION}
    dora_ext.export.save_tensors(tensors, path, meta if metadata is None else metadata)
    return path


def test_adapter_files(load_check, tmp_path):
    r, d_in, d_out = 3, 8, 5
    good = {"fc.lora_A": torch.randn(r, d_in), "fc.lora_B": torch.randn(d_out, r), "fc.magnitude": torch.rand(d_out),
            "fc.norm": torch.rand(d_out), "fc.scale": torch.tensor(2.0, dtype=torch.float64)}

    def but(**changes):
        out = {k: v for k, v in good.items() if changes.get(k.split(".")[1], 0) is not None}
        out.update({f"fc.{k}": v for k, v in changes.items() if v is not None})
        return out

    bad = {
        "no_norm": (but(norm=None), {}, "has no \"fc.norm\""),
        "b_rank": (but(lora_B=torch.randn(d_out, r + 1)), {}, "lora_B must be [d_out, r]"),
        "magnitude_len": (but(magnitude=torch.rand(d_out + 1)), {}, "magnitude must be"),
        "int_factors": (but(lora_A=torch.ones(r, d_in, dtype=torch.int32),
                            lora_B=torch.ones(d_out, r, dtype=torch.int32)), {}, "floating dtype"),
        "two_scales": (but(scale=torch.ones(2, dtype=torch.float64)), {}, "scale must hold one"),
        "infinite_scale": (but(scale=torch.tensor(float("inf"), dtype=torch.float64)), {}, "scale must be finite"),
        "stray_tensor": (dict(good, **{"fc.extra": torch.zeros(1)}), {}, "unexpected tensor"),
        "old_version": (good, {"format": "dora_ext.adapter", "format_version": "1"}, "format_version"),
        "not_an_adapter": (good, {"format": "dora_ext.base"}, "is not a dora_ext adapter"),
    }
    files = [_adapter_file(tmp_path / "good.pt", good)]
    files += [_adapter_file(tmp_path / f"{name}.pt", tensors, meta or None) for name, (tensors, meta, _) in bad.items()]
    lines = _run(load_check, "adapter", files)
    assert lines[0] == f"OK fc:{r}x{d_in}->({d_out})", lines[0]
    for line, path, (_, _, phrase) in zip(lines[1:], files[1:], bad.values()):
        _assert_refused([line], [path], phrase)


def test_exported_adapter_reads_back(load_check, tmp_path):
    from dora_ext.nn import DoRALinear

    model = torch.nn.Sequential(DoRALinear(6, 4, r=2, alpha=4.0))
    names = dora_ext.export.save_adapter(model, tmp_path / "adapter.pt")
    (line,) = _run(load_check, "adapter", [tmp_path / "adapter.pt"])
    assert line == f"OK {names[0]}:2x6->(4)", line
