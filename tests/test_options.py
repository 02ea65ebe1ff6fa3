"""The run-time options object: process-wide values, per-thread overrides that reach the backward
of calls made under them, the environment read once, clear errors, and no environment writes."""
from __future__ import annotations

import json
import os
import textwrap
import threading

import pytest
import torch

import dora_ext
from fresh_process import run_python
from reference import make_inputs

DEFAULTS = {"tier": "auto", "norm_cache": True, "decode_max_tokens": 16, "fp32_parts_min_tokens": 512,
            "saved_activation": "output"}
_NEEDS_CUDA = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _in_other_thread(fn):
    out = {}
    thread = threading.Thread(target=lambda: out.update(value=fn()))
    thread.start()
    thread.join()
    return out["value"]


def test_defaults_and_types():
    assert dora_ext.get_options() == DEFAULTS


def test_set_options_is_process_wide():
    dora_ext.set_options(decode_max_tokens=3, norm_cache=False)
    assert _in_other_thread(dora_ext.get_options) == {**DEFAULTS, "decode_max_tokens": 3, "norm_cache": False}
    torch.ops.dora_ext.set_option("tier", "eager")  # the op, as C++ and TorchScript callers use it
    assert torch.ops.dora_ext.get_option("tier") == "eager"


def test_options_context_is_per_thread_nested_and_restored():
    with dora_ext.options(tier="eager", norm_cache=False):
        assert dora_ext.get_options()["tier"] == "eager"
        assert _in_other_thread(dora_ext.get_options) == DEFAULTS  # other threads keep theirs
        with dora_ext.options(tier="prefer_fused", decode_max_tokens=0):
            assert dora_ext.get_options() == {**DEFAULTS, "tier": "prefer_fused", "norm_cache": False,
                                              "decode_max_tokens": 0}
        assert dora_ext.get_options() == {**DEFAULTS, "tier": "eager", "norm_cache": False}
        dora_ext.set_options(tier="fused")  # process-wide: the override still wins on this thread
        assert dora_ext.get_options()["tier"] == "eager"
    assert dora_ext.get_options()["tier"] == "fused"
    with pytest.raises(ValueError):
        with dora_ext.options(norm_cache=False):
            raise ValueError
    assert dora_ext.get_options()["norm_cache"] is True
    assert dora_ext.overrides is not None and dora_ext.get_options is not None


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=_NEEDS_CUDA)])
def test_backward_runs_with_its_forwards_options(device):
    """Process-wide tier "fused" cannot run float64 (nor anything on the CPU): a forward made under
    ``options(tier="eager")`` must run its backward eagerly too, although the backward starts
    outside the block (and, for CUDA, on autograd's device thread)."""
    inp = make_inputs(24, 16, 4, (5,), torch.float64, device=device, requires_grad=True)
    dora_ext.set_options(tier="fused")
    with pytest.raises(RuntimeError, match="DORA_EXT_TIER=fused"):
        dora_ext.dora_linear(**inp)
    with dora_ext.options(tier="eager"):
        y = dora_ext.dora_linear(**inp)
        delta = dora_ext.compose_delta(inp["x"] @ inp["weight"].t(), inp["x"] @ inp["lora_A"].t() @ inp["lora_B"].t(),
                                       inp["magnitude"], torch.rand(16, device=device, dtype=torch.float64) + 1,
                                       inp["scale"])
    (y.sum() + delta.sum()).backward()
    assert inp["lora_A"].grad is not None and inp["magnitude"].grad is not None


@pytest.mark.parametrize("kwargs, message", [
    ({"bogus": 1}, "unknown option 'bogus'"),
    ({"tier": "fast"}, "tier must be 'auto', 'eager', 'fused' or 'prefer_fused', got 'fast'"),
    ({"norm_cache": "maybe"}, "norm_cache must be 0 or 1"),
    ({"decode_max_tokens": -1}, "decode_max_tokens must be a non-negative integer, got '-1'"),
    ({"fp32_parts_min_tokens": "2k"}, "fp32_parts_min_tokens must be a non-negative integer"),
    ({"saved_activation": "nothing"}, "saved_activation must be 'output', 'z' or 'recompute', got 'nothing'"),
])
def test_bad_values_raise_naming_the_option(kwargs, message):
    with pytest.raises(RuntimeError, match=message):
        dora_ext.set_options(**kwargs)
    with pytest.raises(RuntimeError, match=message):
        with dora_ext.options(**kwargs):
            pass
    assert dora_ext.get_options() == DEFAULTS


def test_environment_is_read_once_and_never_written():
    script = textwrap.dedent("""
        import json, os
        import torch, dora_ext
        before = dict(os.environ)
        first = dora_ext.get_options()
        os.environ["DORA_EXT_DECODE_MAX_TOKENS"] = "9"  # after the first use: no effect
        x, W, A, B = torch.randn(5, 12), torch.randn(7, 12), torch.randn(2, 12), torch.randn(7, 2)
        m = torch.rand(7) + 0.5
        with dora_ext.options(tier="eager", norm_cache=False):
            dora_ext.dora_linear(x, W, None, A, B, m, 0.5)
        dora_ext.set_options(norm_cache=False)
        dora_ext.row_norm(W, A, B, 0.5)
        after = dict(os.environ, DORA_EXT_DECODE_MAX_TOKENS="5")  # the one variable this script wrote
        print(json.dumps({"first": first, "later": dora_ext.get_options(), "unchanged": before == after}))
    """)
    proc = run_python(["-c", script], timeout=120, DORA_EXT_DECODE_MAX_TOKENS="5", DORA_EXT_NORM_CACHE="1",
                      DORA_EXT_TIER="eager")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["first"] == {**DEFAULTS, "tier": "eager", "decode_max_tokens": 5}, result
    assert result["later"] == {**DEFAULTS, "tier": "eager", "decode_max_tokens": 5, "norm_cache": False}, result
    assert result["unchanged"], result


def test_the_package_never_writes_the_environment():
    """No module of the package assigns to os.environ (the options object holds run-time state)."""
    import re
    from pathlib import Path

    package = Path(dora_ext.__file__).parent
    writes = re.compile(r"os\.environ(\[[^]]+\]\s*=[^=]|\.(update|pop|setdefault|clear)\()|os\.putenv")
    offenders = [f"{path.name}:{n}" for path in package.glob("*.py")
                 for n, line in enumerate(path.read_text().splitlines(), 1) if writes.search(line)]
    assert offenders == []
    assert os.environ.get("DORA_EXT_TIER") in (None, "auto", "eager", "fused", "prefer_fused")
