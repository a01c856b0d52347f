"""Merging the OFT rotations of one module across N tasks, in so(b) or on the rotations themselves.

Inputs are the module's *canonical* skew blocks (see `peft_orthomerge.ops.skew`), one ``(r, n)``
vector tensor per task (row k = strict upper triangle of block k; ``||Q||_F = sqrt(2) ||vec||``),
and normalised task weights ``w_i`` (sum 1). A task that does not target the module contributes a
zero vector (identity rotation).

Precision: the skew-space methods work in the inputs' dtype (float32 for float32 / half-precision
inputs, float64 if any input is float64): the weighted sum of a few dozen float32 inputs is
accumulated in float32 (error a few float32 ulps, the precision the result is stored in), norms
are per-block float32 norms combined in float64. Rotation-space methods compute in float64.

Methods (family ``"rotation"`` of the method registry, `peft_orthomerge.ops.registry`):

- ``"orthomerge"`` (paper Eq. 7-8, magnitude correction): ``S = sum_i w_i Q_i``,
  ``Q = (sum_i w_i ||Q_i||_F) * S / ||S||_F``. Granularity ``"module"`` takes the norms over all
  blocks of the module (the reference code), ``"block"`` per block. ``S = 0`` (all inputs zero, or
  exact cancellation) gives ``Q = 0`` (identity), never NaN.
- ``"mean_q"``: ``Q = sum_i w_i Q_i`` (plain mean in so(b); shrinks the rotation angle).
- ``"mean_r"``: ``R = sum_i w_i Cayley(Q_i)``, the Euclidean mean of the rotations. Not orthogonal,
  so it cannot be stored as an OFT adapter (folded export only).
- ``"product_r"``: ``R = R_1 @ R_2 @ ... @ R_N`` with ``R_i = Cayley(N w_i Q_i)`` (uniform weights:
  the plain product), i.e. applying the tasks one after the other to the input
  (``x -> x @ R_1 @ R_2 ...``); back to so(b) by the inverse Cayley map.
- ``"karcher"``: the weighted Karcher mean of the rotations ``Cayley(Q_i)`` on SO(b), per block,
  back to so(b) by the inverse Cayley map.

Skew-space methods (``space="skew"``) are called ``fn(vecs, weights, *, norms, **params) -> (vec,
stats)`` with ``norms`` the inputs' per-block norms (`block_norms`, float64 ``(r,)`` each) and
``vec`` a new tensor in the inputs' dtype; their parameters (``orthomerge``: ``granularity``) are
their keyword-only arguments. Rotation-space methods (``space="rotation"``) receive exact Cayley
rotations of the canonical blocks, shape ``(r, b, b)``, and return ``(r, b, b)``. A new one is
added by decorating it, e.g. ``@register_method("name", family="rotation", space="rotation")``
(``orthogonal=False`` when the result is not a rotation).

``scale`` multiplies the merged Q (for ``mean_r``, which has no Q, only ``scale=1`` is allowed).
Statistics: input norms ``||Q_i||_F`` over the module; merged norm ``||Q||_F`` (``mean_r``:
``||R - I||_F``) and the per-block norms ``||Q_k||_F`` of the merged blocks; magnitude factor
``c`` for ``orthomerge`` (``None`` when ``S = 0``; with ``"block"`` granularity the effective
module-level ``||Q|| / ||S||``, block range in ``extra``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from ..errors import ConfigError
from .cayley import cayley, inverse_cayley
from .registry import MergeMethod, get_method, method_names, register_method
from .skew import block_norms, block_size_from_n, skew_to_vec, vec_to_skew

Granularity = Literal["module", "block"]
ZERO_RTOL = 1e-12  # ||S|| below this fraction of sum w_i ||Q_i|| counts as an exact cancellation


@dataclass
class ModuleMerge:
    """Result for one module: ``vec`` (merged canonical ``(r, n)``, in the inputs' dtype for skew
    methods, float64 otherwise) or, for non-orthogonal methods, ``rotation`` (``(r, b, b)``);
    plus statistics for `ModuleStats` and ``block_norms`` (float64 ``(r,)``: ``||Q_k||_F`` of the
    merged blocks; ``None`` without ``vec``)."""

    vec: torch.Tensor | None
    rotation: torch.Tensor | None
    input_norms: list[float]
    merged_norm: float
    magnitude_factor: float | None = None
    extra: dict[str, float] = field(default_factory=dict)
    block_norms: torch.Tensor | None = None


def _weighted_sum(vecs: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """``sum_i w_i v_i`` as a new tensor in the inputs' dtype, one pass per input with nonzero weight."""
    total = None
    for v, w in zip(vecs, weights):
        if not w:
            continue
        if total is None:
            total = torch.mul(v, w).contiguous()
        else:
            total.add_(v, alpha=w)
    return torch.zeros(vecs[0].shape, dtype=vecs[0].dtype, device=vecs[0].device) if total is None else total


