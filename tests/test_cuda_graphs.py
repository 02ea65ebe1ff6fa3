"""CUDA graphs: the fused ops captured once and replayed with new input values.

A captured graph replays the kernels with the pointers and launch arguments seen at
capture, so everything the ops compute from tensor *values* (the norm, g = m / n, the
magnitude-gradient partial sums) must be computed by kernels inside the graph, and
nothing may be read back to the host. Each test captures forward and backward with
static inputs (PyTorch's recipe: warm up on a side stream, capture, copy new values
into the static tensors, replay) and compares every replay with eager calls on the
same values, and with the float64 reference.

The last test captures in a fresh process where no dora_ext op has run yet: the
launcher then loads its cubins (cuModuleLoadData) inside the capture.
"""
from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch

import dora_ext
from reference import (BATCH_GRAD_TOL, FWD_TOL, SAME_NORM_TOL, SAME_TOL, make_inputs, ref_compose_delta,
                       ref_dora_linear, rel_err)
from fresh_process import run_python

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

# Tolerances (tests/reference.py): replay against eager, the same kernels on the same values: SAME_TOL;
# against the float64 reference: FWD_TOL, and BATCH_GRAD_TOL (every case has 33 or 34 tokens).
DTYPES = [torch.bfloat16, torch.float32]
TRAIN = ("x", "bias", "lora_A", "lora_B", "magnitude")
REPLAYS = 3


@pytest.fixture(autouse=True)
def _fused(monkeypatch):
    # Force the fused tier whatever the crossover says for these small shapes.
    dora_ext.set_options(tier="fused")


def _refill(static: dict, seed: int, dtype: torch.dtype, d_in: int, d_out: int, r: int, batch) -> dict:
    """Copies fresh values into the static tensors in place; returns the new values."""
    fresh = make_inputs(d_in, d_out, r, batch, dtype, device="cuda", mag_dtype=torch.float32, seed=seed)
    with torch.no_grad():
        for k, t in static.items():
            if k in fresh and isinstance(t, torch.Tensor):
                t.copy_(fresh[k])
    return fresh


def _eager_linear(values: dict, gy: torch.Tensor) -> tuple[torch.Tensor, dict]:
    leaves = {k: values[k].detach().clone().requires_grad_(k in TRAIN) for k in values if k != "scale"}
    y = dora_ext.dora_linear(leaves["x"], leaves["weight"], leaves["bias"], leaves["lora_A"], leaves["lora_B"],
                             leaves["magnitude"], values["scale"])
    y.backward(gy)
    return y.detach(), {k: leaves[k].grad for k in TRAIN}


# The saved_activation options: inside a capture the output mode recomputes z (finding the columns the
# output cannot give would read device data on the host), so its replays are compared with eager calls
# that recompute too (the same computation); the other modes with eager calls of their own mode.
CAPTURED_AS = {"output": "recompute", "z": "z", "recompute": "recompute"}


