"""dora_ext.peft on stock PEFT: accelerated DoRA layers reproduce PEFT's results (CPU).

Models are tiny, randomly initialised transformers models (nothing is downloaded).
"""
from __future__ import annotations

import contextlib
import copy
import functools
import warnings

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

import dora_ext  # noqa: E402
import dora_ext.peft as dp  # noqa: E402
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from reference import perturb_adapters, tiny_llama_config  # noqa: E402
from reference import rel_err as rel  # noqa: E402
from peft.tuners.lora.layer import Linear as LoraLinear  # noqa: E402

warnings.filterwarnings("ignore", category=UserWarning)

N_LINEAR = 14  # 2 decoder layers x (q, k, v, o, gate, up, down)



def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().cpu().double().flatten(), b.detach().cpu().double().flatten()
    return (a @ b / (a.norm() * b.norm())).item()


def tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(tiny_llama_config()).to(device=device, dtype=dtype)


def dora_model(seed: int = 0, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
               **config) -> PeftModel:
    kwargs = {"use_dora": True, "r": 8, "lora_alpha": 16, "target_modules": "all-linear", **config}
    model = get_peft_model(tiny_llama(seed, dtype, device), LoraConfig(**kwargs))
    perturb_adapters(model)
    return model


INPUT_IDS = torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(7))


def step(model: nn.Module, seed: int | None = None, ids: torch.Tensor = INPUT_IDS):
    """Logits and the gradient of every trainable parameter for a fixed loss."""
    model.zero_grad(set_to_none=True)
    if seed is not None:
        torch.manual_seed(seed)
    logits = model(input_ids=ids.to(next(model.parameters()).device)).logits
    logits.float().square().mean().backward()
    grads = {n.removeprefix("_orig_mod."): p.grad.clone() for n, p in model.named_parameters()
             if p.requires_grad and p.grad is not None}
    return logits.detach(), grads


def logits_of(model: nn.Module, ids: torch.Tensor = INPUT_IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids.to(next(model.parameters()).device)).logits


def assert_same_step(ours, theirs, tol=1e-5, n_grads=None):
    (y_ours, g_ours), (y_theirs, g_theirs) = ours, theirs
    assert y_ours.dtype == y_theirs.dtype
    assert rel(y_ours, y_theirs) < tol
    assert g_ours.keys() == g_theirs.keys()
    if n_grads is not None:
        assert len(g_ours) == n_grads
    for name in g_theirs:
        assert rel(g_ours[name], g_theirs[name]) < tol, name


def lora_layers(model: nn.Module):
    return [m for m in model.modules() if isinstance(m, LoraLinear)]


class Counting:
    """Counts the dora_ext ops dora_ext.peft calls (which path a layer took)."""

    def __init__(self, monkeypatch):
        self.calls = {"dora_linear": 0, "dora_linear_dropout": 0, "compose_delta": 0}
        for name in self.calls:
            fn = getattr(dp, name)
            monkeypatch.setattr(dp, name, self._wrap(name, fn))

    def _wrap(self, name, fn):
        def wrapped(*args, **kwargs):
            self.calls[name] += 1
            return fn(*args, **kwargs)
        return wrapped

    def reset(self):
        for name in self.calls:
            self.calls[name] = 0


# ------------------------------------------------------------------------------------------ basics


def test_accelerate_matches_stock_peft_logits_and_gradients(monkeypatch, any_device):
    model = dora_model(device=any_device)
    theirs = step(model)
    counting = Counting(monkeypatch)
    assert dp.accelerate(model) == N_LINEAR
    assert all(dp.is_accelerated(m) for m in lora_layers(model))
    assert set(dp.report(model).values()) == {"routed"}
    ours = step(model)
    assert_same_step(ours, theirs, n_grads=3 * N_LINEAR)
    # one fused op per layer: single adapter, unmerged, no dropout
    assert counting.calls == {"dora_linear": N_LINEAR, "dora_linear_dropout": 0, "compose_delta": 0}
    assert dp.fallback_counts(model) == {}
    assert repr(lora_layers(model)[0]).startswith("lora.Linear(")


