"""QDoRA: PEFT DoRA layers on bitsandbytes 4-bit (NF4 / FP4, double quantization or not) and 8-bit
bases, routed by dora_ext.peft.accelerate, against stock PEFT's QDoRA on the same quantized model.

bitsandbytes' CPU backend quantizes and runs 4-bit layers, so the 4-bit cases run in CI; its 8-bit
layers quantize on CUDA only (those cases run on the GPU).
"""
from __future__ import annotations

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")
transformers = pytest.importorskip("transformers")
from peft import LoraConfig, get_peft_model  # noqa: E402

import dora_ext  # noqa: E402
import dora_ext.peft as dp  # noqa: E402
from dora_ext import _quantized  # noqa: E402
from reference import perturb_adapters, tiny_llama_config  # noqa: E402

CUDA = torch.cuda.is_available()
N_LINEAR = 14  # 2 decoder layers x 7 projections
IDS = torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(7))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return ((a - b).norm() / b.norm()).item()


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu().flatten(), b.detach().double().cpu().flatten()
    return (a @ b / (a.norm() * b.norm())).item()


def _quantized_linear(linear: torch.nn.Linear, kind: str, compute_dtype: torch.dtype) -> torch.nn.Module:
    bias = linear.bias is not None
    if kind == "int8":
        q = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=bias, has_fp16_weights=False)
        q.weight = bnb.nn.Int8Params(linear.weight.data.clone(), requires_grad=False, has_fp16_weights=False)
    else:
        quant_type, double = kind.split("-")
        q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=bias, compute_dtype=compute_dtype,
                              quant_type=quant_type, compress_statistics=double == "dq")
        q.weight = bnb.nn.Params4bit(linear.weight.data.clone(), requires_grad=False, quant_type=quant_type,
                                     compress_statistics=double == "dq")
    if bias:
        q.bias = torch.nn.Parameter(linear.bias.data.clone(), requires_grad=False)
    return q


def qdora_model(kind: str, device: str, dtype: torch.dtype = torch.bfloat16, **config):
    """A tiny Llama whose decoder linears are bitsandbytes layers (quantized on ``device``), with PEFT
    DoRA adapters (PEFT's defaults: float32 adapters) and a 'trained' B and magnitude."""
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(tiny_llama_config()).to(dtype)
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, torch.nn.Linear) and name != "lm_head":
                setattr(module, name, _quantized_linear(child, kind, dtype))
    model = model.to(device)  # bitsandbytes quantizes here
    setattr(model, "is_loaded_in_8bit" if kind == "int8" else "is_loaded_in_4bit", True)
    kwargs = {"r": 8, "lora_alpha": 16, "use_dora": True, "target_modules": "all-linear", **config}
    peft_model = get_peft_model(model, LoraConfig(**kwargs))
    perturb_adapters(peft_model)
    return peft_model


def _count_calls(monkeypatch, module, name: str) -> dict[str, int]:
    """Counts the calls of ``module.name`` (as the code under test looks it up) in ``["n"]``."""
    count = {"n": 0}
    original = getattr(module, name)

    def counting(*args, **kwargs):
        count["n"] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, counting)
    return count


def step(model, seed: int | None = None):
    model.zero_grad(set_to_none=True)
    if seed is not None:
        torch.manual_seed(seed)
    logits = model(input_ids=IDS.to(next(model.parameters()).device)).logits
    logits.float().square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    return logits.detach(), grads


def assert_close_to_peft(ours, theirs, n_grads=3 * N_LINEAR):
    # both runs share the quantized weights, the same dequantization and bitsandbytes' base GEMM:
    # they differ by the norm's accumulation order and the compose's rounding only
    assert ours[0].dtype == theirs[0].dtype
    assert rel(ours[0], theirs[0]) < 1e-2 and cosine(ours[0], theirs[0]) >= 0.9999
    assert ours[1].keys() == theirs[1].keys() and len(ours[1]) == n_grads
    for name in theirs[1]:
        assert rel(ours[1][name], theirs[1][name]) < 2e-2, name


