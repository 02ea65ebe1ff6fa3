"""Property tests: every op, on every available path, against the float64 reference.

Hypothesis draws the cases: shapes (primes, 1, sizes around the 16 x 256 tile of the
elementwise kernels, empty batches, 1-D to 3-D activations), layouts (transposed,
strided with NaN in the skipped elements, broadcast rows), dtypes, scales (negative,
0) and magnitudes near (g ~ 1) and far from the row norm. Each case runs

    row_norm, dora_linear forward + backward, compose_delta forward + backward

on one path (``cpu-eager``; ``cuda-eager`` and ``cuda-fused`` where a GPU is, chosen
with the tier option, set per call) and is compared with
tests/reference.py in float64.

Tolerance. DESIGN.md section 6 bounds the relative error ||out - ref|| / ||ref||. With
random shapes down to one element that ratio is ill-posed where the result is a
cancellation of larger rounded terms (two bf16 GEMM outputs of opposite sign, a
magnitude gradient summed over two tokens of opposite sign): the op's error is set by
the rounded terms, not by their small sum. So every check is

    ||out - ref|| <= tol * max(||ref||, ||S||)

where S (float64, per element) is the size of what the computation rounds: |each
GEMM output| and, for a 16-bit intermediate fed into a further product, the
root-sum-square that its rounding reaches the output with. For a well-conditioned
case ||S|| is about ||ref|| and this is the DESIGN rule; hypothesis ``event``s count
the ill-conditioned cases (``pytest --hypothesis-show-statistics``). The row norm is
checked against the dense float64 norm the same way (its factored form loses digits
where a row of W + s B A nearly cancels); dora_linear is then compared with the dense
float64 layer evaluated with that checked norm, so that each digit lost is charged to
the op that loses it.

NaN / Inf: one non-finite element in any input shows in exactly the output elements
where it shows in the reference (for the gradients: at least there; see below).

Mutations this file was seen to catch (run by hand): magnitude rounded to bf16, a 1%
error in grad_lora_A, a kernel reading a strided x as contiguous (NaN poison), the
cancelling delta g * (base + s lora) - base.

Profiles (DORA_EXT_PROPERTY_PROFILE): ``ci`` (default) is derandomized: the same
examples every run, so a CI failure reproduces with the same command on any machine,
and a fixed, measured run time (2 cores: well under a minute for the CPU tests);
``explore`` draws new examples each run (many more of them) for local and GPU runs
hunting for new failures; ``sanitize`` is a handful of examples for compute-sanitizer.
"""
from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import pytest
import torch
from hypothesis import HealthCheck, Phase, assume, event, given, note, settings
from hypothesis import strategies as st

import dora_ext
from reference import FWD_TOL, GRAD_TOL, NORM_TOL, as_ref, ref_compose_delta, ref_dora_linear, ref_row_norm

# ---------------------------------------------------------------------------
# Profiles

_COMMON = dict(
    deadline=None,  # first calls load kernels and warm caches: wall time is not the property
    # No "explain" phase: it re-runs a failing example hundreds of times for a line report.
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink],
    print_blob=True,
    # The conftest's autouse fixture only resets the tier once per test; the tier
    # is set per example below, so sharing it across examples is intended.
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("ci", max_examples=30, derandomize=True, database=None, **_COMMON)
settings.register_profile("explore", max_examples=400, derandomize=False, **_COMMON)
settings.register_profile("sanitize", max_examples=6, derandomize=True, database=None, **_COMMON)
PROFILE = settings.get_profile(os.environ.get("DORA_EXT_PROPERTY_PROFILE", "ci"))

# ---------------------------------------------------------------------------
# Paths and tolerances

_CUDA = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
ALL_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class ExecPath:
    device: str
    tier: str  # the tier option for the call

    @property
    def dtypes(self) -> tuple[torch.dtype, ...]:
        return ALL_DTYPES[:3] if self.tier == "fused" else ALL_DTYPES  # no fused float64 kernels


PATHS = [
    pytest.param(ExecPath("cpu", "eager"), id="cpu-eager"),
    pytest.param(ExecPath("cuda", "eager"), id="cuda-eager", marks=_CUDA),
    pytest.param(ExecPath("cuda", "fused"), id="cuda-fused", marks=_CUDA),
]



