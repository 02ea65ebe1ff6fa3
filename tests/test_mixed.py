"""dora_linear_mixed: many adapters (DoRA and plain LoRA, any ranks) in one batch, each leading row of
x with its own adapter (-1: the base model), against each row alone in float64; and PEFT's
``adapter_names=`` on an accelerated model (stock PEFT refuses it for DoRA)."""
from __future__ import annotations

import pytest
import torch

import dora_ext
from reference import (FWD_TOL, assert_rows_alone, make_inputs, perturb_adapters, ref_dora_linear, rel_err,
                       tiny_llama_config)


def _adapters(d_in, d_out, ranks, dtype, device, kinds, adapter_dtype=None, seed=0):
    """One adapter per rank; kinds[k] is "dora" or "lora"."""
    mag_dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else None
    out = []
    for k, (r, kind) in enumerate(zip(ranks, kinds)):
        inp = make_inputs(d_in, d_out, r, (1,), dtype, device, mag_dtype=mag_dtype, adapter_dtype=adapter_dtype,
                          seed=seed + k, scale=0.25 * (k + 1))
        out.append(dict(A=inp["lora_A"], B=inp["lora_B"], m=inp["magnitude"] if kind == "dora" else None,
                        s=inp["scale"]))
    return out


def _reference_row(x_row, W, b, adapter):
    if adapter is None:
        y = x_row.double().cpu() @ W.double().cpu().T
        return y if b is None else y + b.double().cpu()
    if adapter["m"] is None:
        y = x_row.double().cpu() @ (W.double().cpu() + adapter["s"] * adapter["B"].double().cpu()
                                    @ adapter["A"].double().cpu()).T
        return y if b is None else y + b.double().cpu()
    return ref_dora_linear(x_row, W, b, adapter["A"], adapter["B"], adapter["m"], adapter["s"])


def _run(x, W, b, adapters, index):
    return dora_ext.dora_linear_mixed(x, W, b, [a["A"] for a in adapters], [a["B"] for a in adapters],
                                      [a["m"] for a in adapters], [a["s"] for a in adapters], index)


def _assert_rows(y, x, W, b, adapters, index, dtype):
    """Every row of y is its adapter's output for that row alone (float64 reference)."""
    assert y.shape == (*x.shape[:-1], W.shape[0]) and y.dtype == x.dtype
    for i, k in enumerate(index.tolist()):
        ref = _reference_row(x[i], W, b, adapters[k] if k >= 0 else None)
        assert rel_err(y[i], ref) < FWD_TOL[dtype], (i, k, rel_err(y[i], ref))


def _check(x, W, b, adapters, index, dtype):
    if dtype == torch.float64 and dora_ext.get_options()["tier"] == "fused":
        dora_ext.set_options(tier="auto")  # no fused kernels for float64 (the fixture restores the option)
    with torch.no_grad():
        y = _run(x, W, b, adapters, index)
    _assert_rows(y, x, W, b, adapters, index, dtype)
    return y


CASES = [
    pytest.param(torch.float32, None, id="fp32"),
    pytest.param(torch.float64, None, id="fp64"),
    pytest.param(torch.bfloat16, None, id="bf16"),
    pytest.param(torch.bfloat16, torch.float32, id="bf16-fp32adapters"),
]


@pytest.mark.parametrize("dtype, adapter_dtype", CASES)
@pytest.mark.parametrize("layout", ["every-row-different", "all-same", "with-base-rows-and-empty-group"])
def test_rows_equal_each_row_alone(any_device, dtype, adapter_dtype, layout):
    d_in, d_out = 37, 29
    base = make_inputs(d_in, d_out, 1, (5, 7), dtype, any_device)
    x, W, b = base["x"], base["weight"], base["bias"]
    adapters = _adapters(d_in, d_out, [1, 3, 8, 4, 2], dtype, any_device, ["dora", "lora", "dora", "dora", "lora"],
                         adapter_dtype)
    index = {"every-row-different": [0, 1, 2, 3, 4], "all-same": [2, 2, 2, 2, 2],
             "with-base-rows-and-empty-group": [-1, 3, 0, -1, 3]}[layout]  # adapters 1, 2, 4 get no row
    _check(x, W, b, adapters, torch.tensor(index), dtype)


def test_two_dimensional_x_is_one_token_per_row(any_device):
    base = make_inputs(16, 12, 1, (6,), torch.float32, any_device, bias=False)
    adapters = _adapters(16, 12, [2, 5], torch.float32, any_device, ["dora", "dora"])
    index = torch.tensor([1, 0, -1, 1, 1, 0], device=any_device)  # on x's device works too
    _check(base["x"], base["weight"], None, adapters, index, torch.float32)


