"""Gradient checkpointing and merge/unmerge of a PEFT model accelerated by dora_ext (CPU, fp32).

Checkpointing re-runs the forward of the checkpointed blocks during backward; the accelerated
layers must give the same gradients as without checkpointing (their forward is deterministic and
their backward saves nothing checkpointing could lose). Tiny random Llama from a config, nothing
downloaded.
"""
from __future__ import annotations

import warnings

import pytest
import torch
from torch.utils.checkpoint import checkpoint

pytest.importorskip("peft")
pytest.importorskip("transformers")

import dora_ext  # noqa: E402
import dora_ext.peft as dp  # noqa: E402
from test_peft import INPUT_IDS, N_LINEAR, Counting, dora_model, lora_layers, rel, step  # noqa: E402

warnings.filterwarnings("ignore", category=UserWarning)


def assert_same_gradients(ours, theirs, rtol: float = 1e-6) -> None:
    (y_ours, g_ours), (y_theirs, g_theirs) = ours, theirs
    torch.testing.assert_close(y_ours, y_theirs, rtol=rtol, atol=0)
    assert g_ours.keys() == g_theirs.keys() and len(g_ours) == 3 * N_LINEAR
    for name in g_theirs:
        torch.testing.assert_close(g_ours[name], g_theirs[name], rtol=rtol, atol=1e-12, msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16-fp32adapters"])
@pytest.mark.parametrize("use_reentrant", [False, True])
def test_transformers_gradient_checkpointing(monkeypatch, use_reentrant, dtype):
    model = dora_model(seed=2, dtype=dtype)  # bf16: PEFT's default fp32 adapters on a bf16 model
    model.train()
    dp.accelerate(model)
    plain = step(model)
    counting = Counting(monkeypatch)
    # PeftModel makes the embedding output require grad, as reentrant checkpointing needs
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    assert model.base_model.model.model.gradient_checkpointing
    before = dora_ext.norm_cache_stats()
    ckpt = step(model)
    after = dora_ext.norm_cache_stats()
    # every DoRA layer ran twice: once in the forward, once recomputed in backward
    assert counting.calls["dora_linear"] == 2 * N_LINEAR
    # and the recompute reused the norm of its forward: N_LINEAR norms computed, not 2 * N_LINEAR
    assert after["norm_misses"] - before["norm_misses"] == N_LINEAR, (before, after)
    assert after["norm_hits"] - before["norm_hits"] == N_LINEAR, (before, after)
    assert_same_gradients(ckpt, plain)
    # and the checkpointed accelerated model agrees with checkpointed stock PEFT
    dp.restore(model)
    stock_ckpt = step(model)
    tol = 1e-5 if dtype == torch.float32 else 2e-2  # DESIGN.md section 6: bf16 rounds differently
    assert rel(ckpt[0], stock_ckpt[0]) < tol
    for name in stock_ckpt[1]:
        assert rel(ckpt[1][name], stock_ckpt[1][name]) < tol, name


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_torch_utils_checkpoint_per_decoder_layer(monkeypatch, use_reentrant):
    model = dora_model(seed=4)
    model.train()
    # a KV cache would be appended to again by the recomputation (transformers' own checkpointing
    # turns it off in training for the same reason)
    model.base_model.model.config.use_cache = False
    dp.accelerate(model)
    plain = step(model)
    counting = Counting(monkeypatch)
    layers = model.base_model.model.model.layers
    originals = [layer.forward for layer in layers]

    def checkpointed(forward):
        def run(hidden_states, *args, **kwargs):
            # reentrant checkpointing only differentiates through tensor positional inputs
            return checkpoint(lambda h: forward(h, *args, **kwargs), hidden_states, use_reentrant=use_reentrant)
        return run

    for layer, forward in zip(layers, originals):
        layer.forward = checkpointed(forward)
    if use_reentrant:  # the embedding is frozen: its output must require grad for reentrant backward
        handle = model.get_input_embeddings().register_forward_hook(lambda m, i, out: out.requires_grad_(True))
    ckpt = step(model)
    if use_reentrant:
        handle.remove()
    assert counting.calls["dora_linear"] == 2 * N_LINEAR
    assert_same_gradients(ckpt, plain)


def test_merge_unmerge_restores_base_weights_to_rounding():
    model = dora_model(seed=5)
    dp.accelerate(model)
    layers = lora_layers(model)
    before = {id(m): m.base_layer.weight.detach().clone() for m in layers}
    with torch.no_grad():
        expected = model(input_ids=INPUT_IDS).logits
    model.merge_adapter()
    assert all(m.merged for m in layers)
    # merged weights are the dense DoRA weight m * (W + sBA) / ||W + sBA||, computed in float64 here
    for m in layers:
        w = before[id(m)].double()
        dense = w + m.scaling["default"] * (m.lora_B["default"].weight.double() @ m.lora_A["default"].weight.double())
        magnitude = m.lora_magnitude_vector["default"].weight.double().unsqueeze(1)
        merged = magnitude * dense / dense.norm(dim=1, keepdim=True)
        assert rel(m.base_layer.weight, merged) < 1e-6
    with torch.no_grad():
        assert rel(model(input_ids=INPUT_IDS).logits, expected) < 1e-5
    model.unmerge_adapter()
    for m in layers:  # back to W up to fp32 rounding of the merge/unmerge round trip
        torch.testing.assert_close(m.base_layer.weight, before[id(m)], rtol=1e-6, atol=1e-7)
    with torch.no_grad():
        assert rel(model(input_ids=INPUT_IDS).logits, expected) < 1e-6
