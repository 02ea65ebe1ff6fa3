"""share_adapter_storage: one layer's adapters in one stack, which mixed batches read in place (no
second copy), and dora_ext.peft.share_adapters moving every accelerated PEFT layer's adapters into
one. Every output is checked against float64 of each row alone (test_mixed.py's helpers), and the
single-adapter ops against the same adapters before they were moved."""
from __future__ import annotations

import copy

import pytest
import torch

import dora_ext
from reference import FWD_TOL, make_inputs, perturb_adapters, rel_err, tiny_llama_config
from test_mixed import DECODE_CASES, _NEEDS_GPU, _adapters, _assert_rows, _run

RANKS, KINDS = [1, 3, 8, 4, 2], ["dora", "lora", "dora", "dora", "lora"]


def _share(adapters: list[dict]) -> list[dict]:
    """The same adapters, their factors views of one shared stack."""
    a, b = dora_ext.share_adapter_storage([x["A"] for x in adapters], [x["B"] for x in adapters])
    return [dict(x, A=av, B=bv) for x, av, bv in zip(adapters, a, b)]


def test_views_lie_in_one_zero_padded_stack(any_device):
    adapters = _adapters(37, 29, RANKS, torch.float32, any_device, KINDS)
    for x in adapters:
        x["A"].requires_grad_()
    shared = _share(adapters)
    rank = 32  # 18 columns, padded to the stack's quantum
    for x, s in zip(adapters, shared):
        assert torch.equal(s["A"], x["A"]) and torch.equal(s["B"], x["B"])
        assert not s["A"].requires_grad and s["A"].grad_fn is None and s["A"].device == x["A"].device
        assert s["A"].is_contiguous() and s["B"].stride() == (rank, 1)
    for key, shape in (("A", (rank, 37)), ("B", (29, rank))):
        storages = {s[key].untyped_storage().data_ptr() for s in shared}
        assert len(storages) == 1
        whole = shared[0][key].new_empty(0).set_(shared[0][key].untyped_storage()).view(shape)
        columns = whole[18:] if key == "A" else whole[:, 18:]
        assert whole.numel() * whole.element_size() == shared[0][key].untyped_storage().nbytes()
        assert torch.count_nonzero(columns) == 0  # the padding the kernels' tiles read


def test_views_made_under_inference_mode_are_plain_tensors():
    adapters = _adapters(16, 8, [2, 3], torch.float32, "cpu", ["dora", "dora"])
    with torch.inference_mode():
        shared = _share(adapters)
    assert not any(s[k].is_inference() for s in shared for k in ("A", "B"))
    shared[0]["A"].add_(1.0)  # usable as parameters' data outside inference mode


@pytest.mark.parametrize("bad, message", [
    (lambda A, B: ([], []), "lora_A must list at least one adapter"),
    (lambda A, B: (A, B[:1]), "lora_A and lora_B must list the same adapters, got 2 and 1 entries"),
    (lambda A, B: (A, [B[0], B[1][:, :1]]), r"lora_B\[1\] must be \[d_out, r\] = \[8, 3\], got \[8, 1\]"),
    (lambda A, B: ([A[0], A[1][:, :5]], B), r"lora_A\[1\] must be \[r, d_in\] = \[r, 16\] with r >= 1, got \[3, 5\]"),
    (lambda A, B: ([A[0], A[1].double()], B), "lora_A\\[0\\]'s floating dtype Float, adapter 1 has Double"),
    (lambda A, B: ([A[0].long(), A[1]], B), "floating dtype"),
])
def test_bad_arguments_are_named(bad, message):
    adapters = _adapters(16, 8, [2, 3], torch.float32, "cpu", ["dora", "dora"])
    A, B = bad([x["A"] for x in adapters], [x["B"] for x in adapters])
    with pytest.raises(RuntimeError, match=message):
        dora_ext.share_adapter_storage(A, B)