def test_restore_gives_back_peft_and_accelerate_is_idempotent():
    model = dora_model()
    theirs = step(model)
    assert dp.accelerate(model) == N_LINEAR
    assert dp.accelerate(model) == N_LINEAR
    clone = copy.deepcopy(model)  # deep copies (and pickles) keep the routed class
    assert sum(dp.is_accelerated(m) for m in clone.modules()) == N_LINEAR
    assert rel(logits_of(clone), theirs[0]) < 1e-5
    assert dp.restore(model) == N_LINEAR
    assert all(type(m) is LoraLinear for m in lora_layers(model))
    assert not any("_dora_ext_status" in m.__dict__ for m in model.modules())
    again = step(model)
    assert torch.equal(again[0], theirs[0])
    assert all(torch.equal(again[1][n], theirs[1][n]) for n in theirs[1])
    assert dp.report(model) and set(dp.report(model).values()) == {"not accelerated"}


def test_rslora_and_trainable_base_weight(monkeypatch):
    # (PEFT refuses lora_bias=True with DoRA, so there is no DoRA lora_bias to test)
    model = dora_model(use_rslora=True)
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    q_proj.base_layer.weight.requires_grad_(True)
    theirs = step(model)
    counting = Counting(monkeypatch)
    dp.accelerate(model)
    ours = step(model)
    assert_same_step(ours, theirs)
    assert "base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight" in ours[1]
    # the layer with a trainable base weight takes the compose path (dora_linear keeps W frozen)
    assert counting.calls == {"dora_linear": N_LINEAR - 1, "dora_linear_dropout": 0, "compose_delta": 1}


# ----------------------------------------------------------------------------------------- dropout


def test_lora_dropout_eval_and_training(monkeypatch):
    model = dora_model(lora_dropout=0.1)
    model.eval()
    theirs_eval = step(model)
    model.train()
    theirs_train = step(model, seed=123)
    counting = Counting(monkeypatch)
    dp.accelerate(model)
    model.eval()
    assert_same_step(step(model), theirs_eval)
    assert counting.calls == {"dora_linear": N_LINEAR, "dora_linear_dropout": 0, "compose_delta": 0}
    counting.reset()
    # PEFT feeds dropout(x) to the LoRA path and to the (g - 1) W term; the layer's own dropout
    # module draws it here too (same masks): one dora_linear_dropout call per layer
    model.train()
    assert_same_step(step(model, seed=123), theirs_train)
    assert counting.calls == {"dora_linear": 0, "dora_linear_dropout": N_LINEAR, "compose_delta": 0}


# ------------------------------------------------------------------------------- adapters and state


def test_multiple_adapters_set_adapter_and_mixed_lora(monkeypatch):
    model = dora_model()
    dp.accelerate(model)
    # adapters added after accelerate() are served by the already routed layers
    model.add_adapter("second", LoraConfig(use_dora=True, r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                           lora_dropout=0.05))
    model.add_adapter("plain", LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "down_proj"]))
    perturb_adapters(model, seed=5, adapter="second")
    perturb_adapters(model, seed=6, adapter="plain")
    counting = Counting(monkeypatch)

    def compare(active, n_dora_linear=None, n_dropout=None):
        model.base_model.set_adapter(active)
        dp.restore(model)
        theirs = step(model, seed=11)  # "second" has dropout: same masks for both
        dp.accelerate(model)
        counting.reset()
        assert_same_step(step(model, seed=11), theirs)
        if n_dora_linear is not None:
            assert counting.calls["dora_linear"] == n_dora_linear
        if n_dropout is not None:
            assert counting.calls["dora_linear_dropout"] == n_dropout

    compare("second", n_dora_linear=0, n_dropout=4)  # dropout in training: one op on q, v (2 layers)
    compare("default", n_dora_linear=N_LINEAR)
    compare(["default", "second"], n_dora_linear=N_LINEAR - 4)  # two active on q, v: compose path there
    compare(["default", "plain"])             # vanilla LoRA next to DoRA in q_proj and down_proj
    compare(["second", "plain"])
    model.eval()
    compare("second", n_dora_linear=4)        # 2 layers x (q, v); the other layers have no "second"
    compare(["default", "second", "plain"])
    assert dp.fallback_counts(model) == {}