@contextlib.contextmanager
def on_path(path: ExecPath) -> Iterator[None]:
    """Runs the body on ``path``: its tier forced and, on CUDA, the caching allocator's
    free memory filled with NaN first, so that an output element a kernel forgets to
    write shows as NaN (assert_close rejects non-finite values for finite inputs)."""
    if path.device == "cuda":
        junk = torch.full((16 << 20,), float("nan"), device="cuda")
        del junk
    with dora_ext.overrides(tier=path.tier):
        yield


def _expect_tier(path: ExecPath, training: bool) -> None:
    tier = dora_ext.last_tier()[0]
    if path.tier == "fused":
        assert tier == ("fused_training" if training else "fused_inference"), dora_ext.last_tier()
    else:
        assert tier == "eager", dora_ext.last_tier()


# ---------------------------------------------------------------------------
# Layouts: a leaf tensor and the view of it that the op receives


View = Callable[[torch.Tensor], torch.Tensor]
LAYOUTS_2D = ("contiguous", "transposed", "cols", "rows", "broadcast")
LAYOUTS_1D = ("contiguous", "strided")


def make_leaf(kind: str, values: torch.Tensor, dtype: torch.dtype, device: str) -> tuple[torch.Tensor, View]:
    """``(leaf, view)`` with ``view(leaf)`` of ``values``' shape and entries (rounded to dtype).

    transposed: column-major storage; cols / rows / strided: every other column / row /
    element of a buffer whose skipped elements are NaN (reading one poisons the
    result); broadcast: one row expanded over the second-to-last dimension (stride 0;
    the entries become that row's). Layouts that need more dimensions than ``values``
    has fall back to contiguous.
    """
    v = values.to(dtype)
    shape = tuple(values.shape)
    nd = len(shape)
    if kind == "transposed" and nd >= 2:
        return v.transpose(-1, -2).contiguous().to(device), lambda t: t.transpose(-1, -2)
    if kind in ("cols", "strided") and nd >= 1:
        buf = torch.full((*shape[:-1], 2 * shape[-1]), float("nan"), dtype=dtype)
        buf[..., ::2] = v
        return buf.to(device), lambda t: t[..., ::2]
    if kind == "rows" and nd >= 2:
        buf = torch.full((*shape[:-2], 2 * shape[-2], shape[-1]), float("nan"), dtype=dtype)
        buf[..., ::2, :] = v
        return buf.to(device), lambda t: t[..., ::2, :]
    if kind == "broadcast" and nd >= 2 and shape[-2] > 0:
        return v[..., :1, :].contiguous().to(device), lambda t: t.expand(shape)
    return v.contiguous().to(device), lambda t: t