@pytest.mark.parametrize("layout", ["consecutive-groups", "scattered-groups"])
def test_non_contiguous_x_and_fp32_adapters_through_the_parts_route(any_device, layout):
    """Float32 adapters on bfloat16 rows with the tensor-core parts route forced (the route of prefill
    sizes on CUDA), on a transposed view of x."""
    dora_ext.set_options(fp32_parts_min_tokens=0)
    d_in, d_out = 40, 24
    base = make_inputs(d_in, d_out, 1, (6, 5), torch.bfloat16, any_device)
    x = base["x"].transpose(0, 1).contiguous().transpose(0, 1)  # [6, 5, d_in], not contiguous
    adapters = _adapters(d_in, d_out, [3, 8, 1], torch.bfloat16, any_device, ["dora", "lora", "dora"],
                         torch.float32)
    index = {"consecutive-groups": [0, 0, 2, 2, 1, -1], "scattered-groups": [2, 0, 1, 2, -1, 0]}[layout]
    _check(x, base["weight"], base["bias"], adapters, torch.tensor(index), torch.bfloat16)


def test_no_adapters_is_the_base_model():
    base = make_inputs(16, 12, 1, (3, 2), torch.float64, "cpu")
    _check(base["x"], base["weight"], base["bias"], [], torch.tensor([-1, -1, -1]), torch.float64)


def test_each_adapter_norm_is_cached(fresh_norm_cache):
    base = make_inputs(16, 12, 1, (4, 3), torch.float32, "cpu")
    adapters = _adapters(16, 12, [2, 3], torch.float32, "cpu", ["dora", "dora"])
    with torch.no_grad():
        _run(base["x"], base["weight"], base["bias"], adapters, torch.tensor([0, 1, 0, 1]))
        before = dora_ext.norm_cache_stats()
        _run(base["x"], base["weight"], base["bias"], adapters, torch.tensor([1, 1, 0, -1]))
        after = dora_ext.norm_cache_stats()
    assert after["norm_hits"] - before["norm_hits"] == 2 and after["norm_misses"] == before["norm_misses"]


@pytest.mark.parametrize("bad, message", [
    (dict(index=[0, 3, 0, 0]), "adapter_index holds 3, but there are 2 adapters"),
    (dict(index=[0, -2, 0, 0]), "adapter_index holds -2"),
    (dict(index=[0, 1, 0]), r"adapter_index must be \[rows\] = \[4\]"),
    (dict(index_dtype=torch.float32), "adapter_index must be int64 or int32"),
    (dict(drop_scale=True), "must list the same adapters"),
    (dict(bad_rank=True), r"dora_linear_mixed \(adapter 1\): lora_B must be \[d_out, r\]"),
])
def test_bad_arguments_are_named(bad, message):
    base = make_inputs(16, 12, 1, (4, 3), torch.float32, "cpu")
    adapters = _adapters(16, 12, [2, 3], torch.float32, "cpu", ["dora", "lora"])
    if bad.get("bad_rank"):
        adapters[1]["B"] = adapters[1]["B"][:, :2]
    index = torch.tensor(bad.get("index", [0, 1, 0, 1]), dtype=bad.get("index_dtype", torch.int64))
    scales = [a["s"] for a in adapters][: 1 if bad.get("drop_scale") else None]
    with pytest.raises(RuntimeError, match=message):
        dora_ext.dora_linear_mixed(base["x"], base["weight"], base["bias"], [a["A"] for a in adapters],
                                   [a["B"] for a in adapters], [a["m"] for a in adapters], scales, index)


def test_recording_gradients_is_refused():
    base = make_inputs(16, 12, 1, (2, 3), torch.float32, "cpu", requires_grad=True)
    adapters = _adapters(16, 12, [2], torch.float32, "cpu", ["dora"])
    with pytest.raises(RuntimeError, match="for inference and record no gradients"):
        _run(base["x"], base["weight"], base["bias"], adapters, torch.tensor([0, 0]))


# ------------------------------------------------------------------- the mixed decode kernel (CUDA)
# Up to decode_max_tokens tokens on the fused tier, every adapter's factors of one dtype: one kernel
# pass over W serves every row (triton_src/decode.py's dora_mixed_decode_kernel).