def test_fake_kernel_gives_the_shapes():
    """The op returns the padded stack; the wrapper cuts it into views of the adapters' shapes."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        A, B = [torch.empty(2, 16), torch.empty(3, 16)], [torch.empty(8, 2), torch.empty(8, 3)]
        a_stack, b_stack = torch.ops.dora_ext.shared_adapter_stack.default(A, B)
        a, b = dora_ext.share_adapter_storage(A, B)
    assert a_stack.shape == (32, 16) and b_stack.shape == (8, 32)
    assert [t.shape for t in a] == [(2, 16), (3, 16)] and [t.shape for t in b] == [(8, 2), (8, 3)]


def test_op_outputs_alias_nothing():
    """The op's two outputs are new tensors (a custom op's outputs may not alias its inputs or each
    other: torch raises on it under CI=1 and will in general); the views alias the stack."""
    adapters = _adapters(16, 8, [2, 3], torch.float32, "cpu", ["dora", "dora"])
    A, B = [x["A"] for x in adapters], [x["B"] for x in adapters]
    a_stack, b_stack = torch.ops.dora_ext.shared_adapter_stack.default(A, B)
    pointers = {t.untyped_storage().data_ptr() for t in A + B}
    assert a_stack.untyped_storage().data_ptr() not in pointers | {b_stack.untyped_storage().data_ptr()}
    assert b_stack.untyped_storage().data_ptr() not in pointers
    assert torch.equal(a_stack[:2], A[0]) and torch.equal(a_stack[2:5], A[1])
    assert torch.equal(b_stack[:, 2:5], B[1]) and torch.count_nonzero(b_stack[:, 5:]) == 0


@pytest.mark.parametrize("dtype, adapter_dtype", [
    pytest.param(torch.float64, None, id="fp64"),
    pytest.param(torch.bfloat16, None, id="bf16"),
    pytest.param(torch.bfloat16, torch.float32, id="bf16-fp32adapters"),
])
@pytest.mark.parametrize("batch, index, order", [
    ((5,), [0, 1, 2, 3, 4], [0, 1, 2, 3, 4]),      # decode size, every adapter of the stack
    ((4, 3), [2, -1, 0, 2], [3, 0, 4]),            # a subset, reordered (adapter k of the call: order[k])
    ((6, 40), [0, 0, 2, 1, -1, 2], [4, 2, 1]),     # prefill size, a subset
], ids=["decode-all", "decode-subset", "prefill-subset"])
def test_mixed_batches_read_shared_views(any_device, dtype, adapter_dtype, batch, index, order):
    """Every row of a mixed batch over views of a shared stack (any of its adapters, in any order)
    equals that row alone in float64; on CUDA the stacked kernels serve it."""
    if dtype == torch.float64 and any_device.type == "cuda":
        pytest.skip("float64 runs the eager path only: covered on the CPU")
    d_in, d_out = (64, 96)
    base = make_inputs(d_in, d_out, 1, batch, dtype, any_device)
    shared = _share(_adapters(d_in, d_out, RANKS, dtype, any_device, KINDS, adapter_dtype))
    adapters = [shared[k] for k in order]
    with torch.no_grad():
        y = _run(base["x"], base["weight"], base["bias"], adapters, torch.tensor(index))
    _assert_rows(y, base["x"], base["weight"], base["bias"], adapters, torch.tensor(index), dtype)
    if any_device.type == "cuda":
        tier, reason = dora_ext.last_tier()
        assert tier == "fused_inference" and "mixed" in reason, (tier, reason)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_dora_linear_on_shared_views_equals_contiguous_factors(any_device, dtype):
    """The single-adapter op (forward and every gradient) on a shared stack's strided B equals the
    same adapter held contiguously."""
    inp = make_inputs(48, 40, 6, (3, 5), dtype, any_device)
    other = make_inputs(48, 40, 3, (1,), dtype, any_device, seed=7)
    a, b = dora_ext.share_adapter_storage([other["lora_A"], inp["lora_A"]], [other["lora_B"], inp["lora_B"]])
    results = []
    for A, B in ((inp["lora_A"], inp["lora_B"]), (a[1], b[1])):
        leaves = [t.detach().clone().requires_grad_() for t in (inp["x"], inp["magnitude"])]
        A, B = A.detach().requires_grad_(), B.detach().requires_grad_()
        y = dora_ext.dora_linear(leaves[0], inp["weight"], inp["bias"], A, B, leaves[1], inp["scale"])
        y.float().square().sum().backward()
        results.append([y, leaves[0].grad, A.grad, B.grad, leaves[1].grad])
    assert not b[1].is_contiguous()
    for contiguous, strided in zip(*results):
        assert rel_err(strided, contiguous.double()) < FWD_TOL[dtype]


# ------------------------------------------------------------------------------ PEFT layers


def _peft_model(device, dtype=torch.float32):
    import transformers
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(transformers.LlamaForCausalLM(tiny_llama_config()).to(device=device, dtype=dtype),
                           LoraConfig(r=8, lora_alpha=16, use_dora=True, target_modules=["q_proj", "v_proj"]))
    model.add_adapter("second", LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "v_proj"]))
    model.add_adapter("plain", LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]))
    perturb_adapters(model)
    return model.eval()


def _lora_layers(model):
    from peft.tuners.lora.layer import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def _share_all(model) -> int:
    import dora_ext.peft as dp

    return dp.share_adapters(model)


def _storages(layer) -> set[int]:
    return {p.untyped_storage().data_ptr() for n in layer.lora_A for p in (layer.lora_A[n].weight,
                                                                            layer.lora_B[n].weight)}


def _shared_and_twin(device: str, dtype: torch.dtype = torch.float32) -> tuple:
    """Two accelerated copies of one PEFT model: the first with its adapters shared (returns the
    number of layers shared too), the twin left as it is."""
    import dora_ext.peft as dp

    model = _peft_model(device, dtype)
    twin = copy.deepcopy(model)
    for m in (model, twin):
        dp.accelerate(m)
    return model, twin, _share_all(model)


def _assert_training_step_equal(model, twin, ids, loss_tol: float, grad_tol: float) -> None:
    """A training step on adapter "second" gives ``model`` (adapters moved) the loss and gradients of
    ``twin`` (not moved)."""
    for m in (model, twin):
        m.set_adapter("second")
        m.train()
    losses = [m(input_ids=ids, labels=ids).loss for m in (model, twin)]
    for loss in losses:
        loss.backward()
    assert rel_err(losses[0], losses[1].double()) < loss_tol
    grads = {n: p.grad for n, p in twin.named_parameters() if p.grad is not None}
    assert grads
    for n, p in model.named_parameters():
        if n in grads:
            assert rel_err(p.grad, grads[n].double()) < grad_tol, n


def test_peft_layers_keep_their_values_and_parameters():
    pytest.importorskip("peft")
    import dora_ext.peft as dp

    model = _peft_model("cpu")
    dp.accelerate(model)
    params = {n: p for n, p in model.named_parameters()}
    before = {n: p.detach().clone() for n, p in params.items()}
    assert _share_all(model) == len(_lora_layers(model)) == 4
    assert {n: p for n, p in model.named_parameters()} == params  # the same Parameter objects
    assert all(torch.equal(p, before[n]) for n, p in params.items())
    for layer in _lora_layers(model):
        assert len(_storages(layer)) == 2  # one A stack and one B stack per layer
    pointers = {n: p.data_ptr() for n, p in params.items()}
    assert _share_all(model) == 4  # already shared: nothing moves
    assert {n: p.data_ptr() for n, p in params.items()} == pointers


def test_peft_layers_are_shared_again_after_an_adapter_is_added():
    pytest.importorskip("peft")
    from peft import LoraConfig

    import dora_ext.peft as dp

    model = _peft_model("cpu")
    dp.accelerate(model)
    _share_all(model)
    model.add_adapter("late", LoraConfig(r=3, lora_alpha=3, use_dora=True, target_modules=["q_proj"]))
    _share_all(model)
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    assert "late" in q_proj.lora_A and len(_storages(q_proj)) == 2


def test_cpu_mixed_batches_leave_adapters_where_they_are():
    """On the CPU (no stacked copy to save) mixed batches move nothing; share_adapters leaves layers
    that are not accelerated alone."""
    pytest.importorskip("peft")
    import dora_ext.peft as dp

    model = _peft_model("cpu")
    pointers = {n: p.data_ptr() for n, p in model.named_parameters()}
    assert _share_all(model) == 0  # not accelerated: PEFT's layers are left alone
    dp.accelerate(model)
    ids = torch.randint(0, 128, (3, 6), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        model(input_ids=ids, adapter_names=["second", "plain", "__base__"])
    assert {n: p.data_ptr() for n, p in model.named_parameters()} == pointers


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, _NEEDS_GPU])])
def serving_device(request, monkeypatch) -> str:
    """Where mixed batches share adapters by default: CUDA; the CPU with SHARE_ON widened to it, so
    the same test checks the Python side without a GPU."""
    from dora_ext import _shared_adapters

    if request.param == "cpu":
        monkeypatch.setattr(_shared_adapters, "SHARE_ON", ("cpu", "cuda"))
    return request.param


def test_mixed_batches_share_each_layer_they_run(serving_device, monkeypatch):
    """An inference adapter_names= call moves each layer's adapters into one stack (every adapter of
    the layer, called or not) and its rows still equal each row alone; later calls move nothing and
    look at pointers only; an adapter added and called is moved in; restore gives every factor its
    own contiguous tensor back, values unchanged."""
    pytest.importorskip("peft")
    import dora_ext.peft as dp
    from peft import LoraConfig
    from reference import assert_rows_alone

    from dora_ext import _shared_adapters

    dtype = torch.float32 if serving_device == "cpu" else torch.bfloat16
    model = _peft_model(serving_device, dtype)
    values = {n: p.detach().clone() for n, p in model.named_parameters()}
    dp.accelerate(model)
    ids = torch.randint(0, 128, (3, 6), generator=torch.Generator().manual_seed(6)).to(serving_device)
    names = ["second", "plain", "__base__"]
    assert_rows_alone(model, ids, names, tol=1e-5 if dtype == torch.float32 else 3e-2)
    for layer in _lora_layers(model):
        assert len(_storages(layer)) == 2
    shares = []
    real_share = _shared_adapters.share
    monkeypatch.setattr(_shared_adapters, "share", lambda layer, *a: shares.append(layer) or real_share(layer, *a))
    pointers = {n: p.data_ptr() for n, p in model.named_parameters()}
    with torch.inference_mode():
        model(input_ids=ids, adapter_names=names)
    assert shares == [] and {n: p.data_ptr() for n, p in model.named_parameters()} == pointers

    model.add_adapter("late", LoraConfig(r=3, lora_alpha=3, use_dora=True, target_modules=["q_proj"]))
    dp.accelerate(model)
    with torch.no_grad():
        model(input_ids=ids, adapter_names=names)  # "late" not called: nothing moves
        assert shares == []
        model(input_ids=ids, adapter_names=["late", "second", "late"])
    q_projs = [layer for layer in _lora_layers(model) if "late" in layer.lora_A]
    assert len(q_projs) == 2 and shares == q_projs
    for layer in _lora_layers(model):
        assert len(_storages(layer)) == 2

    assert dp.restore(model) == len(_lora_layers(model))
    for n, p in model.named_parameters():
        assert p.is_contiguous(), n
        if n in values:
            assert torch.equal(p, values[n]), n
    for layer in _lora_layers(model):
        assert len(_storages(layer)) == 2 * len(layer.lora_A)


def test_factors_in_storage_another_owner_lays_out_stay_put():
    pytest.importorskip("peft")
    import dora_ext.peft as dp

    model = _peft_model("cpu")
    dp.accelerate(model)
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    flat = torch.zeros(10_000)
    weight = q_proj.lora_A["second"].weight
    part = flat[100:100 + weight.numel()].view_as(weight)
    part.copy_(weight)
    weight.data = part  # as FSDP's flat parameters lay them out
    assert _share_all(model) == len(_lora_layers(model)) - 1
    assert weight.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr()
    assert len(_storages(q_proj)) > 2


def test_shared_peft_adapters_train_save_and_load(tmp_path):
    """After sharing, a training step's gradients equal those of an unshared copy, and
    save_pretrained (strided views inside) loads back into the same outputs."""
    pytest.importorskip("peft")
    import dora_ext.peft as dp
    from peft import PeftModel

    model, twin, _ = _shared_and_twin("cpu")
    ids = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(5))
    _assert_training_step_equal(model, twin, ids, loss_tol=1e-6, grad_tol=1e-5)
    model.eval()
    assert not model.base_model.model.model.layers[0].self_attn.q_proj.lora_B["second"].weight.is_contiguous()
    model.save_pretrained(tmp_path)
    dp.restore(model)
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    import transformers

    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(tiny_llama_config())
    loaded = PeftModel.from_pretrained(base, tmp_path / "second").eval()
    with torch.no_grad():
        assert rel_err(loaded(input_ids=ids).logits, expected.double()) < 1e-6


def test_shared_state_dict_round_trips_through_torch_save(tmp_path):
    """torch.save keeps the stack's storage once; the loaded values equal the unshared twin's."""
    pytest.importorskip("peft")

    model, twin, _ = _shared_and_twin("cpu")
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    loaded = torch.load(tmp_path / "sd.pt")
    expected = twin.state_dict()
    assert loaded.keys() == expected.keys()
    for name, value in loaded.items():
        assert torch.equal(value, expected[name]), name


@pytest.mark.parametrize("optimizer", [
    dict(fused=True),  # torch's fused AdamW updates a strided parameter as if it were contiguous
    dict(foreach=True),
    dict(foreach=False),
], ids=["fused", "foreach", "for-loop"])
def test_optimizer_steps_move_shared_adapters_out_first(optimizer, any_device):
    """An optimizer step on shared adapters gives each layer's factors back as separate contiguous
    tensors first: the step then updates exactly what it updates on the unshared twin (a fused step
    on a strided view of the stack wrote over the next adapters' columns), and the adapters it does
    not train keep their values."""
    pytest.importorskip("peft")
    import gc

    from dora_ext import _shared_adapters

    model, twin, shared = _shared_and_twin(any_device.type)
    assert shared == len(_lora_layers(model))
    ids = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(7)).to(any_device)
    for m in (model, twin):
        m.set_adapter("second")  # the adapter _assert_training_step_equal trains
    opts = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2, **optimizer)
            for m in (model, twin)]
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert any(".lora_B.second." in n for n in trained)
    for _ in range(2):
        _assert_training_step_equal(model, twin, ids, loss_tol=1e-5, grad_tol=1e-4)
        for opt in opts:
            opt.step()
            opt.zero_grad()
    twin_params = dict(twin.named_parameters())
    for n, p in model.named_parameters():
        assert rel_err(p, twin_params[n].double()) < 1e-5, n
        assert p.is_contiguous(), n
    for layer in _lora_layers(model):
        assert len(_storages(layer)) == 2 * len(layer.lora_A)  # each factor its own storage again
    assert all(not torch.equal(p, trained[n]) for n, p in model.named_parameters() if n in trained)
    assert _share_all(model) == len(_lora_layers(model))  # and can be shared again
    del model, opts, p, layer  # the loops' names hold a parameter and a layer too
    gc.collect()
    assert not _shared_adapters._SHARED_FACTORS  # the registry holds nothing alive


@pytest.mark.cuda
@_NEEDS_GPU
@pytest.mark.parametrize("dtype, adapter_dtype", DECODE_CASES[::2])
@pytest.mark.parametrize("tokens", [1, 40], ids=["decode-kernel", "lora-kernel"])
def test_shared_stack_makes_no_copy(dtype, adapter_dtype, tokens):
    """The first mixed call over separate adapters keeps a stacked copy of them on the GPU; over views
    of a shared stack it keeps only G and the norms (each adapter is held once)."""
    dora_ext.set_options(tier="fused")
    d = 1024
    base = make_inputs(d, d, 1, (4, tokens), dtype, "cuda")
    index = torch.tensor([0, 1, 2, 3])
    # Cached stacks are freed when a later call adds one and finds their weight or adapters gone: the
    # stacks of earlier tests go stale here and are swept by a first call, and everything made below
    # stays alive to the end, so that no other stack is freed inside a measured call.
    dora_ext.clear_norm_cache()
    alive = [base["weight"].clone(), _adapters(d, d, [8], dtype, "cuda", ["dora"], adapter_dtype, seed=10)]
    with torch.no_grad():
        _run(base["x"], alive[0], base["bias"], alive[1], torch.zeros(4, dtype=torch.long))
    grown = {}
    for name in ("separate", "shared"):
        adapters = _adapters(d, d, [16, 24, 40, 64], dtype, "cuda", ["dora", "lora", "dora", "dora"], adapter_dtype,
                             seed=11 if name == "separate" else 12)
        if name == "shared":
            adapters = _share(adapters)
        W = base["weight"].clone()  # a weight of its own: a stack is kept per base weight
        alive += [adapters, W]
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        with torch.no_grad():
            y = _run(base["x"], W, base["bias"], adapters, index)
        _assert_rows(y, base["x"], W, base["bias"], adapters, index, dtype)
        del y
        torch.cuda.synchronize()
        grown[name] = torch.cuda.memory_allocated() - before
    factor_bytes = sum(r * 2 * d for r in [16, 24, 40, 64]) * (4 if adapter_dtype else 2)
    assert grown["separate"] >= factor_bytes, grown
    assert grown["shared"] < factor_bytes / 4, grown


@pytest.mark.cuda
@_NEEDS_GPU
def test_peft_adapter_names_on_cuda_share_each_layer():
    """share_adapters moves each layer's adapters into one stack; adapter_names rows on CUDA still
    equal each row alone, and a training step on one adapter equals an unshared copy's."""
    pytest.importorskip("peft")
    from reference import assert_rows_alone

    model, twin, shared = _shared_and_twin("cuda", torch.bfloat16)
    assert shared == len(_lora_layers(model))
    ids = torch.randint(0, 128, (3, 6), generator=torch.Generator().manual_seed(6)).cuda()
    assert_rows_alone(model, ids, ["second", "plain", "__base__"], tol=3e-2)
    for layer in _lora_layers(model):
        assert len(_storages(layer)) == 2
    _assert_training_step_equal(model, twin, ids, loss_tol=1e-2, grad_tol=3e-2)


def test_shared_peft_adapters_merge_like_unshared_ones():
    pytest.importorskip("peft")

    model, twin, _ = _shared_and_twin("cpu")
    ids = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(8))
    merged = [m.merge_and_unload(adapter_names=["second", "plain"]) for m in (model, twin)]
    with torch.no_grad():
        logits = [m(input_ids=ids).logits for m in merged]
    assert rel_err(logits[0], logits[1].double()) < 1e-6
