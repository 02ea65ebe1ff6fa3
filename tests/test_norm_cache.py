"""The row-norm cache: reused while W, A, B and the scale are unchanged, never stale.

Runs on every available device: the cache sits in front of both the eager and the
fused norm. Every check compares against a fresh float64 computation, not only the
counters, so a stale norm fails on values too. Writers that bump no version counter
(fused optimizers, ``p.data``): test_norm_cache_writers.py.
"""
from __future__ import annotations

import json
import textwrap

import pytest
import torch

import dora_ext
from reference import FWD_TOL, NORM_TOL, make_inputs, ref_dora_linear_for, ref_row_norm, rel_err
from fresh_process import run_python

DEVICES = ["cpu", pytest.param("cuda", marks=[
    pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")])]

pytestmark = pytest.mark.usefixtures("fresh_norm_cache")


def _stats_delta(before: dict[str, int]) -> dict[str, int]:
    after = dora_ext.norm_cache_stats()
    return {k: after[k] - before[k] for k in after if k != "entries"}


def _layer(device: str, dtype: torch.dtype = torch.float32, d_in: int = 48, d_out: int = 40, r: int = 5):
    inp = make_inputs(d_in, d_out, r, (3, 7), dtype=dtype, device=device, requires_grad=True)
    return inp


def _check_forward(inp: dict, dtype: torch.dtype) -> None:
    out = dora_ext.dora_linear(**inp)
    assert rel_err(out, ref_dora_linear_for(inp)) < FWD_TOL[dtype]


@pytest.mark.parametrize("device", DEVICES)
def test_repeated_no_grad_forward_hits_the_cache(device):
    inp = _layer(device)
    before = dora_ext.norm_cache_stats()
    with torch.no_grad():
        for _ in range(3):
            _check_forward(inp, torch.float32)
    delta = _stats_delta(before)
    assert delta["norm_misses"] == 1 and delta["norm_hits"] == 2, delta
    assert delta["scale_hits"] == 2, delta  # g = m / n reused too, on the eager path as on the fused one


@pytest.mark.parametrize("device", DEVICES)
def test_recording_forwards_compute_their_norm(device):
    """A forward that records gradients never reuses an earlier call's norm (a parameter may have
    been written without a version bump since); row_norm of trained adapters likewise."""
    inp = _layer(device)
    before = dora_ext.norm_cache_stats()
    for _ in range(2):
        _check_forward(inp, torch.float32)
        dora_ext.row_norm(inp["weight"], inp["lora_A"], inp["lora_B"], inp["scale"])
    delta = _stats_delta(before)
    assert delta["norm_misses"] == 4 and delta["norm_hits"] == 0, delta


@pytest.mark.parametrize("device", DEVICES)
def test_gradient_accumulation_matches_uncached(device, monkeypatch):
    inp = _layer(device)
    params = [inp["lora_A"], inp["lora_B"], inp["magnitude"], inp["bias"]]
    before = dora_ext.norm_cache_stats()
    for _ in range(4):  # four micro-steps, no optimizer step in between
        dora_ext.dora_linear(**inp).square().mean().backward()
    assert _stats_delta(before)["norm_misses"] == 4  # each backward dropped the norm it used
    cached_grads = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    dora_ext.set_options(norm_cache=False)
    for _ in range(4):
        dora_ext.dora_linear(**inp).square().mean().backward()
    for cached, fresh in zip(cached_grads, (p.grad for p in params)):
        torch.testing.assert_close(cached, fresh, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("device", DEVICES)
def test_optimizer_step_invalidates(device):
    inp = _layer(device)
    opt = torch.optim.SGD([inp["lora_A"], inp["lora_B"], inp["magnitude"]], lr=0.5)
    for _ in range(3):
        out = dora_ext.dora_linear(**inp)
        assert rel_err(out, ref_dora_linear_for(inp)) < FWD_TOL[torch.float32]  # the norm of the current A, B
        out.square().mean().backward()
        opt.step()
        opt.zero_grad()
    # Each training forward computed its norm, ||W||^2 included (the backward dropped the entry).
    stats = dora_ext.norm_cache_stats()
    assert stats["norm_misses"] == 3 and stats["norm_hits"] == 0, stats
    assert stats["weight_sq_hits"] == 0 and stats["invalidations"] >= 3, stats


@pytest.mark.parametrize("device", DEVICES)
def test_weight_sq_reused_when_adapters_switch(device):
    """Inference with another adapter on the same frozen weight (PEFT's set_adapter) reuses
    ||W||^2 and computes only the adapter terms."""
    inp = _layer(device)
    other = _layer(device)
    with torch.no_grad():
        _check_forward(inp, torch.float32)
        switched = {**inp, "lora_A": other["lora_A"], "lora_B": other["lora_B"]}
        before = dora_ext.norm_cache_stats()
        _check_forward(switched, torch.float32)
    delta = _stats_delta(before)
    assert delta["norm_misses"] == 1 and delta["weight_sq_hits"] == 1, delta


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("which", ["weight", "lora_A", "lora_B"])
def test_load_state_dict_invalidates(device, which):
    inp = _layer(device)
    norm = dora_ext.row_norm(inp["weight"], inp["lora_A"], inp["lora_B"], inp["scale"])
    module = torch.nn.Module()
    setattr(module, which, torch.nn.Parameter(inp[which].detach(), requires_grad=inp[which].requires_grad))
    inp[which] = getattr(module, which)
    module.load_state_dict({which: torch.randn_like(inp[which])})
    new_norm = dora_ext.row_norm(inp["weight"], inp["lora_A"], inp["lora_B"], inp["scale"])
    ref = ref_row_norm(inp["weight"], inp["lora_A"], inp["lora_B"], inp["scale"])
    assert rel_err(new_norm, ref) < NORM_TOL[torch.float32]
    assert rel_err(norm, ref) > 1e-3  # the old norm really was different


@pytest.mark.parametrize("device", DEVICES)
def test_scale_and_magnitude_changes(device):
    inp = _layer(device)
    with torch.no_grad():
        _check_forward(inp, torch.float32)
        inp["scale"] = 0.25  # another scale: another norm
        _check_forward(inp, torch.float32)
        inp["magnitude"].mul_(1.5)  # the norm stays valid, g = m / n must follow m
        before = dora_ext.norm_cache_stats()
        _check_forward(inp, torch.float32)
    assert _stats_delta(before)["norm_hits"] == 1


@pytest.mark.parametrize("device", DEVICES)
def test_replaced_data_is_not_served_stale(device):
    """``param.data = new`` keeps the tensor object but swaps its storage."""
    inp = _layer(device)
    _check_forward(inp, torch.float32)
    inp["lora_B"].data = torch.randn_like(inp["lora_B"])
    _check_forward(inp, torch.float32)


@pytest.mark.parametrize("device", DEVICES)
def test_row_norm_returns_a_private_copy(device):
    inp = _layer(device)
    args = (inp["weight"], inp["lora_A"], inp["lora_B"], inp["scale"])
    first = dora_ext.row_norm(*args)
    first.zero_()  # a caller writing to its result must not corrupt the cache
    second = dora_ext.row_norm(*args)
    assert rel_err(second, ref_row_norm(*args)) < NORM_TOL[torch.float32]


@pytest.mark.parametrize("device", DEVICES)
def test_inference_mode_and_env_bypass(device, monkeypatch):
    inp = _layer(device)
    with torch.inference_mode():
        inf = {k: (v.detach().clone() if isinstance(v, torch.Tensor) else v) for k, v in inp.items()}
        before = dora_ext.norm_cache_stats()
        _check_forward(inf, torch.float32)
        _check_forward(inf, torch.float32)
        assert _stats_delta(before)["bypassed"] == 2
        inf["lora_A"].add_(1.0)  # inference tensors have no version counter: a cache would go stale
        _check_forward(inf, torch.float32)
    dora_ext.set_options(norm_cache=False)
    before = dora_ext.norm_cache_stats()
    with torch.no_grad():
        _check_forward(inp, torch.float32)
    assert _stats_delta(before)["bypassed"] == 1


@pytest.mark.parametrize("device", DEVICES)
def test_dead_tensors_leave_the_cache(device):
    for _ in range(3):
        inp = _layer(device)
        with torch.no_grad():
            _check_forward(inp, torch.float32)
    del inp
    # A new weight that may reuse a dead one's address is never served its norm.
    inp = _layer(device)
    with torch.no_grad():
        _check_forward(inp, torch.float32)


def test_on_under_torch_distributed_and_fresh_after_a_refill(tmp_path):
    """FSDP2 refills its unsharded parameters after an optimizer step without bumping version
    counters (simulated with torch.autograd._unsafe_preserve_version_counter). The cache stays on
    under torch.distributed (nothing is written to the environment) and the refill is never
    served a stale norm: the optimizer step invalidated it. In a fresh process with a process group."""
    script = textwrap.dedent("""
        import json, os, sys, warnings
        import torch, torch.distributed as dist, dora_ext
        dist.init_process_group("gloo", init_method="file://" + sys.argv[1], rank=0, world_size=1)
        W, A, B = torch.randn(6, 16), torch.randn(2, 16), torch.randn(6, 2)
        m = torch.ones(6, requires_grad=True)
        opt = torch.optim.AdamW([m], fused=True)
        first = dora_ext.row_norm(W, A, B, 0.5)
        again = dora_ext.row_norm(W, A, B, 0.5)  # no step in between: served from the cache
        m.grad = torch.ones_like(m)
        opt.step()
        with torch.no_grad(), torch.autograd._unsafe_preserve_version_counter(A):
            A.copy_(torch.randn(2, 16))  # new values, same tensor, same version: what FSDP2 does
        second = dora_ext.row_norm(W, A, B, 0.5)
        fresh = (W.double() + 0.5 * B.double() @ A.double()).norm(dim=1)
        print(json.dumps({"env": os.environ.get("DORA_EXT_NORM_CACHE"),
                          "fresh": bool(torch.allclose(second.double(), fresh, rtol=1e-5)),
                          "same": bool(torch.equal(first, again)),
                          "stats": dora_ext.norm_cache_stats()}))
        dist.destroy_process_group()
    """)
    proc = run_python(["-c", script, str(tmp_path / "store")], timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["env"] is None and result["fresh"] and result["same"], result
    assert result["stats"]["norm_hits"] == 1 and result["stats"]["norm_misses"] == 2, result