_NEEDS_GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DECODE_CASES = [
    pytest.param(torch.bfloat16, None, id="bf16"),
    pytest.param(torch.float16, None, id="fp16"),
    pytest.param(torch.bfloat16, torch.float32, id="bf16-fp32adapters"),
    pytest.param(torch.float16, torch.float32, id="fp16-fp32adapters"),
]


def _decode_inputs(dtype, adapter_dtype, batch, d_in=64, d_out=48, bias=True):
    base = make_inputs(d_in, d_out, 1, batch, dtype, "cuda", bias=bias)
    adapters = _adapters(d_in, d_out, [1, 3, 8, 4, 2], dtype, "cuda", ["dora", "lora", "dora", "dora", "lora"],
                         adapter_dtype)
    return base["x"], base["weight"], base["bias"], adapters


def _assert_mixed_decode_kernel_ran():
    tier, reason = dora_ext.last_tier()
    assert tier == "fused_inference" and "mixed decode kernel (tokens <= 16)" in reason, (tier, reason)


@pytest.mark.cuda
@_NEEDS_GPU
@pytest.mark.parametrize("dtype, adapter_dtype", DECODE_CASES)
@pytest.mark.parametrize("batch, index", [
    ((5,), [0, 1, 2, 3, 4]),                       # every row another adapter
    ((5,), [2, 2, 2, 2, 2]),                       # all rows the same adapter
    ((4,), [-1, 3, 0, -1]),                        # base-model rows; adapters 1, 2, 4 get none
    ((2, 3), [4, -1]),                             # 3-D x: 2 rows of 3 tokens
    ((5, 3), [1, 0, 3, 1, -1]),                    # 15 tokens: up to the limit
], ids=["every-row-different", "all-same", "base-rows", "3d", "15-tokens"])
@pytest.mark.parametrize("d_in, d_out, bias", [(64, 48, True), (37, 29, False)], ids=["aligned", "odd-nobias"])
def test_decode_sizes_run_the_mixed_decode_kernel(dtype, adapter_dtype, batch, index, d_in, d_out, bias):
    """Each row equals dora_linear (or LoRA) of that row alone, against float64; the kernel served it."""
    dora_ext.set_options(tier="fused")
    x, W, b, adapters = _decode_inputs(dtype, adapter_dtype, batch, d_in, d_out, bias)
    _check(x, W, b, adapters, torch.tensor(index), dtype)
    _assert_mixed_decode_kernel_ran()


@pytest.mark.cuda
@_NEEDS_GPU
@pytest.mark.parametrize("norm_cache", [True, False], ids=["norm-cache", "no-norm-cache"])
@pytest.mark.parametrize("dtype, adapter_dtype", DECODE_CASES[::2])
def test_mixed_decode_kernel_sees_in_place_writes(dtype, adapter_dtype, norm_cache):
    """An in-place write to one adapter between two calls changes that adapter's rows, and only
    them: nothing derived from the adapters (their stack, the norm, g) is reused stale."""
    dora_ext.set_options(tier="fused", norm_cache=norm_cache)
    x, W, b, adapters = _decode_inputs(dtype, adapter_dtype, (2, 3))
    index = torch.tensor([0, 1])
    with torch.no_grad():
        before = _run(x, W, b, adapters, index)
        adapters[0]["B"].mul_(-3.0)  # a DoRA adapter's B (its norm changes too)
        adapters[1]["A"].mul_(-3.0)  # a plain LoRA adapter's A
        after = _run(x, W, b, adapters, index)
    _assert_mixed_decode_kernel_ran()
    for i, k in enumerate(index.tolist()):
        assert rel_err(after[i], before[i]) > 0.05, k  # far beyond the tolerance below
        assert rel_err(after[i], _reference_row(x[i], W, b, adapters[k])) < FWD_TOL[dtype], k
    with torch.no_grad():  # an untouched adapter's rows stay as they were
        adapters[2]["B"].add_(1.0)
        again = _run(x, W, b, adapters, index)
    assert torch.equal(again, after)
    # A write that bypasses the version counter, followed by invalidate_norm_cache() as the cache's
    # rules ask: seen too.
    adapters[1]["B"].data.mul_(-3.0)
    dora_ext.invalidate_norm_cache()
    with torch.no_grad():
        last = _run(x, W, b, adapters, index)
    for i, k in enumerate(index.tolist()):
        assert rel_err(last[i], _reference_row(x[i], W, b, adapters[k])) < FWD_TOL[dtype], k
    assert rel_err(last[1], after[1]) > 0.05


