"""Training an accelerated PEFT DoRA model as users do: with fused optimizers and transformers'
Trainer at its default arguments (fused AdamW), on the CPU.

Each run is compared with stock PEFT trained the same way and with dora_ext's norm cache off:
losses step by step and the trained adapters. A norm cache that trusted version counters fails
these (fused optimizers do not bump them): losses drift by ~1e-2 and adapters by tens of percent.
"""
from __future__ import annotations

import copy

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

import dora_ext  # noqa: E402
import dora_ext.peft as dp  # noqa: E402
from test_norm_cache_writers import THIRD_PARTY, third_party_optimizer  # noqa: E402
from test_peft import INPUT_IDS, dora_model, rel  # noqa: E402

STEPS = 5
LOSS_RTOL = 1e-4     # stock PEFT vs dora_ext in fp32: the same math, other rounding
ADAPTER_RTOL = 1e-3

OPTIMIZERS = {
    "adamw_fused": lambda p: torch.optim.AdamW(p, lr=1e-2, fused=True),
    "adamw_foreach": lambda p: torch.optim.AdamW(p, lr=1e-2, foreach=True),
    "adamw_forloop": lambda p: torch.optim.AdamW(p, lr=1e-2, foreach=False),
    "adam_fused": lambda p: torch.optim.Adam(p, lr=1e-2, fused=True),
    "sgd_fused": lambda p: torch.optim.SGD(p, lr=0.5, momentum=0.9, fused=True),
    "adagrad_fused": lambda p: torch.optim.Adagrad(p, lr=5e-2, fused=True),
}


def _adapters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _train(model: torch.nn.Module, make_optimizer) -> tuple[list[float], dict[str, torch.Tensor]]:
    opt = make_optimizer([p for p in model.parameters() if p.requires_grad])
    ids = INPUT_IDS.to(next(model.parameters()).device)
    losses = []
    for _ in range(STEPS):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses, _adapters(model)


def _assert_same_training(ours, theirs) -> None:
    (our_losses, our_adapters), (their_losses, their_adapters) = ours, theirs
    for i, (a, b) in enumerate(zip(our_losses, their_losses)):
        assert abs(a - b) <= LOSS_RTOL * abs(b), f"step {i}: loss {a} vs {b}"
    assert our_adapters.keys() == their_adapters.keys()
    worst = max(rel(our_adapters[k], their_adapters[k]) for k in our_adapters)
    assert worst < ADAPTER_RTOL, f"trained adapters differ by {worst:.2e} (relative)"


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_accelerated_model_trains_like_stock_peft(name, monkeypatch):
    dora_ext.set_options(norm_cache=True)
    stock = dora_model()
    accelerated = copy.deepcopy(stock)
    dp.accelerate(accelerated)
    assert set(dp.report(accelerated).values()) == {"routed"}
    theirs = _train(stock, OPTIMIZERS[name])
    ours = _train(accelerated, OPTIMIZERS[name])
    _assert_same_training(ours, theirs)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", THIRD_PARTY)
def test_accelerated_model_with_third_party_optimizers(name, monkeypatch):
    """bitsandbytes' 8-bit optimizers and DeepSpeed's FusedAdam on CUDA: like stock PEFT and like
    the cache off."""
    dora_ext.set_options(norm_cache=True)
    make_optimizer = third_party_optimizer(name)
    stock = dora_model(device="cuda")
    accelerated, uncached = copy.deepcopy(stock), copy.deepcopy(stock)
    dp.accelerate(accelerated)
    dp.accelerate(uncached)
    ours = _train(accelerated, make_optimizer)
    _assert_same_training(ours, _train(stock, make_optimizer))
    dora_ext.set_options(norm_cache=False)
    _assert_same_training(ours, _train(uncached, make_optimizer))


def test_accelerated_model_with_updates_through_data():
    """SGD written through ``p.data`` after each backward (no version bump, no optimizer)."""
    def make_optimizer(params):
        class DataSGD:
            def step(self):
                for p in params:
                    p.data.add_(p.grad, alpha=-0.5)

            def zero_grad(self):
                for p in params:
                    p.grad = None
        return DataSGD()

    stock = dora_model()
    accelerated = copy.deepcopy(stock)
    dp.accelerate(accelerated)
    _assert_same_training(_train(accelerated, make_optimizer), _train(stock, make_optimizer))


def _tiny_qwen2(seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                      max_position_embeddings=64)
    base = transformers.Qwen2ForCausalLM(config)
    model = peft.get_peft_model(base, peft.LoraConfig(use_dora=True, r=8, lora_alpha=16,
                                                      target_modules="all-linear"))
    with torch.no_grad():  # B away from zero, so the norm depends on A and B from the first step
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.1)
    return model


def _trainer_run(model, tmp_path, tag: str) -> tuple[list[float], dict[str, torch.Tensor]]:
    ids = torch.randint(0, 128, (16, 12), generator=torch.Generator().manual_seed(3))
    data = [{"input_ids": row, "labels": row} for row in ids]
    # Only what a quick run needs: no saving, no logging integrations; the optimizer, its
    # learning rate schedule and everything else stay at transformers' defaults.
    args = transformers.TrainingArguments(output_dir=str(tmp_path / tag), max_steps=6, per_device_train_batch_size=4,
                                          learning_rate=1e-2, logging_steps=1, save_strategy="no", report_to=[],
                                          use_cpu=True, seed=0, disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data)
    trainer.train()
    opt = trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults.get("fused"), "not the default fused AdamW"
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 6
    return losses, _adapters(model)


def test_trainer_defaults_match_stock_peft_and_uncached(tmp_path, monkeypatch):
    dora_ext.set_options(norm_cache=True)
    stock = _tiny_qwen2()
    accelerated, uncached = copy.deepcopy(stock), copy.deepcopy(stock)
    dp.accelerate(accelerated)
    dp.accelerate(uncached)
    theirs = _trainer_run(stock, tmp_path, "stock")
    dora_ext.clear_norm_cache()
    ours = _trainer_run(accelerated, tmp_path, "accelerated")
    stats = dora_ext.norm_cache_stats()
    _assert_same_training(ours, theirs)
    assert stats["invalidations"] >= 6 and stats["norm_misses"] > 0, stats
    dora_ext.set_options(norm_cache=False)
    _assert_same_training(ours, _trainer_run(uncached, tmp_path, "uncached"))


def test_eval_under_autocast_between_fused_steps_sees_the_new_adapters():
    """Eval under autocast reuses the casts of the fp32 adapters (and their norms); a fused
    optimizer step in between changes the adapters without a version bump, so the next eval must
    cast again: its logits equal those computed with the cache (and the cast reuse) off."""
    model = dora_model()
    dp.accelerate(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, fused=True)
    for i in range(3):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            cached = model(input_ids=INPUT_IDS).logits
            cached_again = model(input_ids=INPUT_IDS).logits
            with dora_ext.overrides(norm_cache=False):
                fresh = model(input_ids=INPUT_IDS).logits
        torch.testing.assert_close(cached, fresh, rtol=0, atol=0, msg=f"eval {i}")
        torch.testing.assert_close(cached_again, fresh, rtol=0, atol=0, msg=f"eval {i}, second call")
        model(input_ids=INPUT_IDS, labels=INPUT_IDS).loss.backward()
        opt.step()
        opt.zero_grad()
