"""The norm cache under every writer of a parameter, including those that bump no version counter.

Fused optimizers (``AdamW(fused=True)``, transformers' Trainer default), a compiled optimizer step
and writes through ``p.data`` change adapters while their version counters stay put. Each training
loop here checks every forward against a float64 reference of the *current* parameters and the
final parameters against the same loop with the cache off; on a cache that trusted version counters
the fused and ``.data`` loops fail both checks.
"""
from __future__ import annotations

from typing import Callable

import pytest
import torch

import dora_ext
from reference import FWD_TOL, make_inputs, ref_dora_linear_for, rel_err

DEVICES = ["cpu", pytest.param("cuda", marks=[
    pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")])]
STEPS = 4

pytestmark = pytest.mark.usefixtures("fresh_norm_cache")


def _supports(cls: type, device: str, **flags) -> bool:
    """Whether this torch has ``cls(..., **flags)`` on ``device`` (some check at construction,
    some at the first step)."""
    p = torch.zeros(1, device=device, requires_grad=True)
    p.grad = torch.ones_like(p)
    try:
        cls([p], lr=0.1, **flags).step()
    except (RuntimeError, TypeError, ValueError):
        return False
    return True


# name -> (optimizer class, flags, lr). The fused ones write without version bumps.
OPTIMIZERS = {
    "adamw_fused": (torch.optim.AdamW, {"fused": True}, 0.05),
    "adamw_foreach": (torch.optim.AdamW, {"foreach": True}, 0.05),
    "adamw_forloop": (torch.optim.AdamW, {"foreach": False}, 0.05),
    "adam_fused": (torch.optim.Adam, {"fused": True}, 0.05),
    "sgd_fused": (torch.optim.SGD, {"fused": True}, 0.5),
    "sgd_forloop": (torch.optim.SGD, {"foreach": False}, 0.5),
    "adagrad_fused": (torch.optim.Adagrad, {"fused": True}, 0.2),
    "rmsprop_fused": (torch.optim.RMSprop, {"fused": True}, 0.01),
    "rmsprop_foreach": (torch.optim.RMSprop, {"foreach": True}, 0.01),
}


def _layer(device: str) -> dict:
    return make_inputs(48, 40, 5, (3, 7), dtype=torch.float32, device=device, requires_grad=True)


def _trained(inp: dict) -> list[torch.Tensor]:
    return [inp["lora_A"], inp["lora_B"], inp["magnitude"]]


def _train(inp: dict, make_step: Callable[[list[torch.Tensor]], Callable[[], None]]) -> list[torch.Tensor]:
    """STEPS steps of a squared-output loss; every forward must match the float64 reference of the
    parameters as they are now (a stale norm fails here). Returns the trained parameters."""
    step = make_step(_trained(inp))
    for i in range(STEPS):
        out = dora_ext.dora_linear(**inp)
        err = rel_err(out, ref_dora_linear_for(inp))
        assert err < FWD_TOL[torch.float32], f"step {i}: relative error {err:.2e} against the current parameters"
        out.square().mean().backward()
        step()
    return [p.detach().clone() for p in _trained(inp)]


def _same_as_uncached(inp_factory: Callable[[], dict], make_step, monkeypatch) -> None:
    cached = _train(inp_factory(), make_step)
    dora_ext.set_options(norm_cache=False)
    uncached = _train(inp_factory(), make_step)
    for a, b in zip(cached, uncached):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def _optimizer_step(name: str, device: str):
    cls, flags, lr = OPTIMIZERS[name]
    if "fused" in flags and not _supports(cls, device, **flags):
        pytest.skip(f"this torch has no fused {cls.__name__} on {device}")

    def make_step(params):
        opt = cls(params, lr=lr, **flags)

        def step():
            opt.step()
            opt.zero_grad()
        return step
    return make_step


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_optimizers_never_get_a_stale_norm(name, device, monkeypatch):
    seed = torch.seed()

    def inputs():
        torch.manual_seed(seed)
        return _layer(device)
    _same_as_uncached(inputs, _optimizer_step(name, device), monkeypatch)


@pytest.mark.parametrize("device", DEVICES)
def test_fused_adamw_bumps_no_version_counter(device):
    """The premise of the tests above, checked on the installed torch: if fused AdamW starts
    bumping versions, the fused cases stop testing the unversioned writer."""
    p = torch.zeros(4, device=device, requires_grad=True)
    opt = torch.optim.AdamW([p], lr=0.1, fused=True)
    p.grad = torch.ones_like(p)
    before = p._version
    opt.step()
    assert p._version == before and p.detach().abs().sum() > 0


def test_compiled_optimizer_step():
    def make_step(params):
        opt = torch.optim.AdamW(params, lr=0.05, foreach=True)
        compiled = torch.compile(opt.step)

        def step():
            compiled()
            opt.zero_grad()
        return step
    _train(_layer("cpu"), make_step)


@pytest.mark.parametrize("device", DEVICES)
def test_manual_update_through_data(device, monkeypatch):
    """SGD written by hand through ``p.data``: no version bump, no optimizer hook."""
    def make_step(params):
        def step():
            for p in params:
                p.data.add_(p.grad, alpha=-0.5)
                p.grad = None
        return step
    seed = torch.seed()

    def inputs():
        torch.manual_seed(seed)
        return _layer(device)
    _same_as_uncached(inputs, make_step, monkeypatch)


@pytest.mark.parametrize("device", DEVICES)
def test_data_write_between_recording_forwards(device):
    """A forward that records gradients never reuses an earlier call's norm."""
    inp = _layer(device)
    dora_ext.dora_linear(**inp)
    inp["lora_B"].data.mul_(3)
    inp["lora_A"].data.add_(0.5)
    assert rel_err(dora_ext.dora_linear(**inp), ref_dora_linear_for(inp)) < FWD_TOL[torch.float32]


@pytest.mark.parametrize("device", DEVICES)
def test_no_grad_reuse_and_explicit_invalidation(device):
    """Eval and no-grad calls reuse the norm; after a write that bypasses version counters,
    ``invalidate_norm_cache()`` makes the next call recompute."""
    inp = _layer(device)
    with torch.no_grad():
        before = dora_ext.norm_cache_stats()
        dora_ext.dora_linear(**inp)
        dora_ext.dora_linear(**inp)
        assert dora_ext.norm_cache_stats()["norm_hits"] == before["norm_hits"] + 1
        inp["lora_B"].data.mul_(3)
        dora_ext.invalidate_norm_cache()
        assert rel_err(dora_ext.dora_linear(**inp), ref_dora_linear_for(inp)) < FWD_TOL[torch.float32]


@pytest.mark.parametrize("device", DEVICES)
def test_eval_between_backward_and_fused_step(device):
    """An eval forward after backward but before the step computes (and caches) the norm of the
    pre-step adapters; the step must invalidate it."""
    inp = _layer(device)
    opt = torch.optim.AdamW(_trained(inp), lr=0.05, fused=True)
    dora_ext.dora_linear(**inp).square().mean().backward()
    with torch.no_grad():
        dora_ext.dora_linear(**inp)
    opt.step()
    with torch.no_grad():
        assert rel_err(dora_ext.dora_linear(**inp), ref_dora_linear_for(inp)) < FWD_TOL[torch.float32]


@pytest.mark.parametrize("device", DEVICES)
def test_gradient_accumulation_recomputes_after_each_backward(device):
    """A backward pass drops the norms it used (an optimizer step may follow): each micro-step
    computes its norm. This is the reuse the rule gives up, counted."""
    inp = _layer(device)
    before = dora_ext.norm_cache_stats()
    for _ in range(3):
        dora_ext.dora_linear(**inp).square().mean().backward()
    stats = dora_ext.norm_cache_stats()
    assert stats["norm_misses"] - before["norm_misses"] == 3 and stats["norm_hits"] == before["norm_hits"]
    assert stats["invalidations"] - before["invalidations"] == 3 and stats["entries"] == 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("use_reentrant", [False, True])
def test_checkpoint_recompute_reuses_its_forwards_norm(device, use_reentrant, monkeypatch):
    """The recompute inside backward is served the norm its forward computed (no second norm),
    with a fused optimizer stepping in between, and the training matches the uncached run."""
    from torch.utils.checkpoint import checkpoint

    seed = torch.seed()

    def run(count: bool) -> list[torch.Tensor]:
        torch.manual_seed(seed)
        inp = _layer(device)
        x = inp.pop("x").requires_grad_()
        opt = torch.optim.AdamW(_trained(inp), lr=0.05, fused=True)
        for _ in range(3):
            before = dora_ext.norm_cache_stats()
            out = checkpoint(lambda t: dora_ext.dora_linear(t, **inp), x, use_reentrant=use_reentrant)
            assert rel_err(out, ref_dora_linear_for({"x": x, **inp})) < FWD_TOL[torch.float32]
            out.square().mean().backward()
            opt.step()
            opt.zero_grad()
            after = dora_ext.norm_cache_stats()
            if count:
                assert after["norm_misses"] - before["norm_misses"] == 1, (before, after)
                assert after["norm_hits"] - before["norm_hits"] == 1, (before, after)
        return [p.detach().clone() for p in _trained(inp)]

    cached = run(count=True)
    dora_ext.set_options(norm_cache=False)
    for a, b in zip(cached, run(count=False)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def third_party_optimizer(name: str) -> Callable[[list[torch.Tensor]], torch.optim.Optimizer]:
    """bitsandbytes' 8-bit optimizers (QLoRA recipes' defaults) and DeepSpeed's FusedAdam: CUDA
    kernels that write parameters in place. Skips cleanly where the package is not installed."""
    if name.startswith("bnb_"):
        bnb = pytest.importorskip("bitsandbytes")
        cls = {"bnb_adamw8bit": bnb.optim.AdamW8bit, "bnb_paged_adamw8bit": bnb.optim.PagedAdamW8bit}[name]
        return lambda params: cls(params, lr=0.05)
    pytest.importorskip("deepspeed")
    from deepspeed.ops.adam import FusedAdam
    return lambda params: FusedAdam(params, lr=0.05)


THIRD_PARTY = ["bnb_adamw8bit", "bnb_paged_adamw8bit", "deepspeed_fused_adam"]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", THIRD_PARTY)
def test_third_party_optimizers_never_get_a_stale_norm(name, monkeypatch):
    make_optimizer = third_party_optimizer(name)

    def make_step(params):
        opt = make_optimizer(params)

        def step():
            opt.step()
            opt.zero_grad()
        return step
    seed = torch.seed()

    def inputs():  # B has 5120 elements: above bitsandbytes' 4096-element threshold for 8-bit state
        torch.manual_seed(seed)
        return make_inputs(256, 320, 16, (4, 9), dtype=torch.float32, device="cuda", requires_grad=True)
    _same_as_uncached(inputs, make_step, monkeypatch)