def test_disable_adapter_context():
    model = dora_model()
    with model.disable_adapter():
        theirs_disabled = logits_of(model)
    theirs = logits_of(model)
    dp.accelerate(model)
    with model.disable_adapter():
        ours_disabled = logits_of(model)
    assert torch.equal(ours_disabled, theirs_disabled)
    assert rel(logits_of(model), theirs) < 1e-5
    assert rel(ours_disabled, theirs) > 1e-3  # the adapter does change the output


def test_merge_unmerge_and_merge_and_unload():
    model = dora_model()
    dp.accelerate(model)
    expected = logits_of(model)
    model.merge_adapter()
    assert all(m.merged for m in lora_layers(model))
    assert rel(logits_of(model), expected) < 1e-5
    model.unmerge_adapter()
    assert not any(m.merged for m in lora_layers(model))
    assert rel(logits_of(model), expected) < 1e-5
    merged = model.merge_and_unload()
    assert not lora_layers(merged)
    assert rel(logits_of(merged), expected) < 1e-5


def test_save_pretrained_roundtrip_into_plain_peft(tmp_path):
    model = dora_model(seed=3)
    dp.accelerate(model)
    # a few optimizer steps on the accelerated model, then save with PEFT's own function
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(2):
        optimizer.zero_grad()
        model(input_ids=INPUT_IDS).logits.square().mean().backward()
        optimizer.step()
    expected = logits_of(model)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_llama(seed=3), tmp_path)  # plain PEFT, not accelerated
    assert not any(dp.is_accelerated(m) for m in loaded.modules())
    assert rel(logits_of(loaded), expected) < 1e-5
    assert dp.accelerate(loaded) == N_LINEAR
    assert rel(logits_of(loaded), expected) < 1e-5


# ----------------------------------------------------------------------------------- fan_in_fan_out


def test_gpt2_conv1d_fan_in_fan_out():
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=64,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0,
                                     eos_token_id=0)
    model = get_peft_model(transformers.GPT2LMHeadModel(config),
                           LoraConfig(use_dora=True, r=8, lora_alpha=16, fan_in_fan_out=True,
                                      target_modules=["c_attn", "c_proj", "c_fc"]))
    perturb_adapters(model)
    assert all(m.fan_in_fan_out for m in lora_layers(model))
    theirs = step(model)
    assert dp.accelerate(model) == 8
    assert_same_step(step(model), theirs, n_grads=24)
    model.merge_adapter()
    assert rel(logits_of(model), theirs[0]) < 1e-5


