"""The stack of adapters the CUDA mixed-batch kernels read (csrc/adapter_stack.h), on the CPU through
a small extension (tests/cpp/stack_cache_probe.cpp) linked against the installed library: separate
adapters are copied into a padded stack that later calls reuse whole; views of one
share_adapter_storage stack are read in place (any of them, in any order); a write to an adapter, a
new weight or an invalidation makes the stack again."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

import dora_ext
from dora_ext._library import library_path

ROOT = Path(__file__).resolve().parents[1]
D_OUT, D_IN = 48, 40
RANKS = [3, 8, 5, 1]
DORA = [True, False, True, True]


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    from torch.utils.cpp_extension import load

    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.fail("no C++ compiler: this test needs one (CI has g++)")
    lib = library_path()
    return load("dora_ext_stack_cache_probe", [str(ROOT / "tests" / "cpp" / "stack_cache_probe.cpp")],
                extra_include_paths=[str(ROOT / "csrc")], extra_ldflags=[str(lib), f"-Wl,-rpath,{lib.parent}"],
                build_directory=str(tmp_path_factory.mktemp("stack_cache_probe")), verbose=False)


@pytest.fixture(autouse=True)
def _fresh_cache():
    dora_ext.clear_norm_cache()
    yield
    dora_ext.clear_norm_cache()


def _adapters(seed: int, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    a = [torch.randn(r, D_IN, generator=gen).to(dtype) for r in RANKS]
    b = [torch.randn(D_OUT, r, generator=gen).to(dtype) for r in RANKS]
    m = [torch.rand(D_OUT, generator=gen) + 0.5 if dora else None for dora in DORA]
    return a, b, m


def _call(probe, weight, a, b, m, scale=None):
    return probe.stack(weight, a, b, m, scale if scale is not None else [0.5] * len(a))


def _assert_stack_holds(stack_a, stack_b, columns, a, b):
    """Adapter k's rows of A and columns of B sit at its column range; B's row stride is the stack's rank."""
    assert stack_a.shape[0] % 32 == 0 and stack_b.shape == (D_OUT, stack_a.shape[0])
    for k in range(len(a)):
        lo, hi = columns[2 * k], columns[2 * k + 1]
        assert hi - lo == a[k].shape[0]
        torch.testing.assert_close(stack_a[lo:hi], a[k], rtol=0, atol=0)
        torch.testing.assert_close(stack_b[:, lo:hi], b[k], rtol=0, atol=0)


def _inside(t: torch.Tensor, storage_of: torch.Tensor) -> bool:
    return t.untyped_storage().data_ptr() == storage_of.untyped_storage().data_ptr()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_separate_adapters_are_copied_once_then_reused(probe, dtype):
    weight = torch.randn(D_OUT, D_IN).to(dtype)
    a, b, m = _adapters(0, dtype)
    calls, stack_a, stack_b, g, columns = _call(probe, weight, a, b, m)
    assert calls == 1
    assert stack_a.shape[0] == 32  # 17 columns, padded
    assert columns == [0, 3, 3, 11, 11, 16, 16, 17]
    _assert_stack_holds(stack_a, stack_b, columns, a, b)
    assert not any(_inside(stack_a, t) for t in a)
    assert stack_a[17:].abs().sum() == 0 and stack_b[:, 17:].abs().sum() == 0  # the padding
    # G: each adapter's g (ones for plain LoRA) and a row of ones for base-model rows
    expected = torch.stack([torch.full((D_OUT,), k + 1.0) if DORA[k] else torch.ones(D_OUT) for k in range(4)]
                           + [torch.ones(D_OUT)])
    torch.testing.assert_close(g, expected, rtol=0, atol=0)
    again = _call(probe, weight, a, b, m)
    assert again[0] == 0 and again[1].data_ptr() == stack_a.data_ptr() and again[3].data_ptr() == g.data_ptr()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_views_of_a_shared_stack_are_read_in_place(probe, dtype):
    weight = torch.randn(D_OUT, D_IN).to(dtype)
    a, b, m = _adapters(1, dtype)
    a, b = dora_ext.share_adapter_storage(a, b)
    calls, stack_a, stack_b, _, columns = _call(probe, weight, a, b, m)
    assert calls == 1
    assert _inside(stack_a, a[0]) and _inside(stack_b, b[0])
    assert stack_a.data_ptr() == a[0].data_ptr() and stack_b.stride(0) == b[0].stride(0)
    _assert_stack_holds(stack_a, stack_b, columns, a, b)
    assert _call(probe, weight, a, b, m)[0] == 0  # reused
    # any subset, in any order: still in place, the columns those adapters own in the shared stack
    order = [3, 0, 2]
    calls, sub_a, sub_b, _, columns = _call(probe, weight, [a[k] for k in order], [b[k] for k in order],
                                            [m[k] for k in order])
    assert calls == 1 and _inside(sub_a, a[0]) and _inside(sub_b, b[0])
    _assert_stack_holds(sub_a, sub_b, columns, [a[k] for k in order], [b[k] for k in order])


def test_a_write_to_an_adapter_makes_the_stack_again(probe):
    weight = torch.randn(D_OUT, D_IN)
    a, b, m = _adapters(2)
    shared_a, shared_b = dora_ext.share_adapter_storage(a, b)
    for factors in ((a, b), (shared_a, shared_b)):
        assert _call(probe, weight, *factors, m)[0] == 1
        with torch.no_grad():
            factors[1][2].add_(1.0)  # bumps its version
        calls, stack_a, stack_b, _, columns = _call(probe, weight, *factors, m)
        assert calls == 1
        _assert_stack_holds(stack_a, stack_b, columns, *factors)
        assert _call(probe, weight, *factors, m)[0] == 0


def test_a_new_weight_scale_or_invalidation_is_not_served_a_stale_g(probe):
    weight = torch.randn(D_OUT, D_IN)
    a, b, m = _adapters(3)
    assert _call(probe, weight, a, b, m)[0] == 1
    assert _call(probe, weight, a, b, m, scale=[0.25] * 4)[0] == 1  # another scale: G again
    assert _call(probe, weight.clone(), a, b, m, scale=[0.25] * 4)[0] == 1  # another weight
    dora_ext.invalidate_norm_cache()  # what an optimizer step does
    assert _call(probe, weight, a, b, m, scale=[0.25] * 4)[0] == 1
    with dora_ext.options(norm_cache=False):  # nothing kept: made on every call, views still in place
        shared_a, shared_b = dora_ext.share_adapter_storage(a, b)
        for _ in range(2):
            calls, stack_a, *_ = _call(probe, weight, shared_a, shared_b, m)
            assert calls == 1 and _inside(stack_a, shared_a[0])


def test_views_of_another_layout_are_copied(probe):
    """Views not made by share_adapter_storage (here: narrowed from one tensor of the right size) are
    not taken for a shared stack."""
    weight = torch.randn(D_OUT, D_IN)
    a, b, m = _adapters(4)
    block = torch.cat(a, 0)
    firsts = [0, 3, 11, 16]
    views = [block.narrow(0, f, r) for f, r in zip(firsts, RANKS)]
    calls, stack_a, stack_b, _, columns = _call(probe, weight, views, b, m)
    assert calls == 1 and not _inside(stack_a, block)
    _assert_stack_holds(stack_a, stack_b, columns, views, b)