def _norm(block_norms_: torch.Tensor) -> float:
    """Module norm ``sqrt(sum_k ||Q_k||^2)`` from per-block norms (float64)."""
    return float(torch.linalg.vector_norm(block_norms_))


def _module_norms(norms: Sequence[torch.Tensor] | torch.Tensor) -> list[float]:
    """`_norm` of each input's per-block norms: of a stacked ``(N, r)`` tensor in one reduction (the
    same values: each row is reduced on its own), else one per input."""
    if isinstance(norms, torch.Tensor):
        return torch.linalg.vector_norm(norms, dim=-1).tolist()
    return [_norm(n) for n in norms]


@register_method("orthomerge", family="rotation", space="skew")
def orthomerge(
    vecs: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    granularity: Granularity = "module",
    norms: Sequence[torch.Tensor] | None = None,
):
    """Magnitude-corrected merge; returns ``(vec, stats)`` with ``c`` and (block) c range."""
    norms = [block_norms(v) for v in vecs] if norms is None else norms
    s = _weighted_sum(vecs, weights)
    s_blocks = block_norms(s)
    if granularity == "module":
        target = sum(w * n for n, w in zip(_module_norms(norms), weights))
        s_norm = _norm(s_blocks)
        if s_norm <= ZERO_RTOL * target or s_norm == 0.0:
            return s.zero_(), {"c": None}
        return s.mul_(target / s_norm), {"c": target / s_norm}
    if granularity == "block":
        target = sum(w * n for n, w in zip(norms, weights))  # (r,) float64
        zero = (s_blocks <= ZERO_RTOL * target) | (s_blocks == 0)
        c = torch.where(
            zero, torch.zeros_like(s_blocks), target / torch.where(zero, torch.ones_like(s_blocks), s_blocks)
        )
        merged = s.mul_(c.to(s.dtype)[:, None])
        live = c[~zero]
        stats: dict = {"c": None}
        s_total = _norm(s_blocks)
        if s_total > 0 and not bool(zero.all()):
            stats["c"] = _norm(c * s_blocks) / s_total
            stats["c_block_min"] = float(live.min())
            stats["c_block_max"] = float(live.max())
        return merged, stats
    raise ConfigError(f"unknown granularity {granularity!r}; valid: 'module', 'block'")


@register_method("mean_q", family="rotation", space="skew")
def mean_q(vecs: Sequence[torch.Tensor], weights: Sequence[float], *, norms: Sequence[torch.Tensor] | None = None):
    """Plain weighted mean in so(b)."""
    return _weighted_sum(vecs, weights), {}


