"""float64 dense reference for dora_ext, shared by every test file (CPU and CUDA).

Everything here materialises ``W + s*B@A`` in float64 on the CPU: the slow,
obviously-correct formula of DESIGN.md section 2. The row norm is detached, as
DoRA prescribes, unless a caller asks for the attached variant explicitly (only
used to prove a test can tell the two apart).

Importable as ``from reference import ...`` (tests/conftest.py puts this
directory on sys.path) and as ``from tests.reference import ...``.
"""
from __future__ import annotations

import torch

__all__ = [
    "BATCH_GRAD_TOL",
    "FWD_TOL",
    "GRAD_TOL",
    "NORM_EPS",
    "NORM_TOL",
    "ROUNDED_ONCE_TOL",
    "SAME_NORM_TOL",
    "SAME_TOL",
    "TIERS_TOL",
    "as_ref",
    "make_inputs",
    "perturb_adapters",
    "ref_compose_delta",
    "ref_dora_linear",
    "ref_dora_linear_dropout",
    "ref_dora_linear_for",
    "ref_row_norm",
    "ref_weight",
    "rel_err",
    "tiny_llama_config",
]

# Smallest row norm (DoRA contract: a zero row is clamped here, never divides by 0). The tests' own
# constant, not the library's: the reference stays independent of the code it checks.
NORM_EPS = 1e-6

# The tolerance table of every test (relative error against this module's float64 reference):
# outputs and the delta, the norm (accumulated in fp32 whatever the inputs), and gradients, which
# chain two roundings of 16-bit intermediates where the forward has one (gz, then gz B; for a single
# token grad_A is a rank-1 outer product carrying the error of the few 16-bit sums in gz B, 1.7e-2
# seen in bf16).
FWD_TOL = {torch.float16: 1e-2, torch.bfloat16: 1e-2, torch.float32: 1e-5, torch.float64: 1e-12}
NORM_TOL = {torch.float16: 1e-4, torch.bfloat16: 1e-4, torch.float32: 1e-5, torch.float64: 1e-12}
GRAD_TOL = {**FWD_TOL, torch.float16: 3e-2, torch.bfloat16: 3e-2}
# Gradients of a batch of tokens (tens or more): grad_A and grad_B sum an outer product per token, and
# the sum averages the 16-bit roundings that make a single token's rank-1 grad_A need GRAD_TOL.
BATCH_GRAD_TOL = {**GRAD_TOL, torch.float16: 2e-2, torch.bfloat16: 2e-2}

# The same computation run twice by other machinery on the same values (a CUDA-graph replay, a
# torch.compile'd graph, against the eager call): the same kernels and shapes, so the two differ in
# rounding order at most (cuBLAS may pick another algorithm inside a capture, Inductor fuses the
# elementwise ops differently). Elementwise, for torch.testing.assert_close; bf16's rtol is about
# 4 units of its roundoff (2**-8). The row norm, fp32 whatever the inputs and clamped away from 0,
# is held relatively only.
SAME_TOL = {torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2), torch.float32: dict(rtol=1e-5, atol=1e-6)}
SAME_NORM_TOL = dict(rtol=1e-5, atol=0)

# The fused tier against the eager tier on the same inputs (relative error of the outputs): the same
# math in other kernels, fp32 accumulation in both; 16-bit outputs may differ by a rounding.
TIERS_TOL = {torch.float16: 1e-2, torch.bfloat16: 1e-2, torch.float32: 1e-6}

# One Triton kernel under the interpreter against float64 of its own inputs (g, the Gram matrix and
# the like given, not recomputed), its output rounded once to its dtype: a rounding moves a value by
# at most 2**-11 (fp16) or 2**-24 (fp32) relatively, plus the fp32 accumulation of the dot products.
ROUNDED_ONCE_TOL = {torch.float16: 1e-3, torch.float32: 1e-6}


def as_ref(t: torch.Tensor | None) -> torch.Tensor | None:
    """``t`` as float64 on the CPU; differentiable (gradients flow back to ``t``)."""
    if t is None:
        return None
    return t.to(device="cpu", dtype=torch.float64)


def ref_weight(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, s: float) -> torch.Tensor:
    """The dense adapted weight ``W + s * B @ A`` in float64 (differentiable in A and B)."""
    return as_ref(W) + s * (as_ref(B) @ as_ref(A))


def _norm_of(W_adapted: torch.Tensor) -> torch.Tensor:
    return W_adapted.norm(dim=1).clamp_min(NORM_EPS)