@dataclass
class Arg:
    """One op argument: its leaf (gets the gradient), its view and a float64 CPU copy."""

    leaf: torch.Tensor
    view: View

    @property
    def value(self) -> torch.Tensor:
        return self.view(self.leaf)

    def ref(self, grad: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """``(leaf64, view(leaf64))``: the same view of a float64 CPU copy of the leaf."""
        leaf64 = self.leaf.detach().to("cpu", torch.float64).requires_grad_(grad)
        return leaf64, self.view(leaf64)


# ---------------------------------------------------------------------------
# Strategies

# Sizes: 1, primes, and both sides of the kernels' 16-row / 256-column tiles.
D_OUT = st.sampled_from([1, 2, 3, 5, 7, 13, 16, 17, 31, 97, 255, 256, 257])
D_IN = st.sampled_from([1, 2, 3, 5, 7, 16, 17, 31, 64, 97, 131])
RANK = st.sampled_from([1, 2, 3, 5, 8, 17])
# Activations [*batch, d_in]: 1-D to 3-D, empty batches, at most 300 tokens (CPU time).
BATCH = st.lists(st.sampled_from([0, 1, 2, 3, 5, 15, 16, 17, 33]), min_size=0, max_size=2).map(tuple).filter(
    lambda b: math.prod(b) <= 300)
# Scales: 0, negative, and floats in [-4, 4] but not in (-1/64, 1/64) \ {0}: a tiny scale only
# tests 16-bit underflow (s * grad below fp16's smallest subnormal), not the op.
SCALE = st.one_of(st.sampled_from([0.0, 1.0, -1.0, 2.0, -0.5]),
                  st.floats(-4.0, 4.0, allow_nan=False, width=32).filter(lambda v: abs(v) >= 1 / 64))
# g = m / n: within 1e-4 of 1 (where trained magnitudes sit), or anywhere in [1/20, 20], either sign.
MAGNITUDE = st.sampled_from(["near", "far", "far_signed"])
LORA_STD = st.sampled_from([0.01, 0.3, 3.0])  # LoRA term from negligible to dominant
SEED = st.integers(0, 2**31 - 1)


@dataclass
class Case:
    dtype: torch.dtype
    device: str
    x: Arg
    weight: Arg
    bias: Optional[Arg]
    lora_A: Arg
    lora_B: Arg
    magnitude: Arg
    scale: float

    def trainable(self) -> dict[str, Arg]:
        out = {"x": self.x, "lora_A": self.lora_A, "lora_B": self.lora_B, "magnitude": self.magnitude}
        if self.bias is not None:
            out["bias"] = self.bias
        return out


def _g_factor(kind: str, d_out: int, gen: torch.Generator) -> torch.Tensor:
    if kind == "near":
        return 1.0 + 1e-4 * torch.randn(d_out, generator=gen, dtype=torch.float64)
    g = torch.exp(torch.empty(d_out, dtype=torch.float64).uniform_(-3.0, 3.0, generator=gen))
    if kind == "far_signed":
        g = g * torch.where(torch.rand(d_out, generator=gen, dtype=torch.float64) < 0.5, -1.0, 1.0)
    return g


@st.composite
def cases(draw, path: ExecPath) -> Case:
    """A random DoRA case for ``path``: float64 masters rounded to the drawn dtype."""
    dtype = draw(st.sampled_from(path.dtypes))
    d_in, d_out, r, batch = draw(D_IN), draw(D_OUT), draw(RANK), draw(BATCH)
    scale = float(draw(SCALE))
    gen = torch.Generator().manual_seed(draw(SEED))

    def rnd(*shape: int, std: float = 1.0) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64) * std

    leaf = lambda kind, v: Arg(*make_leaf(kind, v, dtype, path.device))  # noqa: E731
    p_layout = st.sampled_from(LAYOUTS_2D[:2])  # parameters: contiguous or transposed
    W = leaf(draw(p_layout), rnd(d_out, d_in, std=d_in**-0.5))
    A = leaf(draw(p_layout), rnd(r, d_in, std=d_in**-0.5))
    B = leaf(draw(p_layout), rnd(d_out, r, std=draw(LORA_STD)))
    x = leaf(draw(st.sampled_from(LAYOUTS_2D)), rnd(*batch, d_in))
    bias = leaf(draw(st.sampled_from(LAYOUTS_1D)), rnd(d_out, std=0.5)) if draw(st.booleans()) else None
    # The magnitude from the norm of the rounded weights, so "near" really is g ~ 1.
    n = ref_row_norm(W.value, A.value, B.value, scale)
    mag_dtype = draw(st.sampled_from([dtype, torch.float32]))  # PEFT keeps it fp32 under mixed precision
    m_kind = draw(MAGNITUDE)
    m = Arg(*make_leaf(draw(st.sampled_from(LAYOUTS_1D)), n * _g_factor(m_kind, d_out, gen), mag_dtype, path.device))
    note(f"dtype={dtype} d_in={d_in} d_out={d_out} r={r} batch={batch} scale={scale} g={m_kind} "
         f"mag_dtype={mag_dtype} x_strides={tuple(x.value.stride())} bias={bias is not None}")
    return Case(dtype, path.device, x, W, bias, A, B, m, scale)


# ---------------------------------------------------------------------------
# Comparison with the size of the rounded terms