# -------------------------------------------------------------------------------------------- dtypes


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_16bit_base_with_fp32_adapters_without_autocast(dtype, any_device, monkeypatch):
    """PEFT's default: fp32 adapters and magnitude (autocast_adapter_dtype) on a 16-bit model, no
    autocast. Each layer is one dora_linear call whose LoRA products are float32-accurate, as PEFT's."""
    model = dora_model(dtype=dtype, device=any_device)
    layer = lora_layers(model)[0]
    assert layer.base_layer.weight.dtype == dtype
    assert layer.lora_A["default"].weight.dtype == torch.float32
    assert layer.lora_magnitude_vector["default"].weight.dtype == torch.float32
    truth = step(copy.deepcopy(model).cpu().double())
    theirs = step(model)
    counting = Counting(monkeypatch)
    dp.accelerate(model)
    ours = step(model)
    assert counting.calls == {"dora_linear": N_LINEAR, "dora_linear_dropout": 0, "compose_delta": 0}
    assert ours[0].dtype == dtype
    # the norm agrees to fp32 rounding, but in a 16-bit network a one-ulp change flips 16-bit
    # roundings downstream: held to DESIGN.md section 6's bounds for 16-bit inputs and its 2x rule
    assert rel(ours[0], theirs[0]) < 1e-2
    # composed as PEFT composes it (fp32 after the base output's rounding, one final rounding):
    # the bf16 drop-in criterion (cosine >= 0.99999) holds against PEFT itself here
    assert cosine(ours[0], theirs[0]) >= 0.99999
    assert rel(ours[0], truth[0]) <= 2 * rel(theirs[0], truth[0]) + 1e-4
    assert ours[1].keys() == theirs[1].keys() and len(ours[1]) == 3 * N_LINEAR
    for name in theirs[1]:
        assert ours[1][name].dtype == theirs[1][name].dtype == torch.float32, name
        assert rel(ours[1][name], theirs[1][name]) < 2e-2, name
        assert rel(ours[1][name], truth[1][name]) <= 2 * rel(theirs[1][name], truth[1][name]) + 1e-3, name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_16bit_base_with_fp32_adapters_and_dropout(dtype, any_device, monkeypatch):
    """PEFT's default adapters with lora_dropout in training (TRL/Axolotl recipes): one
    dora_linear_dropout call per layer, the layer's own dropout drawing PEFT's masks (the seeded
    runs agree), within 16-bit rounding of PEFT (which runs the dropped input's base GEMM in fp32)."""
    model = dora_model(dtype=dtype, device=any_device, lora_dropout=0.1)
    model.train()
    theirs = step(model, seed=5)
    counting = Counting(monkeypatch)
    dp.accelerate(model)
    ours = step(model, seed=5)
    assert counting.calls == {"dora_linear": 0, "dora_linear_dropout": N_LINEAR, "compose_delta": 0}
    assert ours[0].dtype == dtype
    assert rel(ours[0], theirs[0]) < 1e-2
    assert cosine(ours[0], theirs[0]) >= 0.9999  # different masks would decorrelate far more
    assert ours[1].keys() == theirs[1].keys() and len(ours[1]) == 3 * N_LINEAR
    for name in theirs[1]:
        assert ours[1][name].dtype == theirs[1][name].dtype == torch.float32, name
        assert rel(ours[1][name], theirs[1][name]) < 2e-2, name
    other_masks = step(model, seed=6)
    assert rel(other_masks[0], theirs[0]) > 10 * rel(ours[0], theirs[0])  # the test sees the masks


def test_eval_under_autocast_reuses_the_norm_of_fp32_adapters(any_device):
    """PEFT's default fp32 adapters on a bf16 model, eval under autocast: the adapters are cast to
    bf16 for the fused op, and the cast keeps its identity while the adapter is unchanged, so the
    norm cache hits on every forward after the first (else the norm, a GEMM over W, would be
    recomputed per forward, decode included). An in-place update (an optimizer step) is seen."""
    model = dora_model(dtype=torch.bfloat16, device=any_device)
    model.eval()
    dp.accelerate(model)
    context = functools.partial(torch.autocast, any_device.type, dtype=torch.bfloat16)
    with context():
        first = logits_of(model)
        dora_ext.clear_norm_cache()
        logits_of(model)  # fills the cache
        before = dora_ext.norm_cache_stats()
        again = logits_of(model)
        after = dora_ext.norm_cache_stats()
    assert torch.equal(again, first)
    assert after["norm_hits"] - before["norm_hits"] == N_LINEAR
    assert after["norm_misses"] == before["norm_misses"]
    layer = lora_layers(model)[0]
    with torch.no_grad():
        layer.lora_B["default"].weight.mul_(3.0)  # in place, like an optimizer step
    with context():
        changed = logits_of(model)
    restored = copy.deepcopy(model)
    dp.restore(restored)
    with context():
        theirs = logits_of(restored)
    assert not torch.equal(changed, first)
    assert rel(changed, theirs) < 2e-2