def ref_row_norm(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, s: float) -> torch.Tensor:
    """Row norms ``||W_i + s (B A)_i||`` in float64, detached, clamped at NORM_EPS."""
    with torch.no_grad():
        return _norm_of(ref_weight(W, A, B, s)).detach()


def ref_dora_linear(
    x: torch.Tensor,
    W: torch.Tensor,
    bias: torch.Tensor | None,
    A: torch.Tensor,
    B: torch.Tensor,
    m: torch.Tensor,
    s: float,
    *,
    attach_norm: bool = False,
    lora_x: torch.Tensor | None = None,
) -> torch.Tensor:
    """``(m / n) * (x @ (W + s B A)^T) + bias`` in float64 on the CPU, shape ``[..., d_out]``.

    Differentiable in x, A, B, m and bias; the norm ``n`` is detached (DoRA
    section 4.3) unless ``attach_norm=True`` (a different function, only for
    showing that a gradient test can fail). ``lora_x``: the low-rank path's own
    input (x after dropout, where dora_ext.nn.DoRALinear applies it):
    ``(m / n) * (x @ W^T + s (lora_x @ A^T) @ B^T)``.
    """
    Wp = ref_weight(W, A, B, s)
    n = _norm_of(Wp)
    if not attach_norm:
        n = n.detach()
    if lora_x is None:
        y = (as_ref(x) @ Wp.T) * (as_ref(m) / n)
    else:
        y = (as_ref(x) @ as_ref(W).T + s * (as_ref(lora_x) @ as_ref(A).T) @ as_ref(B).T) * (as_ref(m) / n)
    if bias is not None:
        y = y + as_ref(bias)
    return y


def ref_dora_linear_dropout(
    x: torch.Tensor,
    x_dropped: torch.Tensor,
    W: torch.Tensor,
    bias: torch.Tensor | None,
    A: torch.Tensor,
    B: torch.Tensor,
    m: torch.Tensor,
    s: float,
) -> torch.Tensor:
    """PEFT's DoRA layer in training with lora_dropout, in float64 on the CPU:
    ``x W^T + bias + (g - 1) (x_d W^T) + g s (x_d A^T) B^T``, ``g = m / n``, n detached.
    Differentiable in x, x_dropped, A, B, m and bias."""
    n = _norm_of(ref_weight(W, A, B, s)).detach()
    W64, xd = as_ref(W), as_ref(x_dropped)
    g = as_ref(m) / n
    y = as_ref(x) @ W64.T + (g - 1) * (xd @ W64.T) + g * s * ((xd @ as_ref(A).T) @ as_ref(B).T)
    if bias is not None:
        y = y + as_ref(bias)
    return y


def ref_dora_linear_for(inp: dict, **kw) -> torch.Tensor:
    """:func:`ref_dora_linear` of a :func:`make_inputs` dict (``kw``: its keyword options)."""
    return ref_dora_linear(inp["x"], inp["weight"], inp["bias"], inp["lora_A"], inp["lora_B"], inp["magnitude"],
                           inp["scale"], **kw)