def _rss(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sqrt((a*a) @ (b*b)): how large the rounding errors of ``a`` get through ``a @ b``."""
    return ((a * a) @ (b * b)).sqrt()


def assert_close(name: str, got: torch.Tensor, ref: torch.Tensor, terms: torch.Tensor, tol: float) -> None:
    """``||got - ref|| <= tol * max(||ref||, ||terms||)``, all float64 (module docstring)."""
    assert got.shape == ref.shape, f"{name}: shape {tuple(got.shape)} != reference {tuple(ref.shape)}"
    got = got.detach().to("cpu", torch.float64)
    ref = ref.detach()
    assert torch.isfinite(got).all(), f"{name}: non-finite values for finite inputs"
    err, ref_norm, terms_norm = (got - ref).norm().item(), ref.norm().item(), terms.norm().item()
    if terms_norm > 4 * ref_norm:
        event(f"{name}: ill-conditioned (rounded terms > 4x result)")
    bound = tol * max(ref_norm, terms_norm)
    assert err <= bound, (f"{name}: error {err:.3g} > {bound:.3g} (tol {tol:g}, ||ref|| {ref_norm:.3g}, "
                          f"||terms|| {terms_norm:.3g}, relative {err / max(ref_norm, 1e-300):.3g})")


def assume_representable(dtype: torch.dtype, *refs: Optional[torch.Tensor]) -> None:
    """Drops examples whose exact result overflows ``dtype`` (fp16 saturates at 65504: a
    big magnitude times a gradient summed over a thousand tokens gets there). That is
    the dtype's limit, not the op's; hypothesis fails the test if it has to drop many."""
    limit = torch.finfo(dtype).max / 16
    for r in refs:
        if r is not None and r.numel():
            assume(bool(r.detach().abs().max() < limit))


def _cotangent(shape: tuple[int, ...], kind: str, dtype: torch.dtype, device: str, gen: torch.Generator
               ) -> torch.Tensor:
    """A cotangent of ``shape`` in one of the layouts backward sees in practice."""
    if kind == "broadcast_rows" and len(shape) >= 2:  # e.g. from (y * v).sum(): stride 0 over tokens
        return torch.randn(shape[-1], generator=gen, dtype=torch.float64).to(dtype).to(device).expand(shape)
    if kind == "scalar":  # from y.sum(): one element expanded everywhere
        return torch.randn((), generator=gen, dtype=torch.float64).to(dtype).to(device).expand(shape)
    if kind == "transposed" and len(shape) >= 2:
        t = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
        return t.transpose(-1, -2).contiguous().transpose(-1, -2).to(device)
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype).to(device)


COTANGENT = st.sampled_from(["contiguous", "broadcast_rows", "scalar", "transposed"])

# ---------------------------------------------------------------------------
# row_norm


def check_row_norm(c: Case, n: torch.Tensor) -> torch.Tensor:
    """Checks the op's norm ``n`` against the dense float64 norm; returns it as float64.

    The factored squared norm is a sum of three fp32 terms (float64 for float64
    inputs): where the adapted row nearly cancels (W_i ~ -s (B A)_i) it loses digits
    by design, so the terms' sizes over n bound the error, not n itself.
    """
    W64, A64, B64, s = as_ref(c.weight.value), as_ref(c.lora_A.value), as_ref(c.lora_B.value), c.scale
    assert n.dtype == (torch.float64 if c.dtype == torch.float64 else torch.float32)
    assert n.device.type == c.device and not n.requires_grad
    ref = ref_row_norm(W64, A64, B64, s)
    terms = ((W64 * W64).sum(1) + 2 * abs(s) * (B64 * (W64 @ A64.T)).sum(1).abs()
             + s * s * ((B64 @ A64) ** 2).sum(1)) / ref
    assert_close("row_norm", n, ref, terms, NORM_TOL[c.dtype])
    return as_ref(n)


@pytest.mark.parametrize("path", PATHS)
@PROFILE
@given(data=st.data())
def test_row_norm(path: ExecPath, data) -> None:
    c = data.draw(cases(path))
    with on_path(path):
        n = dora_ext.row_norm(c.weight.value, c.lora_A.value, c.lora_B.value, c.scale)
    check_row_norm(c, n)


# ---------------------------------------------------------------------------
# dora_linear


# dora_linear is compared with the dense float64 formula evaluated with the op's own
# norm (checked against the dense norm first, by check_row_norm): the norm is detached
# and its digits lost to cancellation are row_norm's property, not the layer's; every
# other operation of the layer is held to the tolerance.


def _norm_of_op(c: Case) -> torch.Tensor:
    """The op's row norm on the case's device, checked, as float64 (the layer computes
    the same one: row_norm and the layer's forward share one implementation)."""
    with dora_ext.overrides(tier="eager"):
        n = dora_ext.row_norm(c.weight.value, c.lora_A.value, c.lora_B.value, c.scale)
    return check_row_norm(c, n)


def _ref_linear(x64, W64, b64, A64, B64, m64, s: float, n64: torch.Tensor) -> torch.Tensor:
    """``(m / n) * (x (W + s B A)^T) + bias`` in float64 with the norm ``n64`` given (detached)."""
    y = (x64 @ (W64 + s * (B64 @ A64)).T) * (m64 / n64)
    return y + b64 if b64 is not None else y


def _linear_terms(c: Case, x64, W64, A64, B64, m64, bias64, n64) -> torch.Tensor:
    """Size of what the forward rounds: the two GEMM outputs and the 16-bit h = x A^T
    through B, times |g|, plus the bias."""
    s = c.scale
    g = (m64 / n64).abs()
    x2 = x64.reshape(-1, x64.shape[-1])
    h = x2 @ A64.T
    t = g * ((x2 @ W64.T).abs() + abs(s) * ((h @ B64.T).abs() + _rss(h, B64.T)))
    if bias64 is not None:
        t = t + bias64.abs()
    return t.reshape(*x64.shape[:-1], W64.shape[0])


def _linear_grad_terms(c: Case, x64, W64, A64, B64, m64, gy64, n64) -> dict[str, torch.Tensor]:
    """Size of what the backward rounds, per gradient (gz = gy g and gz B are 16-bit
    intermediates in the GEMM chain; z is the saved 16-bit forward output)."""
    s = abs(c.scale)
    x2 = x64.reshape(-1, x64.shape[-1])
    gy = gy64.reshape(-1, gy64.shape[-1])
    gz = gy * (m64 / n64)
    gzB = gz @ B64
    h = x2 @ A64.T
    base, lora = x2 @ W64.T, c.scale * h @ B64.T
    z = base + lora
    # z is saved rounded: its error is that of its own terms (base and lora can cancel).
    z_size = base.abs() + lora.abs() + s * _rss(h, B64.T)
    return {
        "x": ((gz @ W64).abs() + _rss(gz, W64) + s * ((gzB @ A64).abs() + _rss(gzB, A64) + _rss(gz, B64) @ A64.abs())
              ).reshape(x64.shape),
        "lora_A": s * ((gzB.T @ x2).abs() + _rss(gzB.T, x2) + _rss(gz, B64).T @ x2.abs()),
        "lora_B": s * ((gz.T @ h).abs() + _rss(gz.T, h)),
        "magnitude": (_rss(gy.T.unsqueeze(1), z_size.T.unsqueeze(2)).reshape(-1) + (gy * z).sum(0).abs()) / n64,
        "bias": gy.abs().sum(0),
    }


@pytest.mark.parametrize("path", PATHS)
@PROFILE
@given(data=st.data())
def test_dora_linear_forward_inference(path: ExecPath, data) -> None:
    c = data.draw(cases(path))
    b = c.bias.value if c.bias is not None else None
    with on_path(path), torch.no_grad():
        y = dora_ext.dora_linear(c.x.value, c.weight.value, b, c.lora_A.value, c.lora_B.value, c.magnitude.value,
                                 c.scale)
        _expect_tier(path, training=False)
    assert y.dtype == c.dtype and y.device.type == path.device
    n64 = _norm_of_op(c)
    _, x64 = c.x.ref()
    W64, A64, B64, m64 = (a.ref()[1] for a in (c.weight, c.lora_A, c.lora_B, c.magnitude))
    b64 = c.bias.ref()[1] if c.bias is not None else None
    ref = _ref_linear(x64, W64, b64, A64, B64, m64, c.scale, n64)
    assume_representable(c.dtype, ref)
    assert_close("y", y, ref, _linear_terms(c, x64, W64, A64, B64, m64, b64, n64), FWD_TOL[c.dtype])


@pytest.mark.parametrize("path", PATHS)
@PROFILE
@given(data=st.data(), cotangent=COTANGENT, seed=SEED)
def test_dora_linear_forward_backward(path: ExecPath, data, cotangent: str, seed: int) -> None:
    c = data.draw(cases(path))
    train = c.trainable()
    for a in train.values():
        a.leaf.requires_grad_(True)
    b = c.bias.value if c.bias is not None else None
    with on_path(path):
        y = dora_ext.dora_linear(c.x.value, c.weight.value, b, c.lora_A.value, c.lora_B.value, c.magnitude.value,
                                 c.scale)
        _expect_tier(path, training=True)
        gy = _cotangent(tuple(y.shape), cotangent, c.dtype, path.device, torch.Generator().manual_seed(seed))
        y.backward(gy)
    n64 = _norm_of_op(c)
    # float64 reference on the same leaves through the same views.
    refs = {k: a.ref(grad=True) for k, a in train.items()}
    _, W64 = c.weight.ref()
    b64 = refs["bias"][1] if "bias" in refs else None
    ref = _ref_linear(refs["x"][1], W64, b64, refs["lora_A"][1], refs["lora_B"][1], refs["magnitude"][1], c.scale,
                      n64)
    gy64 = as_ref(gy)
    ref.backward(gy64)
    assume_representable(c.dtype, ref, *(r[0].grad for r in refs.values()))
    v = {k: r[1].detach() for k, r in refs.items()}
    assert_close("y", y, ref, _linear_terms(c, v["x"], W64, v["lora_A"], v["lora_B"], v["magnitude"], b64, n64),
                 FWD_TOL[c.dtype])
    terms = _linear_grad_terms(c, v["x"], W64, v["lora_A"], v["lora_B"], v["magnitude"], gy64, n64)
    for k, a in train.items():
        grad = a.leaf.grad
        assert grad is not None, f"no gradient for {k}"
        assert grad.dtype == a.leaf.dtype and grad.device == a.leaf.device, k
        # Gradients land on the leaf; the terms are per element of the view, so map them
        # through the view's backward (zero on skipped / NaN elements, summed on broadcast).
        leaf64 = refs[k][0]
        view_terms = _through_view(a.view, leaf64, terms[k])
        # A gradient is returned in its leaf's dtype (an fp32 magnitude's in fp32 for float64 x).
        assert_close(f"grad_{k}", grad, leaf64.grad, view_terms, max(GRAD_TOL[c.dtype], FWD_TOL[grad.dtype]))


def _through_view(view: View, leaf64: torch.Tensor, terms: torch.Tensor) -> torch.Tensor:
    """``terms`` (shaped like the view) carried to the leaf: summed where the view
    broadcasts, zero where it skips elements (as the view's backward does)."""
    probe = torch.zeros_like(leaf64, requires_grad=True)
    (out,) = torch.autograd.grad(view(probe), probe, terms)
    return out


# ---------------------------------------------------------------------------
# compose_delta


@pytest.mark.parametrize("path", PATHS)
@PROFILE
@given(data=st.data(), cotangent=COTANGENT, seed=SEED, lora_kind=st.sampled_from(LAYOUTS_2D))
def test_compose_delta_forward_backward(path: ExecPath, data, cotangent: str, seed: int, lora_kind: str) -> None:
    c = data.draw(cases(path))
    s, dtype = c.scale, c.dtype
    with torch.no_grad(), dora_ext.overrides(tier="eager"):
        # base and lora as a caller (PEFT) computes them, rounded to dtype, in their own layouts.
        x64 = as_ref(c.x.value)
        base_v = x64 @ as_ref(c.weight.value).T
        lora_v = (x64 @ as_ref(c.lora_A.value).T) @ as_ref(c.lora_B.value).T
        norm = dora_ext.row_norm(c.weight.value, c.lora_A.value, c.lora_B.value, s)
    base = Arg(*make_leaf(data.draw(st.sampled_from(LAYOUTS_2D)), base_v, dtype, path.device))
    lora = Arg(*make_leaf(lora_kind, lora_v, dtype, path.device))
    m = c.magnitude
    for a in (base, lora, m):
        a.leaf.requires_grad_(True)
    with on_path(path):
        out = dora_ext.compose_delta(base.value, lora.value, m.value, norm, s)
        _expect_tier(path, training=False)
        assert out.dtype == dtype and out.shape == base.value.shape
        gy = _cotangent(tuple(out.shape), cotangent, dtype, path.device, torch.Generator().manual_seed(seed))
        out.backward(gy)
    refs = {k: a.ref(grad=True) for k, a in (("base", base), ("lora", lora), ("magnitude", m))}
    n64 = as_ref(norm)
    ref = ref_compose_delta(refs["base"][1], refs["lora"][1], refs["magnitude"][1], n64, s)
    gy64 = as_ref(gy)
    ref.backward(gy64)
    assume_representable(dtype, ref, *(r[0].grad for r in refs.values()))
    b64, l64, m64 = (refs[k][1].detach() for k in ("base", "lora", "magnitude"))
    g = m64 / n64
    fwd_terms = ((g - 1) * b64).abs() + (g * s * l64).abs()
    assert_close("delta", out, ref, fwd_terms, FWD_TOL[dtype])
    z = (b64 + s * l64).reshape(-1, b64.shape[-1])
    gy2 = gy64.reshape(-1, gy64.shape[-1])
    terms = {
        "base": (gy64 * (g - 1)).abs(),
        "lora": (gy64 * g * s).abs(),
        "magnitude": (_rss(gy2.T.unsqueeze(1), z.T.unsqueeze(2)).reshape(-1) + (gy2 * z).sum(0).abs()) / n64,
    }
    for k, a in (("base", base), ("lora", lora), ("magnitude", m)):
        assert a.leaf.grad is not None, f"no gradient for {k}"
        assert_close(f"grad_{k}", a.leaf.grad, refs[k][0].grad, _through_view(a.view, refs[k][0], terms[k]),
                     max(FWD_TOL[dtype], FWD_TOL[a.leaf.dtype]))


# ---------------------------------------------------------------------------
# NaN and Inf
#
# A non-finite input must show in the same output elements as in the float64 reference
# (nothing clamped or masked away, nothing spread further), and the finite elements
# must keep the values of the same call without the bad element. For gradients: a NaN
# input gives the reference's pattern exactly; an infinite weight or LoRA factor may
# reach more gradient elements than the dense reference does (the factored form meets
# inf - inf where the dense form meets a single inf), but every element non-finite in
# the reference is non-finite here too.

NONFINITE = st.sampled_from([float("nan"), float("inf"), float("-inf")])


def _inject(data, a: Arg, value: float) -> None:
    """Writes ``value`` into one element of ``a``'s view (so into its leaf)."""
    shape = tuple(a.value.shape)
    assume(math.prod(shape) > 0)
    idx = tuple(data.draw(st.integers(0, d - 1)) for d in shape)
    with torch.no_grad():
        a.view(a.leaf)[idx].fill_(value)


def _check_pattern(name: str, got: torch.Tensor, ref: torch.Tensor, exact: bool) -> None:
    bad, bad_ref = ~torch.isfinite(got.detach().cpu()), ~torch.isfinite(ref.detach())
    if exact:
        assert torch.equal(bad, bad_ref), f"{name}: non-finite at {bad.nonzero().tolist()}, " \
                                          f"reference at {bad_ref.nonzero().tolist()}"
    else:
        assert bool((bad_ref <= bad).all()), f"{name}: finite where the reference is not: " \
                                             f"{(bad_ref & ~bad).nonzero().tolist()}"


@pytest.mark.parametrize("path", PATHS)
@PROFILE
@given(data=st.data(), target=st.sampled_from(["x", "weight", "lora_A", "lora_B", "magnitude", "bias"]),
       value=NONFINITE)
def test_dora_linear_nonfinite_inputs_propagate(path: ExecPath, data, target: str, value: float) -> None:
    c = data.draw(cases(path))
    assume(target != "bias" or c.bias is not None)
    # With no tokens the parameter gradients are empty sums, 0 here; the dense reference
    # gets 0 * NaN = NaN from a NaN factor instead. Empty batches are covered above.
    assume(c.x.value.numel() > 0)
    args = lambda: (c.x.value, c.weight.value, c.bias.value if c.bias is not None else None,  # noqa: E731
                    c.lora_A.value, c.lora_B.value, c.magnitude.value, c.scale)
    train = c.trainable()
    for a in train.values():
        a.leaf.requires_grad_(True)
    with on_path(path):  # the same (training) path as below: the finite outputs must not move at all
        clean = dora_ext.dora_linear(*args()).detach()
    _inject(data, getattr(c, target), value)
    with on_path(path):
        y = dora_ext.dora_linear(*args())
        _expect_tier(path, training=True)
        gy = torch.randn(y.shape, dtype=torch.float64).to(c.dtype).to(path.device)
        y.backward(gy)
    refs = {k: a.ref(grad=True) for k, a in train.items()}
    _, W64 = c.weight.ref()
    b64 = refs["bias"][1] if "bias" in refs else None
    ref = ref_dora_linear(refs["x"][1], W64, b64, refs["lora_A"][1], refs["lora_B"][1], refs["magnitude"][1], c.scale)
    ref.backward(as_ref(gy))
    _check_pattern("y", y, ref, exact=True)
    ok = torch.isfinite(y)
    torch.testing.assert_close(y[ok], clean[ok], rtol=FWD_TOL[c.dtype], atol=FWD_TOL[c.dtype])
    for k, a in train.items():
        _check_pattern(f"grad_{k}", a.leaf.grad, refs[k][0].grad, exact=math.isnan(value))


@pytest.mark.parametrize("path", PATHS)
@PROFILE
@given(data=st.data(), target=st.sampled_from(["base", "lora", "magnitude", "norm"]), value=NONFINITE)
def test_compose_delta_nonfinite_inputs_propagate(path: ExecPath, data, target: str, value: float) -> None:
    # An infinite norm has g = m / inf = 0 (what the op returns); the reference forms g as
    # (m - n) / n + 1 for accuracy at g ~ 1, which is NaN there: no common ground to test.
    assume(not (target == "norm" and math.isinf(value)))
    c = data.draw(cases(path))
    with torch.no_grad(), dora_ext.overrides(tier="eager"):
        x = c.x.value
        base_v = torch.nn.functional.linear(x, c.weight.value)
        lora_v = torch.nn.functional.linear(torch.nn.functional.linear(x, c.lora_A.value), c.lora_B.value)
        norm = dora_ext.row_norm(c.weight.value, c.lora_A.value, c.lora_B.value, c.scale)
    args = {"base": Arg(base_v.clone(), lambda t: t), "lora": Arg(lora_v.clone(), lambda t: t),
            "magnitude": c.magnitude, "norm": Arg(norm.clone(), lambda t: t)}
    call = lambda: dora_ext.compose_delta(*(args[k].value for k in ("base", "lora", "magnitude", "norm")),  # noqa: E731
                                          c.scale)
    with on_path(path), torch.no_grad():
        clean = call()
    _inject(data, args[target], value)
    for k in ("base", "lora", "magnitude"):
        args[k].leaf.requires_grad_(True)
    with on_path(path):
        out = call()
        gy = torch.randn(out.shape, dtype=torch.float64).to(c.dtype).to(path.device)
        out.backward(gy)
    refs = {k: args[k].ref(grad=k != "norm") for k in args}
    ref = ref_compose_delta(refs["base"][1], refs["lora"][1], refs["magnitude"][1], refs["norm"][1], c.scale)
    ref.backward(as_ref(gy))
    _check_pattern("delta", out, ref, exact=True)
    ok = torch.isfinite(out)
    torch.testing.assert_close(out[ok], clean[ok], rtol=FWD_TOL[c.dtype], atol=FWD_TOL[c.dtype])
    for k in ("base", "lora", "magnitude"):
        _check_pattern(f"grad_{k}", args[k].leaf.grad, refs[k][0].grad, exact=True)
