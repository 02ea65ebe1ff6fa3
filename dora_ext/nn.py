"""``DoRALinear``: a DoRA-adapted ``nn.Linear`` backed by the dora_ext ops.

    W' = m * (W + s B A) / ||W + s B A||_row          y = x W'^T + bias

The module wraps a frozen ``nn.Linear`` and holds the trainable DoRA factors under the
names PEFT uses, so one layer's ``state_dict`` maps one-to-one onto PEFT's keys:

    DoRALinear key            PEFT model state_dict() key                    PEFT adapter file key
                                                                             (get_peft_model_state_dict)
    base_layer.weight         <path>.base_layer.weight                       (not saved)
    base_layer.bias           <path>.base_layer.bias                         (not saved)
    lora_A.weight             <path>.lora_A.<adapter>.weight                 <path>.lora_A.weight
    lora_B.weight             <path>.lora_B.<adapter>.weight                 <path>.lora_B.weight
    lora_magnitude_vector     <path>.lora_magnitude_vector.<adapter>.weight  <path>.lora_magnitude_vector

where ``<path>`` is ``base_model.model.`` + the module's path in the model. :func:`to_peft_state_dict`
and :func:`from_peft_state_dict` convert whole model state dicts between the two layouts (PEFT's
own ``set_peft_model_state_dict`` then loads the adapter-file layout into a PEFT model).

Forward (see :meth:`DoRALinear.forward`): one fused ``dora_ext.dora_linear`` call in eval mode
or without dropout; with dropout in training the dropout applies to the LoRA input only::

    base = x W^T        lora = B A dropout(x)        y = base + compose_delta(base, lora, m, n, s) + bias

(PEFT differs here: in training with dropout it also feeds ``dropout(x)`` to the ``(g - 1) W``
term. ``dora_ext.peft`` reproduces PEFT's behaviour for PEFT models; this module keeps dropout
on the LoRA input only, so the base path ``x W^T`` is never perturbed.)
"""
from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from ._cast_cache import cast_for_forward
from ._frozen import detach_if_frozen_view
from .ops import NORM_EPS, compose_delta, dora_linear, options, row_norm  # noqa: F401 (NORM_EPS: re-exported)

__all__ = [
    "DoRALinear",
    "apply_dora",
    "compute_dtype",
    "dense_row_norm",
    "from_peft_state_dict",
    "mark_only_dora_trainable",
    "merge_dora_modules",
    "to_peft_state_dict",
    "unmerge_dora_modules",
]

_DORA_SUFFIXES = ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector")


def _high_precision(dtype: torch.dtype) -> torch.dtype:
    """float64 for fp32/fp64 weights, fp32 for fp16/bf16: the dtype merges are computed in."""
    return torch.float64 if dtype in (torch.float32, torch.float64) else torch.float32


def _is_dtensor(t: torch.Tensor) -> bool:
    # no torch.distributed import on the hot path (it may be absent from a build)
    return type(t).__name__ == "DTensor"


def compute_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype a DoRA layer computes in: the autocast dtype of x's device when autocast is on
    (what ``F.linear`` would use there), else the base weight's dtype."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return weight.dtype