@register_method("mean_r", family="rotation", space="rotation", orthogonal=False)
def mean_r(rotations: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """Euclidean weighted mean of the rotation blocks (not orthogonal in general)."""
    return _weighted_sum(rotations, weights)


@register_method("product_r", family="rotation", space="rotation")
def product_r(rotations: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """``R_1 @ ... @ R_N``; the caller passes ``R_i = Cayley(N w_i Q_i)`` (see `merge_module`)."""
    out = rotations[0]
    for r in rotations[1:]:
        out = out @ r
    return out


@register_method("karcher", family="rotation", space="rotation")
def karcher(rotations: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """Weighted Karcher (Frechet) mean of the rotation blocks on SO(b) (`peft_orthomerge.ops.karcher`)."""
    from .karcher import karcher_mean

    return karcher_mean(torch.stack(list(rotations)), list(weights))


def so_methods() -> list[str]:
    return sorted(method_names("rotation"))


def get_so_method(name: str) -> MergeMethod:
    """The registered rotation method ``name`` (`registry.MergeMethod`: ``fn``, ``space``, ``orthogonal``)."""
    return get_method(name, "rotation", what="OFT merge")


def merge_module(
    vecs: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    method: str = "orthomerge",
    granularity: Granularity = "module",
    scale: float = 1.0,
    norms: Sequence[torch.Tensor] | None = None,
    applied: Sequence[Callable[[torch.Tensor], torch.Tensor]] | None = None,
) -> ModuleMerge:
    """Merge one module's canonical vectors ``vecs`` (each ``(r, n)``, same shape) with ``weights``.

    ``vecs`` may be one stacked ``(N, r, n)`` tensor and ``norms`` one ``(N, r)`` tensor (what
    `merge.oft.CanonicalInputs` reads): the same result, with fewer small reductions per module.

    ``norms``: the inputs' per-block norms if the caller has them (`block_norms`), else computed.
    ``applied``: for methods whose result is not a rotation (``mean_r``), per input the map from
    canonical skew blocks to the rotation that input really applies (e.g. PEFT's truncated Neumann
    series); default the exact Cayley map. Orthogonal methods always use the exact Cayley map.
    """
    spec = get_so_method(method)
    if isinstance(vecs, torch.Tensor):  # a stack (N, r, n): one dtype
        work = torch.float64 if vecs.dtype == torch.float64 else torch.float32
        vecs = vecs.to(work)
    else:
        work = torch.float64 if any(v.dtype == torch.float64 for v in vecs) else torch.float32
        vecs = [v.to(work) for v in vecs]
    if norms is None:
        norms = [block_norms(v) for v in vecs]
    elif not isinstance(norms, torch.Tensor):
        norms = list(norms)
    input_norms = _module_norms(norms)
    if spec.space == "skew":
        options = {"granularity": granularity} if "granularity" in spec.param_names() else {}
        vec, stats = spec.fn(vecs, weights, norms=norms, **options)
        if scale != 1.0:
            vec = vec.mul_(scale)
        extra = {k: v for k, v in stats.items() if k != "c"}
        merged = block_norms(vec)
        if work != torch.float64 and not math.isfinite(_norm(merged)):  # float32 sum overflowed: redo in float64
            return merge_module(
                [v.double() for v in vecs], weights, method=method, granularity=granularity, scale=scale, norms=norms
            )
        return ModuleMerge(vec, None, input_norms, _norm(merged), stats.get("c"), extra, merged)
    b = block_size_from_n(vecs[0].shape[-1])
    n = len(vecs)
    if method == "product_r":
        rotations = [cayley(vec_to_skew(v * (n * w), b)) for v, w in zip(vecs, weights)]
    elif not spec.orthogonal and applied is not None:
        rotations = [to_rotation(vec_to_skew(v, b)) for to_rotation, v in zip(applied, vecs)]
    else:
        rotations = [cayley(vec_to_skew(v, b)) for v in vecs]
    rot = spec.fn(rotations, weights)
    if not spec.orthogonal:
        if scale != 1.0:
            raise ConfigError(f"scale={scale} is not defined for method {method!r} (it has no so(b) element to scale)")
        eye = torch.eye(b, dtype=rot.dtype, device=rot.device)
        return ModuleMerge(None, rot, input_norms, float(torch.linalg.matrix_norm(rot - eye).square().sum().sqrt()))
    vec = skew_to_vec(inverse_cayley(rot)) * scale
    merged = block_norms(vec)
    return ModuleMerge(vec, None, input_norms, _norm(merged), block_norms=merged)


__all__ = [
    "ZERO_RTOL",
    "ModuleMerge",
    "get_so_method",
    "merge_module",
    "so_methods",
]