@pytest.mark.parametrize("base_dtype,autocast_dtype", [
    (torch.float32, torch.bfloat16),
    (torch.bfloat16, torch.bfloat16),  # fp32 adapters on a bf16 base, under autocast
    (torch.float16, torch.float16),
    (torch.bfloat16, None),            # bf16 adapters (autocast_adapter_dtype=False), no autocast
])
def test_low_precision_matches_peft_within_its_own_error(base_dtype, autocast_dtype, any_device):
    """In low precision ours and PEFT's round differently. Both are held to a float64 copy of the
    model: ours may not be more than 2x further off than PEFT (the rule of DESIGN.md section 6)."""
    if autocast_dtype is None:
        model = get_peft_model(tiny_llama(0, base_dtype, any_device),
                               LoraConfig(use_dora=True, r=8, lora_alpha=16, target_modules="all-linear"),
                               autocast_adapter_dtype=False)
        perturb_adapters(model)
        assert lora_layers(model)[0].lora_magnitude_vector["default"].weight.dtype == base_dtype
        context = contextlib.nullcontext
    else:
        model = dora_model(dtype=base_dtype, device=any_device)
        context = functools.partial(torch.autocast, any_device.type, dtype=autocast_dtype)
    truth = step(copy.deepcopy(model).cpu().double())  # the float64 reference runs on the CPU
    with context():
        theirs = step(model)
    assert dp.accelerate(model) == N_LINEAR
    with context():
        ours = step(model)
    assert ours[0].dtype == theirs[0].dtype == (autocast_dtype or base_dtype)
    assert rel(ours[0], theirs[0]) < 2e-2
    assert rel(ours[0], truth[0]) <= 2 * rel(theirs[0], truth[0]) + 1e-4
    assert ours[1].keys() == theirs[1].keys()
    for name in theirs[1]:
        assert ours[1][name].dtype == theirs[1][name].dtype
        assert rel(ours[1][name], truth[1][name]) <= 2 * rel(theirs[1][name], truth[1][name]) + 1e-3, name


@pytest.mark.parametrize("adapters", ["bf16", "fp32_autocast"])
def test_bf16_logits_cosine_against_peft_and_float64(adapters, any_device):
    """Issue #4's bf16 criterion (logits cosine against PEFT in bf16), bounded by what bf16 allows.

    On this random tiny model PEFT's own bf16 logits are only ~0.99998 cosine from a float64 copy
    of the same model (measured on the CPU: 0.999982 with bf16 adapters, 0.999985 with fp32
    adapters under autocast), so two bf16 implementations that round differently cannot be 0.99999
    apart here (ours vs PEFT measured 0.999969 / 0.999975; larger hidden sizes are further apart,
    for PEFT against float64 too). Held here: cosine >= 0.9999 against PEFT, and our distance to
    float64 at most twice PEFT's (DESIGN.md section 6's rule) measured as the angle, i.e.
    1 - cos at most 4x PEFT's (1 - cos ~ angle^2 / 2), for the logits and every adapter gradient. The 0.99999
    figure is reported for the real-size model by
    scripts/bench_model.py (logits_cos)."""
    if adapters == "bf16":
        model = get_peft_model(tiny_llama(0, torch.bfloat16, any_device),
                               LoraConfig(use_dora=True, r=8, lora_alpha=16, target_modules="all-linear"),
                               autocast_adapter_dtype=False)
        perturb_adapters(model)
        context = contextlib.nullcontext
    else:
        model = dora_model(dtype=torch.bfloat16, device=any_device)
        context = functools.partial(torch.autocast, any_device.type, dtype=torch.bfloat16)
    truth = step(copy.deepcopy(model).cpu().double())
    with context():
        theirs = step(model)
    assert dp.accelerate(model) == N_LINEAR
    with context():
        ours = step(model)
    assert ours[0].dtype == theirs[0].dtype == torch.bfloat16
    assert cosine(ours[0], theirs[0]) >= 0.9999
    assert 1 - cosine(ours[0], truth[0]) <= 4 * (1 - cosine(theirs[0], truth[0]))
    assert ours[1].keys() == theirs[1].keys() and len(ours[1]) == 3 * N_LINEAR
    for name in theirs[1]:
        assert cosine(ours[1][name], theirs[1][name]) >= 0.999, name
        # (+2e-6: rounding noise floor; the measured 1 - cos of these gradients is 1e-5 to 1e-4)
        assert 1 - cosine(ours[1][name], truth[1][name]) <= 4 * (1 - cosine(theirs[1][name], truth[1][name])) + 2e-6, \
            name