@pytest.mark.cuda
@_NEEDS_GPU
@pytest.mark.parametrize("batch", [(4, 1), (4, 5)], ids=["decode-kernel", "lora-kernel"])
def test_stacked_caches_follow_every_input(batch):
    """The stacked path keeps the stack with its G and the device row table between calls; a change of
    W, a magnitude, a scale or the index's values (in place, through a new tensor, or behind the version
    counter followed by invalidate_norm_cache) is seen by the next call, which reads no stale value."""
    dora_ext.set_options(tier="fused")
    x, W, b, adapters = _decode_inputs(torch.bfloat16, None, batch, d_out=96)
    index = torch.tensor([0, 2, 3, -1])

    def check():
        y = _check(x, W, b, adapters, index, torch.bfloat16)
        assert ("mixed decode kernel" if batch[1] == 1 else "mixed LoRA kernel") in dora_ext.last_tier()[1]
        return y

    first = check()
    assert torch.equal(check(), first)  # every cache hit: the same result
    with torch.no_grad():
        W.mul_(-1.0)  # in place: every DoRA adapter's norm and g change
    check()
    with torch.no_grad():
        adapters[2]["m"].mul_(3.0)  # one magnitude
    check()
    adapters[3]["s"] = 2.5 * adapters[3]["s"]  # one scale
    check()
    index.copy_(torch.tensor([3, 0, -1, 2]))  # the index's values, in place
    check()
    index = torch.tensor([3, 0, -1, 2])  # the same values in a new tensor
    check()
    index.numpy()[:] = [2, 2, 0, 0]  # behind the version counter: read by value, so seen too
    check()
    adapters[0]["m"].data.mul_(0.5)  # behind the version counter, then the cache's rule
    dora_ext.invalidate_norm_cache()
    check()


@pytest.mark.cuda
@_NEEDS_GPU
def test_stacked_caches_are_per_stream():
    """Two streams calling with different indexes each read their own row table."""
    dora_ext.set_options(tier="fused")
    x, W, b, adapters = _decode_inputs(torch.bfloat16, None, (4,))
    indexes = [torch.tensor([0, 1, 2, 3]), torch.tensor([3, -1, 1, 0])]
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    for stream in streams:
        stream.wait_stream(torch.cuda.current_stream())  # the inputs are ready
    outputs = [None, None]
    with torch.no_grad():
        for _ in range(3):
            for j in (0, 1):
                with torch.cuda.stream(streams[j]):
                    outputs[j] = _run(x, W, b, adapters, indexes[j])
    torch.cuda.synchronize()
    for index, y in zip(indexes, outputs):
        _assert_rows(y, x, W, b, adapters, index, torch.bfloat16)


@pytest.mark.cuda
@_NEEDS_GPU
def test_mixed_decode_kernel_limits():
    """Above decode_max_tokens, with adapters of two dtypes, or with the option at 0, the per-adapter
    path runs (and gives the same rows)."""
    dora_ext.set_options(tier="fused")
    x, W, b, adapters = _decode_inputs(torch.bfloat16, None, (6, 3))
    index = torch.tensor([0, 1, 2, 3, 4, -1])
    _check(x, W, b, adapters, index, torch.bfloat16)  # 18 tokens
    assert "mixed decode kernel" not in dora_ext.last_tier()[1]
    _check(x[:4], W, b, adapters, index[:4], torch.bfloat16)  # 12 tokens
    _assert_mixed_decode_kernel_ran()
    with dora_ext.options(decode_max_tokens=0):
        _check(x[:4], W, b, adapters, index[:4], torch.bfloat16)
        assert "mixed decode kernel" not in dora_ext.last_tier()[1]
    fp32 = _adapters(64, 48, [2], torch.bfloat16, "cuda", ["dora"], torch.float32)
    _check(x[:4], W, b, adapters[:2] + fp32, torch.tensor([0, 2, 1, -1]), torch.bfloat16)
    assert "mixed decode kernel" not in dora_ext.last_tier()[1]