@torch.no_grad()
def dense_row_norm(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float,
                   dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """``||W_i + s (B A)_i||`` of the factors cast to ``dtype`` (default: float64 for fp32/fp64
    weights, fp32 otherwise), clamped at :data:`NORM_EPS`: the row_norm op (factored, accumulated in
    float64 for a float64 ``dtype``) on the casts, outside the norm cache. For merges."""
    dtype = dtype or _high_precision(weight.dtype)
    with options(norm_cache=False):  # fresh casts every call: nothing to reuse
        return row_norm(weight.to(dtype), lora_A.to(dtype), lora_B.to(dtype), scale).to(dtype)


class DoRALinear(nn.Module):
    """DoRA-adapted linear layer over a frozen ``nn.Linear``.

    Attributes:
        base_layer: the wrapped, frozen ``nn.Linear`` (weight ``[d_out, d_in]``, optional bias).
        lora_A: ``nn.Linear(d_in, r, bias=False)``, weight ``[r, d_in]`` (kaiming-uniform, as PEFT).
        lora_B: ``nn.Linear(r, d_out, bias=False)``, weight ``[d_out, r]`` (zeros, as PEFT).
        lora_magnitude_vector: ``nn.Parameter [d_out]``, initialised to the row norms of W so that
            a fresh layer computes the base layer's function (up to rounding).
        lora_dropout: ``nn.Dropout`` on the LoRA input (``nn.Identity`` when ``dropout == 0``).
        r, lora_alpha, scaling, use_rslora: the LoRA hyper-parameters; ``scaling`` is
            ``alpha / r`` or ``alpha / sqrt(r)`` with rsLoRA.
        merged: whether ``W'`` is currently merged into ``base_layer.weight``.

    dtypes: the layer computes in :func:`compute_dtype` (the autocast dtype under autocast, else the
    base weight's dtype); x, A, B and the bias are cast to it, the magnitude is used as it is (an
    fp32 magnitude keeps ``g = m / n`` in fp32) and the output has the compute dtype.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        r: int = 8,
        alpha: float = 8.0,
        *,
        bias: bool = True,
        dropout: float = 0.0,
        use_rslora: bool = False,
        device: Optional[Union[torch.device, str]] = None,
        dtype: Optional[torch.dtype] = None,
        adapter_dtype: Optional[torch.dtype] = None,
        base_layer: Optional[nn.Linear] = None,
    ) -> None:
        """A new DoRA layer. With ``base_layer=None`` a fresh ``nn.Linear(in_features, out_features,
        bias)`` is created (default ``nn.Linear`` init); see :meth:`from_linear` to wrap an existing one.

        ``adapter_dtype`` is the dtype of ``lora_A`` / ``lora_B`` (default: the base weight's);
        the magnitude is fp32 for fp16/bf16 base weights (so that ``g - 1`` resolves ~1e-7) and
        the base weight's dtype otherwise.
        """
        super().__init__()
        if r < 1:
            raise ValueError(f"DoRALinear: r must be >= 1, got {r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"DoRALinear: dropout must be in [0, 1), got {dropout}")
        if base_layer is None:
            base_layer = nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)
        elif (base_layer.in_features, base_layer.out_features) != (in_features, out_features):
            raise ValueError(
                f"DoRALinear: base_layer is {base_layer.in_features}->{base_layer.out_features}, "
                f"expected {in_features}->{out_features}")
        base_layer.requires_grad_(False)
        self.base_layer = base_layer
        self.in_features = in_features
        self.out_features = out_features
        self.r = int(r)
        self.lora_alpha = float(alpha)
        self.use_rslora = bool(use_rslora)
        self.scaling = self.lora_alpha / (math.sqrt(self.r) if use_rslora else self.r)
        self.lora_dropout: nn.Module = nn.Dropout(p=dropout) if dropout > 0.0 else nn.Identity()

        weight = base_layer.weight
        adapter_dtype = adapter_dtype or weight.dtype
        factory = {"device": weight.device, "dtype": adapter_dtype}
        self.lora_A = nn.Linear(in_features, self.r, bias=False, **factory)
        self.lora_B = nn.Linear(self.r, out_features, bias=False, **factory)
        magnitude_dtype = weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32
        self.lora_magnitude_vector = nn.Parameter(torch.empty(out_features, device=weight.device,
                                                              dtype=magnitude_dtype))
        self.merged = False
        self._merge_norm: Optional[torch.Tensor] = None
        self._original_weight: Optional[torch.Tensor] = None
        self.reset_dora_parameters()

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        use_rslora: bool = False,
        *,
        adapter_dtype: Optional[torch.dtype] = None,
    ) -> "DoRALinear":
        """Wrap ``linear`` (the same object, frozen in place) in a fresh DoRA layer that starts out
        computing exactly ``linear``'s function: A kaiming-uniform, B = 0, m = row norms of W."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"DoRALinear.from_linear needs an nn.Linear, got {type(linear).__name__}")
        return cls(linear.in_features, linear.out_features, r, alpha, bias=linear.bias is not None,
                   dropout=dropout, use_rslora=use_rslora, adapter_dtype=adapter_dtype, base_layer=linear)

    @torch.no_grad()
    def reset_dora_parameters(self) -> None:
        """PEFT's DoRA init: A ~ kaiming_uniform(a=sqrt(5)), B = 0, m = ||W||_row (computed in
        high precision). Unmerges first if merged."""
        if self.merged:
            self.unmerge()
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        weight = self.base_layer.weight
        norm = torch.linalg.vector_norm(weight.to(_high_precision(weight.dtype)), dim=1)
        self.lora_magnitude_vector.copy_(norm)

    # ------------------------------------------------------------------ properties

    @property
    def weight(self) -> torch.Tensor:
        """The base weight ``W`` (merged ``W'`` while merged)."""
        return self.base_layer.weight

    @property
    def bias(self) -> Optional[torch.Tensor]:
        return self.base_layer.bias

    @property
    def dropout_p(self) -> float:
        return float(self.lora_dropout.p) if isinstance(self.lora_dropout, nn.Dropout) else 0.0

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"alpha={self.lora_alpha}, scaling={self.scaling:g}, dropout={self.dropout_p}, "
                f"use_rslora={self.use_rslora}, merged={self.merged}")

    # ------------------------------------------------------------------ math

    def row_norm(self) -> torch.Tensor:
        """``||W + s B A||_row`` (fp32, float64 for float64 weights), detached, factored form. On a
        sharded layer (DTensor parameters, e.g. FSDP2 outside forward) this is
        :func:`dora_ext.distributed.row_norm` (a DTensor, the weight is not gathered)."""
        weight = self.base_layer.weight
        dtype = weight.dtype
        lora_A, lora_B = cast_for_forward(self.lora_A.weight, dtype), cast_for_forward(self.lora_B.weight, dtype)
        if _is_dtensor(weight):
            from .distributed import row_norm as distributed_row_norm
            return distributed_row_norm(weight, lora_A, lora_B, self.scaling)
        return row_norm(weight, lora_A, lora_B, self.scaling)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``y = (m / n) * (x W^T + s (x A^T) B^T) + bias`` in :func:`compute_dtype`.

        One ``dora_ext.dora_linear`` call, except in training with dropout > 0, where
        ``y = base + compose_delta(base, B A dropout(x), m, n, s) + bias`` with ``base = x W^T``.
        While merged, this is just the base layer.
        """
        if self.merged:
            return self.base_layer(x)
        base_layer = self.base_layer
        # FSDP1 (use_orig_params) hands forward views of frozen parameters that require grad
        weight = detach_if_frozen_view(base_layer.weight)
        bias = detach_if_frozen_view(base_layer.bias)
        dtype = compute_dtype(x, weight)
        # The ops cast nothing themselves; run them with autocast off on explicitly cast inputs so
        # their internal fp32 accumulation is not downcast.
        with torch.autocast(x.device.type, enabled=False):
            x = x.to(dtype)
            weight = weight.to(dtype)
            bias = bias.to(dtype) if bias is not None else None
            lora_A = cast_for_forward(self.lora_A.weight, dtype)
            lora_B = cast_for_forward(self.lora_B.weight, dtype)
            magnitude = self.lora_magnitude_vector
            if self.training and isinstance(self.lora_dropout, nn.Dropout) and self.lora_dropout.p > 0:
                norm = row_norm(weight, lora_A, lora_B, self.scaling)
                base = F.linear(x, weight)
                lora = F.linear(F.linear(self.lora_dropout(x), lora_A), lora_B)
                out = base + compose_delta(base, lora, magnitude, norm, self.scaling)
                return out + bias if bias is not None else out
            return dora_linear(x, weight, bias, lora_A, lora_B, magnitude, self.scaling)

    # ------------------------------------------------------------------ merging

    @torch.no_grad()
    def merged_weight(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """``W' = m * (W + s B A) / ||W + s B A||_row`` computed in float64 (fp32 for fp16/bf16
        weights) and returned in ``dtype`` (default: the base weight's dtype). Does not modify the
        layer. Raises if the layer is merged already (W is not the base weight then)."""
        if self.merged:
            raise RuntimeError("DoRALinear.merged_weight: the layer is merged; unmerge() first")
        return self._merged(self._norm_in(_high_precision(self.base_layer.weight.dtype)), dtype)

    def _norm_in(self, hp: torch.dtype) -> torch.Tensor:
        return dense_row_norm(self.base_layer.weight, self.lora_A.weight, self.lora_B.weight, self.scaling, hp)

    def _merged(self, norm: torch.Tensor, dtype: Optional[torch.dtype]) -> torch.Tensor:
        """``m * (W + s B A) / norm`` in ``norm``'s dtype, returned in ``dtype`` (default W's)."""
        weight = self.base_layer.weight
        hp = norm.dtype
        dense = weight.to(hp) + self.scaling * (self.lora_B.weight.to(hp) @ self.lora_A.weight.to(hp))
        return (dense * (self.lora_magnitude_vector.to(hp) / norm).unsqueeze(1)).to(dtype or weight.dtype)

    @torch.no_grad()
    def merge(self, keep_original: bool = False) -> None:
        """Write ``W'`` (see :meth:`merged_weight`) into ``base_layer.weight``; forward then is the
        plain linear layer. For inference: the DoRA parameters get no gradient while merged.

        ``keep_original=True`` keeps a copy of W so :meth:`unmerge` restores it bit for bit (one
        more weight in memory); otherwise unmerge inverts the merge in high precision (exact to the
        rounding of the weight dtype). No-op if already merged.
        """
        if self.merged:
            return
        weight = self.base_layer.weight
        self._merge_norm = self._norm_in(_high_precision(weight.dtype))
        self._original_weight = weight.detach().clone() if keep_original else None
        weight.copy_(self._merged(self._merge_norm, None))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo :meth:`merge`: ``W = W' * n / m - s B A`` (float64/fp32), or the kept copy. Raises
        when a magnitude entry is zero and no copy was kept (the row is not recoverable)."""
        if not self.merged:
            return
        weight = self.base_layer.weight
        if self._original_weight is not None:
            weight.copy_(self._original_weight)
        else:
            hp = _high_precision(weight.dtype)
            magnitude = self.lora_magnitude_vector.to(hp)
            if bool((magnitude == 0).any()):
                raise RuntimeError("DoRALinear.unmerge: a magnitude entry is 0, the merged row cannot be "
                                   "inverted; merge(keep_original=True) keeps W for this case")
            dense = weight.to(hp) * (self._merge_norm.to(hp) / magnitude).unsqueeze(1)
            dense -= self.scaling * (self.lora_B.weight.to(hp) @ self.lora_A.weight.to(hp))
            weight.copy_(dense)
        self._merge_norm = None
        self._original_weight = None
        self.merged = False

    def to_linear(self) -> nn.Linear:
        """A new ``nn.Linear`` holding ``W'`` and the bias (the layer itself is left as it is)."""
        weight = self.base_layer.weight
        merged = weight.detach().clone() if self.merged else self.merged_weight()
        linear = nn.Linear(self.in_features, self.out_features, bias=self.base_layer.bias is not None,
                           device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(merged)
            if linear.bias is not None:
                linear.bias.copy_(self.base_layer.bias)
        return linear


# ---------------------------------------------------------------------- model helpers


def _matches(name: str, target_modules: Union[str, Iterable[str], None]) -> bool:
    if target_modules is None or target_modules == "all-linear":
        return True
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def apply_dora(
    model: nn.Module,
    target_modules: Union[str, Iterable[str], None] = "all-linear",
    r: int = 8,
    alpha: float = 8.0,
    dropout: float = 0.0,
    use_rslora: bool = False,
    *,
    exclude_modules: Iterable[str] = (),
    adapter_dtype: Optional[torch.dtype] = None,
) -> list[str]:
    """Replace matching ``nn.Linear`` modules of ``model`` (in place) by :class:`DoRALinear` wrapping
    them. ``target_modules``: ``"all-linear"`` / ``None`` (every ``nn.Linear``), a list of names or
    name suffixes (PEFT style, e.g. ``["q_proj", "v_proj"]``), or a regex matched against the full
    module name. Modules named in ``exclude_modules`` (names or suffixes) are skipped. Returns the
    names of the replaced modules. Unlike PEFT's ``"all-linear"``, an output head is not skipped:
    exclude it with ``exclude_modules=["lm_head"]``. The wrapped Linears are frozen; other parameters
    are left as they are (see :func:`mark_only_dora_trainable`)."""
    exclude = tuple(exclude_modules)
    replaced = []
    for name, module in list(model.named_modules()):
        if type(module) is not nn.Linear or not name:
            continue
        if any(name == e or name.endswith("." + e) for e in exclude) or not _matches(name, target_modules):
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, DoRALinear.from_linear(module, r, alpha, dropout, use_rslora,
                                                      adapter_dtype=adapter_dtype))
        replaced.append(name)
    return replaced