# ------------------------------------------------------------------------------ fallbacks, observable


def test_unservable_layers_and_calls_fall_back_observably(caplog):
    model = dora_model(target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                       "down_proj", "embed_tokens"])
    hooked = model.base_model.model.model.layers[1].mlp.up_proj
    hooked.base_layer.register_forward_hook(lambda module, args, out: None)
    theirs = step(model)
    with caplog.at_level("INFO", logger="dora_ext.peft"):
        assert dp.accelerate(model) == N_LINEAR - 1
    report = dp.report(model)
    assert "not served" in report["base_model.model.model.embed_tokens"]
    assert "hooks" in report["base_model.model.model.layers.1.mlp.up_proj"]
    assert sum(v == "routed" for v in report.values()) == N_LINEAR - 1
    assert "embed_tokens stays on PEFT's forward" in caplog.text
    assert not dp.is_accelerated(hooked)
    assert_same_step(step(model), theirs)

    # a call a routed layer cannot serve goes to PEFT's code (here: to the base layer, which refuses the
    # extra argument) and is counted
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    with pytest.raises(TypeError, match="unexpected keyword"):
        q_proj(torch.randn(2, 3, 64), not_a_peft_argument=1)
    # adapter_names with a DoRA adapter is served (stock PEFT refuses it): no fallback
    with torch.no_grad():
        x = torch.randn(2, 3, 64)
        assert rel(q_proj(x, adapter_names=["default", "__base__"])[1], q_proj.base_layer(x[1])) < 1e-6
    counts = dp.fallback_counts(model)
    assert list(counts) == ["base_model.model.model.layers.0.self_attn.q_proj"]
    assert sum(counts["base_model.model.model.layers.0.self_attn.q_proj"].values()) == 1


def test_base_layer_with_accelerate_hook_added_after_routing_runs_its_forward():
    """accelerate's hooks (offloading, device maps) replace base_layer.forward; a layer routed before
    the hook was attached must still run the base layer's forward (compose path), not bypass it."""
    hooks = pytest.importorskip("accelerate.hooks")
    model = dora_model()
    theirs = step(model)
    assert dp.accelerate(model) == N_LINEAR
    calls = []

    class CountingHook(hooks.ModelHook):
        def pre_forward(self, module, *args, **kwargs):
            calls.append(module)
            return args, kwargs

    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    hooks.add_hook_to_module(q_proj.base_layer, CountingHook())
    assert dp.is_accelerated(q_proj)
    assert_same_step(step(model), theirs)
    assert calls == [q_proj.base_layer]


# ------------------------------------------------------------------------------------- torch.compile


def compiled_step(model: PeftModel):
    """``step`` of the inner model compiled with fullgraph=True (its parameter names lose PEFT's prefix)."""
    torch._dynamo.reset()
    return step(torch.compile(model.base_model.model, fullgraph=True, backend="aot_eager"))


def unprefixed(result):
    """A ``step`` result of the PeftModel with gradient names as the compiled inner model has them."""
    logits, grads = result
    return logits, {k.removeprefix("base_model.model."): v for k, v in grads.items()}