def ref_compose_delta(
    base: torch.Tensor, lora: torch.Tensor, m: torch.Tensor, n: torch.Tensor, s: float
) -> torch.Tensor:
    """``(g - 1) * base + g * s * lora`` with ``g = m / n``, all float64 (norm detached).

    ``g - 1`` is formed as ``(m - n) / n``: m - n is exact when m and n are within a
    factor 2 of each other, so the reference keeps full float64 accuracy even where
    g - 1 is tiny (``m / n - 1`` would lose log10(1 / |g - 1|) digits there).
    """
    m, n = as_ref(m), as_ref(n).detach()
    g_minus_1 = (m - n) / n
    return g_minus_1 * as_ref(base) + (g_minus_1 + 1) * s * as_ref(lora)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref|| / ||ref||`` computed in float64 on the CPU (0 for two empty tensors)."""
    out = out.detach().to(device="cpu", dtype=torch.float64)
    ref = ref.detach().to(device="cpu", dtype=torch.float64)
    assert out.shape == ref.shape, f"shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    if ref.numel() == 0:
        return 0.0
    den = ref.norm().item()
    num = (out - ref).norm().item()
    if den == 0.0:
        return num
    return num / den


def make_inputs(
    d_in: int,
    d_out: int,
    r: int,
    batch_shape: tuple[int, ...] | int,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    bias: bool = True,
    requires_grad: bool = False,
    mag_dtype: torch.dtype | None = None,
    seed: int | None = None,
    *,
    g_noise: float = 0.3,
    scale: float = 0.5,
    adapter_dtype: torch.dtype | None = None,
) -> dict:
    """Fresh random DoRA inputs (never zeros), keyed by the ops' argument names.

    Returns ``dict(x, weight, bias, lora_A, lora_B, magnitude, scale)`` so that
    ``dora_ext.dora_linear(**inp)`` works. ``x`` has shape ``[*batch_shape, d_in]``.

    The magnitude is the actual row norm of the (rounded) weights times
    ``1 + g_noise * N(0, 1)``: ``g_noise=1e-4`` puts g = m/n within ~1e-4 of 1
    (where trained magnitudes concentrate), the default 0.3 puts it far from 1.
    B is non-zero on purpose (unlike LoRA's init) so the low-rank path matters.

    ``requires_grad`` marks x, lora_A, lora_B, magnitude and bias (never the
    frozen weight). ``seed=None`` draws from torch's global generator.
    ``adapter_dtype`` gives lora_A and lora_B a dtype of their own (float32
    adapters on a 16-bit x and weight: PEFT's default mix); default ``dtype``.
    """
    if isinstance(batch_shape, int):
        batch_shape = (batch_shape,)
    gen = torch.Generator(device="cpu")
    if seed is None:
        gen.manual_seed(int(torch.randint(0, 2**62, (1,)).item()))
    else:
        gen.manual_seed(seed)
    mag_dtype = mag_dtype or dtype

    def rnd(*shape: int, std: float = 1.0) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64) * std

    def cast(t: torch.Tensor, dt: torch.dtype = dtype) -> torch.Tensor:
        return t.to(device=device, dtype=dt)

    d_in_std = max(d_in, 1) ** -0.5
    W = cast(rnd(d_out, d_in, std=d_in_std))
    A = cast(rnd(r, d_in, std=d_in_std), adapter_dtype or dtype)
    B = cast(rnd(d_out, r, std=0.3), adapter_dtype or dtype)
    x = cast(rnd(*batch_shape, d_in))
    b = cast(rnd(d_out, std=0.5)) if bias else None
    # The norm of what the op will actually see (after rounding to dtype), so that
    # g is really within g_noise of 1 for low-precision inputs too.
    n = ref_row_norm(W, A, B, scale)
    m = cast(n * (1.0 + g_noise * rnd(d_out)), mag_dtype)

    out = dict(x=x, weight=W, bias=b, lora_A=A, lora_B=B, magnitude=m, scale=scale)
    if requires_grad:
        for k in ("x", "bias", "lora_A", "lora_B", "magnitude"):
            if out[k] is not None:
                out[k].requires_grad_(True)
    return out


def tiny_llama_config(**overrides):
    """The small Llama-style decoder config the model-level tests build (random weights, nothing
    downloaded): hidden 64, intermediate 128, 2 layers, 4/2 heads, vocab 128."""
    import transformers

    kwargs = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)
    return transformers.LlamaConfig(**{**kwargs, **overrides})


def perturb_adapters(model: torch.nn.Module, seed: int = 1, adapter: str | None = None) -> None:
    """Random B (N(0, 0.1)) and magnitudes times 1 + 0.1 N(0, 1), away from PEFT's init (where DoRA is
    the base model); only ``adapter``'s parameters when given."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if adapter is not None and f".{adapter}." not in name:
                continue
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
            elif "lora_magnitude_vector" in name:
                p.mul_(1 + 0.1 * torch.randn(p.shape, generator=gen).to(p.device, p.dtype))


def assert_rows_alone(model: torch.nn.Module, ids: torch.Tensor, names: list[str], tol: float = 1e-5) -> None:
    """A PEFT model's ``adapter_names=`` logits equal, row by row, that row run alone with its adapter
    set (``"__base__"``: adapters disabled). Leaves ``"default"`` active."""
    with torch.no_grad():
        mixed = model(input_ids=ids, adapter_names=names).logits
        for i, name in enumerate(names):
            if name == "__base__":
                with model.disable_adapter():
                    alone = model(input_ids=ids[i:i + 1]).logits
            else:
                model.set_adapter(name)
                alone = model(input_ids=ids[i:i + 1]).logits
            assert rel_err(mixed[i:i + 1], alone) < tol, name
    model.set_adapter("default")