def _devices(kinds):
    out = []
    for kind in kinds:
        if kind != "int8":
            out.append(pytest.param(kind, "cpu", id=f"{kind}-cpu"))
        out.append(pytest.param(kind, "cuda", id=f"{kind}-cuda", marks=[
            pytest.mark.cuda, pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")]))
    return out


@pytest.mark.parametrize("kind, device", _devices(["nf4-dq", "nf4-nodq", "fp4-dq", "int8"]))
def test_qdora_step_matches_peft(kind, device, monkeypatch):
    model = qdora_model(kind, device)
    theirs = step(model)
    calls = _count_calls(monkeypatch, dp, "compose_delta")
    assert dp.accelerate(model) == N_LINEAR
    assert set(dp.report(model).values()) == {"routed"}
    ours = step(model)
    assert calls["n"] == N_LINEAR
    assert dp.fallback_counts(model) == {}
    assert_close_to_peft(ours, theirs)
    assert dp.restore(model) == N_LINEAR
    again = step(model)
    assert torch.equal(again[0], theirs[0])


@pytest.mark.parametrize("kind, device", _devices(["nf4-dq"]))
def test_qdora_with_dropout_draws_peft_masks(kind, device):
    model = qdora_model(kind, device, lora_dropout=0.1)
    model.train()
    theirs = step(model, seed=5)
    dp.accelerate(model)
    ours = step(model, seed=5)
    assert_close_to_peft(ours, theirs)
    assert rel(step(model, seed=6)[0], theirs[0]) > 10 * rel(ours[0], theirs[0])


@pytest.mark.parametrize("kind, device", _devices(["nf4-dq"]))
def test_eval_reuses_the_norm_without_dequantizing(kind, device, monkeypatch):
    model = qdora_model(kind, device)
    dp.accelerate(model)
    model.eval()
    count = _count_calls(monkeypatch, _quantized, "dequantized_weight")
    with torch.no_grad():
        first = model(input_ids=IDS.to(device)).logits
        assert count["n"] == N_LINEAR
        second = model(input_ids=IDS.to(device)).logits
    assert count["n"] == N_LINEAR  # the kept norms served: no dequantization
    assert torch.equal(first, second)
    # a training step (backward) and an optimizer step change the adapters: the next eval recomputes
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    step(model)
    opt.step()
    model.eval()
    with torch.no_grad():
        third = model(input_ids=IDS.to(device)).logits
    assert count["n"] == 2 * N_LINEAR + N_LINEAR  # training forward, then a fresh eval norm
    dp.restore(model)
    with torch.no_grad():
        assert rel(third, model(input_ids=IDS.to(device)).logits) < 1e-2


@pytest.mark.parametrize("kind, device", _devices(["nf4-dq"]))
def test_checkpoint_recompute_reuses_the_norm(kind, device, monkeypatch):
    model = qdora_model(kind, device)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    theirs = step(model)
    dp.accelerate(model)
    count = _count_calls(monkeypatch, dp, "row_norm")
    ours = step(model)
    assert count["n"] == N_LINEAR  # the recompute inside the backward pass used the forward's norms
    assert_close_to_peft(ours, theirs)


def test_only_quantized_bitsandbytes_weights_are_served():
    model = qdora_model("nf4-dq", "cpu")
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert _quantized.quantized_weight_reason(layer.base_layer.weight) is None
    assert "not a bitsandbytes" in _quantized.quantized_weight_reason(torch.nn.Parameter(torch.zeros(2)))


def test_norm_cache_option_off_recomputes(monkeypatch):
    model = qdora_model("nf4-dq", "cpu")
    dp.accelerate(model)
    model.eval()
    count = _count_calls(monkeypatch, _quantized, "dequantized_weight")
    with dora_ext.options(norm_cache=False), torch.no_grad():
        model(input_ids=IDS)
        model(input_ids=IDS)
    assert count["n"] == 2 * N_LINEAR


def _with_more_adapters(model):
    """A second DoRA adapter and a plain LoRA one beside "default", each with a 'trained' B."""
    model.add_adapter("second", LoraConfig(r=4, lora_alpha=4, use_dora=True, target_modules="all-linear"))
    model.add_adapter("plain", LoraConfig(r=3, lora_alpha=6, target_modules="all-linear"))
    perturb_adapters(model)
    return model


@pytest.mark.parametrize("kind, device", _devices(["nf4-dq", "fp4-plain"]))
def test_mixed_batch_rows_equal_each_row_alone(kind, device):
    """adapter_names= with DoRA adapters on a quantized base (stock PEFT raises): every row equals
    that row run alone with its adapter, through dora_ext's single-adapter QDoRA path; nothing falls
    back to PEFT."""
    from reference import assert_rows_alone

    model = _with_more_adapters(qdora_model(kind, device)).eval()
    dp.accelerate(model)
    ids = torch.randint(0, 128, (4, 9), generator=torch.Generator().manual_seed(3)).to(device)
    names = ["second", "__base__", "default", "plain"]
    with torch.no_grad():
        model(input_ids=ids, adapter_names=names)
    assert dp.fallback_counts(model) == {}  # (run alone below, the LoRA adapter is PEFT's: counted)
    # Exact on the CPU. On CUDA bitsandbytes' own GEMM depends on the batch (4 rows against 1: 4e-3
    # at one layer's output, 7e-3 at the logits of the "__base__" row, which runs no adapter code;
    # H100, 2026-12-07), so rows get the bf16 tolerance of the other CUDA rows-alone tests.
    assert_rows_alone(model, ids, names, tol=1e-5 if device == "cpu" else 3e-2)
    with torch.no_grad():
        out = model.generate(input_ids=ids, adapter_names=["plain", "second", "second", "__base__"],
                             max_new_tokens=3, do_sample=False)
    assert out.shape == (4, 12)


def test_mixed_batch_decode_reuses_the_norms(monkeypatch):
    """After the first mixed call, later ones (decode steps) take each DoRA adapter's kept norm: no
    dequantization of the base weight."""
    model = _with_more_adapters(qdora_model("nf4-dq", "cpu")).eval()
    dp.accelerate(model)
    ids = torch.randint(0, 128, (3, 5), generator=torch.Generator().manual_seed(4))
    names = ["second", "default", "plain"]
    with torch.no_grad():
        first = model(input_ids=ids, adapter_names=names).logits
        calls = _count_calls(monkeypatch, _quantized, "dequantized_weight")
        again = model(input_ids=ids, adapter_names=names).logits
    assert calls["n"] == 0
    torch.testing.assert_close(again, first, rtol=0, atol=0)


def test_mixed_batch_keeps_peft_errors():
    model = _with_more_adapters(qdora_model("nf4-dq", "cpu")).eval()
    dp.accelerate(model)
    ids = torch.randint(0, 128, (2, 5), generator=torch.Generator().manual_seed(5))
    with torch.no_grad(), pytest.raises(ValueError, match="Length of `adapter_names` should be the same"):
        model(input_ids=ids, adapter_names=["second"])