@pytest.mark.cuda
@_NEEDS_GPU
@pytest.mark.parametrize("dtype, adapter_dtype", DECODE_CASES[::2])
@pytest.mark.parametrize("batch, index, d_out", [
    ((4, 1), [0, 1, 2, -1], 48),                   # decode size: the mixed decode kernel
    ((6, 40), [0, 0, 3, 1, 2, -1], 48),            # prefill size, per adapter, consecutive groups (views)
    ((6, 40), [2, 0, 1, 2, -1, 0], 48),            # per adapter, scattered groups (one copy of their rows)
    ((6, 40), [0, 0, 3, 1, 2, -1], 96),            # prefill size, the mixed LoRA kernel
    ((6, 40), [2, 0, 1, 2, -1, 0], 96),
], ids=["decode", "prefill-consecutive", "prefill-scattered", "stacked-consecutive", "stacked-scattered"])
def test_mixed_batches_never_wait_for_the_gpu(dtype, adapter_dtype, batch, index, d_out):
    """With PEFT's host-side adapter index, a mixed call (norms cached) makes no synchronising CUDA call:
    the host queues the next layer's work while the GPU runs this one."""
    dora_ext.set_options(tier="fused")
    x, W, b, adapters = _decode_inputs(dtype, adapter_dtype, batch, d_out=d_out)
    index = torch.tensor(index)
    with torch.no_grad():
        expected = _run(x, W, b, adapters, index)  # fills the norm cache (a norm's first computation may wait)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            y = _run(x, W, b, adapters, index)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(y, expected)


# ------------------------------------------------------ the mixed LoRA kernel (CUDA, above decode sizes)
# Every adapter's factors of one dtype and their stacked rank at most d_out / 2: cuBLAS's x W^T for the
# whole batch, h for the stacked adapters, then one kernel applies each row's adapter over x W^T
# (triton_src/decode.py's dora_mixed_lora_kernel). The adapters of _decode_inputs stack to rank 32.

def _assert_mixed_lora_kernel_ran():
    tier, reason = dora_ext.last_tier()
    assert tier == "fused_inference" and "mixed LoRA kernel on the base output" in reason, (tier, reason)


@pytest.mark.cuda
@_NEEDS_GPU
@pytest.mark.parametrize("dtype, adapter_dtype", DECODE_CASES)
@pytest.mark.parametrize("batch, index", [
    ((6, 40), [0, 0, 3, 1, 2, -1]),                # consecutive groups, base rows, an unused adapter
    ((6, 40), [2, 0, 1, 2, -1, 0]),                # scattered groups
    ((3, 150), [4, 4, 4]),                         # one adapter, rows longer than a tile
    ((70,), [k % 6 - 1 for k in range(70)]),       # 2-D x: one token per row, tiles of mixed adapters
], ids=["consecutive", "scattered", "all-same", "2d-every-token-mixed"])
@pytest.mark.parametrize("d_in, d_out, bias", [(64, 96, True), (37, 83, False)], ids=["aligned", "odd-nobias"])
def test_prefill_sizes_run_the_mixed_lora_kernel(dtype, adapter_dtype, batch, index, d_in, d_out, bias):
    """Each row equals dora_linear (or LoRA) of that row alone, against float64; the kernel served it."""
    dora_ext.set_options(tier="fused")
    x, W, b, adapters = _decode_inputs(dtype, adapter_dtype, batch, d_in, d_out, bias)
    _check(x, W, b, adapters, torch.tensor(index), dtype)
    _assert_mixed_lora_kernel_ran()


@pytest.mark.cuda
@_NEEDS_GPU
@pytest.mark.parametrize("dtype, adapter_dtype", DECODE_CASES[::2])
def test_mixed_lora_kernel_on_a_non_contiguous_x(dtype, adapter_dtype):
    dora_ext.set_options(tier="fused")
    x, W, b, adapters = _decode_inputs(dtype, adapter_dtype, (30, 5), d_out=96)
    x = x.transpose(0, 1).contiguous().transpose(0, 1)  # [30, 5, d_in], not contiguous
    _check(x, W, b, adapters, torch.tensor([k % 6 - 1 for k in range(30)]), dtype)
    _assert_mixed_lora_kernel_ran()


@pytest.mark.cuda
@_NEEDS_GPU
@pytest.mark.parametrize("dtype, adapter_dtype", DECODE_CASES[::2])
def test_mixed_lora_kernel_sees_in_place_writes(dtype, adapter_dtype):
    """As the decode kernel's test: the stack, the norms and G follow writes to the adapters."""
    dora_ext.set_options(tier="fused")
    x, W, b, adapters = _decode_inputs(dtype, adapter_dtype, (2, 40), d_out=96)
    index = torch.tensor([0, 1])
    with torch.no_grad():
        before = _run(x, W, b, adapters, index)
        adapters[0]["B"].mul_(-3.0)
        adapters[1]["A"].mul_(-3.0)
        after = _run(x, W, b, adapters, index)
    _assert_mixed_lora_kernel_ran()
    for i, k in enumerate(index.tolist()):
        assert rel_err(after[i], before[i]) > 0.05, k
        assert rel_err(after[i], _reference_row(x[i], W, b, adapters[k])) < FWD_TOL[dtype], k