@pytest.mark.parametrize("saved_activation", list(CAPTURED_AS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(64, 96, 8, (33,)), (37, 257, 3, (2, 17))], ids=["a16", "odd"])
def test_dora_linear_forward_backward_replay(dtype, shape, saved_activation):
    dora_ext.set_options(saved_activation=saved_activation)
    d_in, d_out, r, batch = shape
    static = make_inputs(d_in, d_out, r, batch, dtype, device="cuda", mag_dtype=torch.float32, seed=1)
    s = static["scale"]
    for k in TRAIN:
        static[k].requires_grad_(True)
    static_gy = torch.randn(*batch, d_out, device="cuda", dtype=dtype)

    def step() -> torch.Tensor:
        y = dora_ext.dora_linear(static["x"], static["weight"], static["bias"], static["lora_A"], static["lora_B"],
                                 static["magnitude"], s)
        y.backward(static_gy)
        return y

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            for k in TRAIN:
                static[k].grad = None
            step()
    torch.cuda.current_stream().wait_stream(side)
    assert dora_ext.last_tier()[0] == "fused_training", dora_ext.last_tier()

    # Gradients are created inside the capture (grad = None first), so replays overwrite them.
    for k in TRAIN:
        static[k].grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = step()
    static_grads = {k: static[k].grad for k in TRAIN}

    previous = None
    for i in range(REPLAYS):
        values = _refill(static, 100 + i, dtype, d_in, d_out, r, batch)
        with torch.no_grad():
            static_gy.copy_(torch.randn_like(static_gy))
        graph.replay()
        torch.cuda.synchronize()
        with dora_ext.options(saved_activation=CAPTURED_AS[saved_activation]):
            y_eager, grads_eager = _eager_linear(values, static_gy.clone())
        torch.testing.assert_close(static_y, y_eager, **SAME_TOL[dtype])
        for k in TRAIN:
            torch.testing.assert_close(static_grads[k], grads_eager[k], **SAME_TOL[dtype], msg=f"grad_{k}")
        # And against float64, so "same as eager" cannot hide a shared mistake.
        ref_leaves = {k: values[k].detach().double().cpu().requires_grad_(k in TRAIN)
                      for k in values if k != "scale"}
        ref = ref_dora_linear(ref_leaves["x"], ref_leaves["weight"], ref_leaves["bias"], ref_leaves["lora_A"],
                              ref_leaves["lora_B"], ref_leaves["magnitude"], s)
        ref.backward(static_gy.double().cpu())
        assert rel_err(static_y, ref) < FWD_TOL[dtype]
        for k in TRAIN:
            assert rel_err(static_grads[k], ref_leaves[k].grad) < BATCH_GRAD_TOL[dtype], k
        # New inputs gave new outputs: the replay recomputed, it did not return stale values.
        if previous is not None:
            assert not torch.equal(previous, static_y)
        previous = static_y.clone()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dora_linear_inference_replay(dtype):
    d_in, d_out, r, batch = 48, 80, 5, (7, 6)
    static = make_inputs(d_in, d_out, r, batch, dtype, device="cuda", mag_dtype=torch.float32, seed=2)
    args = lambda: (static["x"], static["weight"], static["bias"], static["lora_A"], static["lora_B"],  # noqa: E731
                    static["magnitude"], static["scale"])
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.no_grad():
        for _ in range(3):
            dora_ext.dora_linear(*args())
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        static_y = dora_ext.dora_linear(*args())
    assert dora_ext.last_tier()[0] == "fused_inference", dora_ext.last_tier()
    for i in range(REPLAYS):
        values = _refill(static, 200 + i, dtype, d_in, d_out, r, batch)
        graph.replay()
        with torch.no_grad():
            eager = dora_ext.dora_linear(*(values[k] for k in ("x", "weight", "bias", "lora_A", "lora_B",
                                                                 "magnitude", "scale")))
        torch.testing.assert_close(static_y, eager, **SAME_TOL[dtype])
        ref = ref_dora_linear(values["x"], values["weight"], values["bias"], values["lora_A"], values["lora_B"],
                              values["magnitude"], values["scale"])
        assert rel_err(static_y, ref) < FWD_TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_compose_delta_forward_backward_replay(dtype):
    """row_norm + compose_delta (the PEFT-style split) captured forward and backward."""
    d_in, d_out, r, batch = 64, 300, 8, (40,)
    static = make_inputs(d_in, d_out, r, batch, dtype, device="cuda", mag_dtype=torch.float32, seed=3,
                         g_noise=1e-3)
    gen = torch.Generator(device="cuda").manual_seed(0)
    base = torch.randn(*batch, d_out, device="cuda", dtype=dtype, generator=gen).requires_grad_(True)
    lora = (0.1 * torch.randn(*batch, d_out, device="cuda", dtype=dtype, generator=gen)).requires_grad_(True)
    m = static["magnitude"].requires_grad_(True)
    gy = torch.randn(*batch, d_out, device="cuda", dtype=dtype, generator=gen)
    leaves = (base, lora, m)

    def step():
        norm = dora_ext.row_norm(static["weight"], static["lora_A"], static["lora_B"], static["scale"])
        out = dora_ext.compose_delta(base, lora, m, norm, static["scale"])
        out.backward(gy)
        return out, norm

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            for t in leaves:
                t.grad = None
            step()
    torch.cuda.current_stream().wait_stream(side)
    for t in leaves:
        t.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out, static_norm = step()
    assert dora_ext.last_tier()[0] == "fused_inference", dora_ext.last_tier()
    grads = [t.grad for t in leaves]

    for i in range(REPLAYS):
        values = _refill(static, 300 + i, dtype, d_in, d_out, r, batch)
        with torch.no_grad():
            for t in (base, lora, gy):
                t.copy_(torch.randn_like(t))
        graph.replay()
        torch.cuda.synchronize()
        e_leaves = [t.detach().clone().requires_grad_(True) for t in leaves]
        e_norm = dora_ext.row_norm(values["weight"], values["lora_A"], values["lora_B"], values["scale"])
        e_out = dora_ext.compose_delta(*e_leaves, e_norm, values["scale"])
        e_out.backward(gy)
        torch.testing.assert_close(static_norm, e_norm, **SAME_NORM_TOL)
        torch.testing.assert_close(static_out, e_out, **SAME_TOL[dtype])
        for got, want in zip(grads, (t.grad for t in e_leaves)):
            torch.testing.assert_close(got, want, **SAME_TOL[dtype])
        ref = ref_compose_delta(base, lora, m, static_norm, values["scale"])
        assert rel_err(static_out, ref) < FWD_TOL[dtype]