def mark_only_dora_trainable(model: nn.Module) -> None:
    """``requires_grad=True`` for the DoRA parameters (A, B, magnitude) of every :class:`DoRALinear`,
    ``False`` for every other parameter of ``model``."""
    model.requires_grad_(False)
    for module in model.modules():
        if isinstance(module, DoRALinear):
            module.lora_A.requires_grad_(True)
            module.lora_B.requires_grad_(True)
            module.lora_magnitude_vector.requires_grad_(True)


def merge_dora_modules(model: nn.Module, keep_original: bool = False) -> int:
    """:meth:`DoRALinear.merge` on every DoRA layer of ``model``; returns how many were merged."""
    layers = [m for m in model.modules() if isinstance(m, DoRALinear) and not m.merged]
    for layer in layers:
        layer.merge(keep_original=keep_original)
    return len(layers)


def unmerge_dora_modules(model: nn.Module) -> int:
    """:meth:`DoRALinear.unmerge` on every merged DoRA layer of ``model``; returns how many."""
    layers = [m for m in model.modules() if isinstance(m, DoRALinear) and m.merged]
    for layer in layers:
        layer.unmerge()
    return len(layers)


# ---------------------------------------------------------------------- PEFT key mapping


def _owner(key: str, suffix: str) -> Optional[str]:
    """The module path owning ``key`` if it ends with ``suffix`` ("" at top level), else None."""
    if key == suffix:
        return ""
    return key[: -len(suffix) - 1] if key.endswith("." + suffix) else None