@pytest.mark.cuda
@_NEEDS_GPU
def test_mixed_lora_kernel_limits():
    """A stacked rank above d_out / 2, or adapters of two dtypes: the per-adapter path (same rows)."""
    dora_ext.set_options(tier="fused")
    x, W, b, adapters = _decode_inputs(torch.bfloat16, None, (4, 20), d_out=63)  # stacked rank 32 > 31.5
    index = torch.tensor([0, 1, 2, -1])
    _check(x, W, b, adapters, index, torch.bfloat16)
    assert "mixed LoRA kernel" not in dora_ext.last_tier()[1]
    x, W, b, adapters = _decode_inputs(torch.bfloat16, None, (4, 20), d_out=64)
    _check(x, W, b, adapters, index, torch.bfloat16)
    _assert_mixed_lora_kernel_ran()
    fp32 = _adapters(64, 64, [2], torch.bfloat16, "cuda", ["dora"], torch.float32)
    _check(x, W, b, adapters[:2] + fp32, torch.tensor([0, 2, 1, -1]), torch.bfloat16)
    assert "mixed LoRA kernel" not in dora_ext.last_tier()[1]

# ------------------------------------------------------------------------------------------- PEFT


def _peft_model(device, dtype=torch.float32):
    import transformers
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(transformers.LlamaForCausalLM(tiny_llama_config()).to(device=device, dtype=dtype),
                           LoraConfig(r=8, lora_alpha=16, use_dora=True, target_modules="all-linear"))
    model.add_adapter("second", LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "v_proj"]))
    model.add_adapter("plain", LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "down_proj"]))
    perturb_adapters(model)
    return model.eval()


def test_peft_adapter_names_with_dora(any_device):
    import dora_ext.peft as dp
    from peft import PeftModel

    ids = torch.randint(0, 128, (4, 9), generator=torch.Generator().manual_seed(2)).to(any_device)
    names = ["default", "__base__", "second", "plain"]
    # (a separate model: a PEFT forward that raises leaves its adapter_names hooks behind)
    with torch.no_grad(), pytest.raises(ValueError, match="DoRA"):
        _peft_model(any_device)(input_ids=ids, adapter_names=names)  # stock PEFT refuses DoRA here
    model = _peft_model(any_device)
    dp.accelerate(model)
    assert_rows_alone(model, ids, names)
    assert dp.fallback_counts(model) == {}
    assert isinstance(model, PeftModel)


def test_peft_generate_with_adapter_names():
    import dora_ext.peft as dp

    model = _peft_model("cpu")
    dp.accelerate(model)
    ids = torch.randint(0, 128, (2, 5), generator=torch.Generator().manual_seed(3))
    out = model.generate(input_ids=ids, adapter_names=["second", "default"], max_new_tokens=4, do_sample=False)
    for i, name in enumerate(["second", "default"]):
        model.set_adapter(name)
        alone = model.generate(input_ids=ids[i:i + 1], max_new_tokens=4, do_sample=False)
        assert torch.equal(out[i:i + 1], alone), name
    model.set_adapter("default")


def test_peft_adapter_names_in_and_out_of_inference_mode(any_device):
    """The adapter index PEFT's rows map to is made once per distinct batch layout and shared by the
    layers: a layout first met under inference_mode serves a later no_grad call too, and another
    layout gets its own rows."""
    import dora_ext.peft as dp

    model = _peft_model(any_device)
    dp.accelerate(model)
    ids = torch.randint(0, 128, (3, 6), generator=torch.Generator().manual_seed(4)).to(any_device)
    names = ["plain", "second", "__base__"]
    with torch.inference_mode():
        first = model(input_ids=ids, adapter_names=names).logits
    with torch.no_grad():
        again = model(input_ids=ids, adapter_names=names).logits
        swapped = model(input_ids=ids, adapter_names=names[::-1]).logits
    assert torch.equal(again, first)
    with torch.no_grad():
        model.set_adapter("second")
        alone = model(input_ids=ids[1:2]).logits
        with model.disable_adapter():
            base = model(input_ids=ids[0:1]).logits
    assert rel_err(first[1:2], alone) < 1e-5 and rel_err(swapped[0:1], base) < 1e-5
    model.set_adapter("default")