# ---------------------------------------------------------------------------
# A whole training step of a PEFT model in one graph


@pytest.mark.parametrize("adapter_dtype", ["fp32", "bf16"])
def test_whole_training_step_of_accelerated_peft_model_replays(adapter_dtype):
    """Forward, loss, backward and a capturable AdamW step of an accelerated PEFT DoRA model (bf16 base)
    captured as one CUDA graph. Every replay must compute the norms inside the graph from the weights
    the previous replay's optimizer step wrote (the norm cache is bypassed while capturing; a norm kept
    from the capture would go stale at once): an eager twin of the model, the same steps on the same
    data, must agree after every step."""
    import copy

    peft = pytest.importorskip("peft")
    import dora_ext.peft as dp
    from reference import perturb_adapters

    torch.manual_seed(0)
    dims = (64, 96, 80, 64)
    layers = []
    for d_in, d_out in zip(dims, dims[1:]):
        layers += [torch.nn.Linear(d_in, d_out), torch.nn.GELU()]
    base = torch.nn.Sequential(*layers[:-1]).to("cuda", torch.bfloat16)
    config = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["0", "2", "4"], use_dora=True)
    model = peft.get_peft_model(base, config, autocast_adapter_dtype=adapter_dtype == "fp32")
    perturb_adapters(model, seed=4)
    assert dp.accelerate(model) == 3
    params = [q for q in model.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2, capturable=True)
    x = torch.randn(48, dims[0], device="cuda", dtype=torch.bfloat16)
    target = torch.randn(48, dims[-1], device="cuda")

    def step(net, optimizer) -> torch.Tensor:
        loss = (net(x).float() - target).pow(2).mean()
        loss.backward()
        optimizer.step()
        return loss

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            opt.zero_grad(set_to_none=True)
            step(model, opt)
    torch.cuda.current_stream().wait_stream(side)
    assert dora_ext.last_tier()[0] == "fused_training", dora_ext.last_tier()
    twin = copy.deepcopy(model)
    twin_opt = torch.optim.AdamW([q for q in twin.parameters() if q.requires_grad], lr=1e-2, capturable=True)
    twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # (loading shares the moment tensors)

    opt.zero_grad(set_to_none=True)  # gradients made inside the capture: replays overwrite them
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = step(model, opt)

    # Tolerances: the loss (same weights, same data) to 1e-3; a parameter to 5% of one Adam step (lr) in
    # absolute terms: the replay's and the twin's bf16 GEMMs may round differently (cuBLAS picks its own
    # kernels inside a capture), and Adam turns a gradient difference into an update difference of the
    # order of lr times the relative difference. A norm left stale by one step changes the output
    # by about the relative change of the norm in one step: asserted below to exceed 1e-2, ten times the
    # loss tolerance, so the loss check would see it.
    lr = opt.param_groups[0]["lr"]
    start = [q.detach().clone() for q in params]
    routed = [m for m in model.modules() if dp.is_accelerated(m)]

    def norms() -> list[torch.Tensor]:
        return [dora_ext.row_norm(m.base_layer.weight, m.lora_A["default"].weight.detach().to(torch.bfloat16),
                                  m.lora_B["default"].weight.detach().to(torch.bfloat16), m.scaling["default"])
                for m in routed]

    for i in range(4):
        before = norms()
        with torch.no_grad():
            x.copy_(torch.randn_like(x))
            target.copy_(torch.randn_like(target))
        graph.replay()
        twin_opt.zero_grad(set_to_none=True)
        with dora_ext.options(saved_activation=CAPTURED_AS[dora_ext.get_options()["saved_activation"]]):
            twin_loss = step(twin, twin_opt)
        torch.cuda.synchronize()
        torch.testing.assert_close(static_loss, twin_loss, rtol=1e-3, atol=0, msg=f"loss, step {i}")
        for (name, got), want in zip(((n, q) for n, q in model.named_parameters() if q.requires_grad),
                                     (q for q in twin.parameters() if q.requires_grad)):
            torch.testing.assert_close(got, want, rtol=1e-3, atol=0.05 * lr, msg=f"{name}, step {i}")
        change = max(float(((n1 - n0).abs() / n0).max()) for n0, n1 in zip(before, norms()))
        assert change > 1e-2, change
    # The steps moved every adapter tensor (a replay that skipped the step would pass the checks above
    # only if the eager twin did not move either).
    assert all(not torch.equal(q0, q) for q0, q in zip(start, params))
    assert not dp.fallback_counts(model)


# ---------------------------------------------------------------------------
# First call inside a capture, in a fresh process