def to_peft_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    adapter_name: Optional[str] = None,
    prefix: str = "base_model.model.",
) -> dict[str, torch.Tensor]:
    """Map a state dict of a model with :class:`DoRALinear` layers onto PEFT's keys.

    ``adapter_name=None`` gives the adapter-file layout of ``get_peft_model_state_dict`` (DoRA keys
    only: ``<prefix><path>.lora_A.weight``, ``.lora_B.weight``, ``.lora_magnitude_vector``), ready for
    ``peft.set_peft_model_state_dict`` or ``save_file``. With an adapter name it gives the full
    ``PeftModel.state_dict()`` layout (``lora_A.<name>.weight``, ``lora_magnitude_vector.<name>.weight``,
    base weights under ``base_layer``, every other key prefixed unchanged).

    DoRA layers are recognised by their ``lora_magnitude_vector`` key; save unmerged layers
    (a merged layer's ``base_layer.weight`` holds W').
    """
    paths = {o for k in state_dict if (o := _owner(k, "lora_magnitude_vector")) is not None}
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        for suffix in _DORA_SUFFIXES:
            owner = _owner(key, suffix)
            if owner is not None and owner in paths:
                if adapter_name is not None:
                    leaf = f"{suffix.split('.')[0]}.{adapter_name}.weight"
                    key = f"{owner}.{leaf}" if owner else leaf
                out[prefix + key] = value
                break
        else:
            if adapter_name is not None:
                out[prefix + key] = value
    return out


def from_peft_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    adapter_name: str = "default",
    prefix: str = "base_model.model.",
) -> dict[str, torch.Tensor]:
    """The inverse of :func:`to_peft_state_dict`: accepts either PEFT layout (adapter file or full
    ``PeftModel.state_dict()``) and returns :class:`DoRALinear` keys. In the full layout only the
    adapter ``adapter_name`` is kept; keys of other adapters are dropped."""
    pattern = re.compile(r"(?:(.*)\.)?(lora_A|lora_B|lora_magnitude_vector)\.([^.]+)\.weight")
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key.startswith(prefix):
            key = key[len(prefix):]
        match = pattern.fullmatch(key)
        if match is not None:
            path, kind, name = match.groups()
            if name != adapter_name:
                continue
            key = (f"{path}." if path else "") + kind + ("" if kind == "lora_magnitude_vector" else ".weight")
        elif re.search(r"(^|\.)lora_(A|B|magnitude_vector|dropout|embedding_A|embedding_B)\.", key) and not any(
                _owner(key, suffix) is not None for suffix in _DORA_SUFFIXES):
            continue  # another adapter's or another method's entry
        out[key] = value
    return out