def test_torch_compile_fullgraph_of_accelerated_model():
    model = dora_model()
    stock_layer = copy.deepcopy(lora_layers(model)[0])
    theirs = step(model)
    dp.accelerate(model)
    ours = compiled_step(model)
    assert_same_step(ours, unprefixed(theirs), n_grads=3 * N_LINEAR)
    # Stock PEFT's own DoRA Linear traces with fullgraph=True in some torch/peft pairs
    # (torch 2.11 + peft 0.21.0) and not in others (torch 2.14 + peft 0.21.2): that is
    # PEFT's behaviour, not ours, so it is not asserted here.
    del stock_layer


def test_torch_compile_fullgraph_bf16_model_with_default_fp32_adapters():
    """PEFT's default on a bf16 model (fp32 adapters, no autocast) compiles with fullgraph=True
    and gives the eager accelerated model's logits and adapter gradients."""
    model = dora_model(dtype=torch.bfloat16)
    dp.accelerate(model)
    eager = step(model)
    ours = compiled_step(model)
    assert ours[0].dtype == torch.bfloat16
    assert_same_step(ours, unprefixed(eager), tol=1e-2, n_grads=3 * N_LINEAR)


# ------------------------------------------------------------------------------------- other PEFT API


def test_scale_layer_delete_adapter_and_generate():
    model = dora_model()
    model.eval()
    model.add_adapter("other", LoraConfig(use_dora=True, r=4, lora_alpha=8, target_modules=["q_proj", "o_proj"]))
    perturb_adapters(model, seed=9, adapter="other")
    generate = dict(input_ids=INPUT_IDS[:1, :5], max_new_tokens=4, do_sample=False, pad_token_id=0)

    def observe():
        for layer in lora_layers(model):
            layer.scale_layer(0.5)
        scaled = logits_of(model)
        for layer in lora_layers(model):
            layer.unscale_layer()
        return scaled, logits_of(model), model.generate(**generate)

    theirs = observe()
    dp.accelerate(model)
    ours = observe()
    assert rel(ours[0], theirs[0]) < 1e-5 and rel(ours[1], theirs[1]) < 1e-5
    assert rel(ours[0], ours[1]) > 1e-3  # the scale change is seen
    assert torch.equal(ours[2], theirs[2])  # greedy decoding (one-token steps with a KV cache)
    model.delete_adapter("other")
    assert all("other" not in m.lora_A for m in lora_layers(model))
    assert rel(logits_of(model), theirs[1]) < 1e-5


class _RecordingFinder:
    """A sys.meta_path finder that finds nothing and records what it was asked for: every import of a
    module not yet in sys.modules (a failed import of an optional package asks again on every call)."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    def find_spec(self, name, path=None, target=None):
        self.asked.append(name)
        return None


def test_routed_forward_looks_up_no_module(monkeypatch):
    """A routed forward runs per layer and per decoded token: it must not search sys.path (a failed
    import of bitsandbytes in the servability check cost ~0.2 ms a call, most of the host time of a
    decode step). Checked with bitsandbytes both absent and imported."""
    import sys

    model = dora_model()
    dp.accelerate(model)
    model.eval()
    finder = _RecordingFinder()
    ids = INPUT_IDS[:1, :1]
    for bnb_loaded in (False, True):
        if bnb_loaded:
            pytest.importorskip("bitsandbytes")
        else:
            monkeypatch.delitem(sys.modules, "bitsandbytes", raising=False)
        with torch.no_grad():
            model(input_ids=ids)  # first call: anything lazily imported once is imported here
            monkeypatch.setattr(sys, "meta_path", [finder, *sys.meta_path])
            model(input_ids=ids)
            monkeypatch.setattr(sys, "meta_path", [f for f in sys.meta_path if f is not finder])
        assert finder.asked == [], finder.asked
        assert not dp.fallback_counts(model)