_COLD_CAPTURE = textwrap.dedent("""
    import json, os, sys, torch
    import dora_ext
    sys.path.insert(0, sys.argv[2])  # tests/
    from reference import rel_err
    dtype = torch.bfloat16
    d_in, d_out, r, T = 64, 256, 8, 32
    dev = "cuda"
    x = torch.randn(T, d_in, device=dev, dtype=dtype, requires_grad=True)
    W = torch.randn(d_out, d_in, device=dev, dtype=dtype) * d_in ** -0.5
    A = (torch.randn(r, d_in, device=dev, dtype=dtype) * d_in ** -0.5).requires_grad_(True)
    B = (0.3 * torch.randn(d_out, r, device=dev, dtype=dtype)).requires_grad_(True)
    m = torch.rand(d_out, device=dev).add_(0.5).requires_grad_(True)
    b = torch.randn(d_out, device=dev, dtype=dtype).requires_grad_(True)
    gy = torch.randn(T, d_out, device=dev, dtype=dtype)
    base = torch.randn(T, d_out, device=dev, dtype=dtype)
    mode = sys.argv[1]
    # Warm up on a side stream what the capture must not be the first to do.
    #   loader: the same ops through the eager tier (cuBLAS / cuBLASLt handles, the same
    #           GEMMs): only the fused launcher (kernel lookup, cubin load) is cold;
    #   process: plain PyTorch ops only: no dora_ext op has run before the capture.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            if mode == "loader":
                dora_ext.set_options(tier="eager")
                y = dora_ext.dora_linear(x, W, b, A, B, m, 0.5); y.backward(gy)
                n = dora_ext.row_norm(W, A.detach(), B.detach(), 0.5)
                dora_ext.compose_delta(base, y.detach(), m.detach(), n, 0.5)
                dora_ext.set_options(tier="fused")
            else:
                h = x @ A.t(); z = torch.addmm(x @ W.t(), h, B.t(), alpha=0.5)
                (z * m.to(dtype) + b).backward(gy)
                for a_, b_ in ((W, A), (A, A)):
                    try:  # the 16-bit GEMM with an fp32 result that the norm uses
                        torch.mm(a_, b_.t(), out_dtype=torch.float32)
                    except TypeError:
                        torch.mm(a_.float(), b_.float().t())
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    for t in (x, A, B, m, b):
        t.grad = None
    if mode == "process":
        assert dora_ext.last_tier() == ("eager", "no DoRA op has run on this thread"), dora_ext.last_tier()
    graph = torch.cuda.CUDAGraph()
    err = None
    try:
        with torch.cuda.graph(graph):
            y = dora_ext.dora_linear(x, W, b, A, B, m, 0.5)
            y.backward(gy)
            n = dora_ext.row_norm(W, A.detach(), B.detach(), 0.5)
            d = dora_ext.compose_delta(base, y.detach(), m.detach(), n, 0.5)
    except Exception as e:
        err = f"{type(e).__name__}: {e}"
    out = {"error": err, "tier": dora_ext.last_tier()[0]}
    if err is None:
        with torch.no_grad():
            x.copy_(torch.randn_like(x)); gy.copy_(torch.randn_like(gy))
        graph.replay(); torch.cuda.synchronize()
        x2, A2, B2, m2, b2 = (t.detach().clone().requires_grad_(True) for t in (x, A, B, m, b))
        y2 = dora_ext.dora_linear(x2, W, b2, A2, B2, m2, 0.5); y2.backward(gy)
        n2 = dora_ext.row_norm(W, A2.detach(), B2.detach(), 0.5)
        d2 = dora_ext.compose_delta(base, y2.detach(), m2.detach(), n2, 0.5)
        out["rel_diff"] = {"y": rel_err(y, y2), "grad_x": rel_err(x.grad, x2.grad),
                           "grad_A": rel_err(A.grad, A2.grad), "grad_B": rel_err(B.grad, B2.grad),
                           "grad_m": rel_err(m.grad, m2.grad), "grad_bias": rel_err(b.grad, b2.grad),
                           "delta": rel_err(d, d2)}
    print(json.dumps(out))
""")


@pytest.mark.parametrize("mode", ["loader", "process"])
def test_first_call_inside_capture_in_fresh_process(mode):
    """The launcher's first cubin load happens while the stream is being captured (CUDA
    forbids module loads in a global-mode capture unless the loader steps out of it),
    and the graph must still replay correctly. ``loader``: only the fused launcher is
    cold; ``process``: no dora_ext op has run in the process before the capture."""
    proc = run_python(["-c", _COLD_CAPTURE, mode, str(Path(__file__).resolve().parent)], timeout=300,
                      DORA_EXT_TIER="fused")
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print("cold capture:", result)
    assert result["error"] is None, result["error"]
    assert result["tier"] == "fused_inference"  # compose_delta ran last, fused
    for k, v in result["rel_diff"].items():  # replay against eager, bf16: SAME_TOL's rtol, norm-wise
        assert v < SAME_TOL[torch.bfloat16]["rtol"], (k, v)
