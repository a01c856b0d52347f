"""Orthogonal-residual decoupling of one weight matrix (paper Algorithm 2, DESIGN section 4): the merge drivers.

Conventions: torch layout, ``W`` is ``(out, in)``, ``y = x @ W.T``. A rotation ``P`` (``in x in``)
acts on the input side: ``W0 @ P`` (the paper's ``R W0`` with ``R = P^T`` in its ``d_in x d_out``
layout).

For expert weights ``W_i`` and the base ``W0``:

1. ``P_i = argmin_{P in SO(in)} ||T_i - W0 @ P||_F`` with target ``T_i`` (``"global"``: ``W_i``;
   ``"conflict"``: ``W0 + tau_i * mask_i``, rows of ``tau_i = W_i - W0`` whose cosine with the
   weighted-mean task vector is negative, cosine per output row, torch ``dim=1``).
   The optimum maximises ``tr(P^T M)``, ``M = W0^T T_i``. With ``M = U S V^T`` of rank ``k`` the
   optimal set is ``P = U_1 V_1^T + U_2 Z V_2^T`` (``Z`` any orthogonal map between the
   complements). We take the one **closest to the identity**: ``Z = polar(U_2^T V_2)``, i.e.
   ``P = polar(M + c (I - U_1 U_1^T)(I - V_1 V_1^T))`` for any ``c > 0``. Then ``W0`` against
   itself gives ``P = I``, and a rank-deficient layer (``out < in``: GQA k/v, ``down_proj``) gets
   no arbitrary rotation on its null space. If ``det P = -1`` the sign of ``Z``'s weakest
   direction is flipped (free when ``k < in``), else of ``M``'s weakest (Kabsch), so ``P`` is in SO(in).
2. Reduced basis: when ``2 out <= in`` the problem lives in the ``m = out + r`` dimensional span
   ``B_i = [Q0, Q_i] = F blockdiag(I, G_i)`` of the rows of ``W0`` (``Q0``) and of ``T_i``
   (``Q_i = Q0c G_i``, a QR inside the complement of ``Q0``: ``r = out``; or, where a randomized
   probe certifies that ``T_i`` adds only ``r < out`` directions, as a LoRA expert ``W0 + B A``
   does, its ``r``-column range basis, `solve`), with the frame ``F = [Q0, Q0c]`` from
   one complete QR of ``W0^T`` shared by all tasks, kept as Householder reflectors (`frame.Frame`: no
   ``in x in`` matrix, products by ``ormqr``); ``P = I + B (C - I) B^T`` with an ``m x m``
   core ``C``. Since ``W0 B_i = [R0^T, 0]`` the range side of ``M`` is the first ``out``
   coordinates and ``C = blockdiag(P_c, Z) Y^T`` (``Y`` from one complete QR of ``b_i^T``, ``P_c``
   from an ``out x out`` SVD (or certified eigh), ``Z = polar(Y[out:, out:])`` by certified Newton-Schulz, a block of
   an orthogonal matrix, or an SVD where that is not certified or the det fix is needed;
   `closest_polar.reduced_closest_polar`), kept factored. The skew
   matrices are summed in frame coordinates (``F^T Q_i F``, no ``in x in`` product per task) and
   the merged rotation is applied as ``W0 P = (W0 F) cayley(c S_F) F^T``. Tasks are processed one
   at a time, so one task's basis is alive at a time.
3. ``Q_i = (P_i - I)(P_i + I)^-1 = B Q_c B^T`` (skew); an eigenvalue of ``P_i`` within 1e-6 of -1
   (``||Q_i||_F > 1e6``) raises `NumericalError` naming the module (`cayley.inverse_cayley_lu`).
4. ``Q = (sum_i w_i ||Q_i||_F) S / ||S||_F``, ``S = sum_i w_i Q_i`` (as for OFT; ``S = 0`` gives
   ``Q = 0``); ``P = (I + Q)(I - Q)^-1``, applied as ``W0 P = 2 W0 (I - Q)^-1 - W0`` (one LU solve,
   no inverse, `cayley.cayley_apply`).
5. Residuals ``rho_i = W_i - W0 @ P_i`` merged with a Euclidean method (`registry`); the result
   is ``W0 @ P + rho_merged``. ``target=None`` skips 1-4: ``W0 + merge(tau_i)``. Task arithmetic
   never forms ``rho_i``: with ``out >= in`` `decouple_merge` hands it to the row-block path
   (`rows`: ``W0 + sum_i c_i tau_i + W0 X`` from ``in x in`` Gram matrices); in the
   reduced basis `reduced.merge_ta_reduced` sums ``c_i rho_i F`` in frame coordinates from the small
   per-task matrices and applies ``(W0 P F + sum_i c_i rho_i F) F^T`` once.

Everything is computed in float64 by default (``dtype``); results come back in that dtype. A
float32 ``dtype`` is used as given: the merges of `merge_models` and the LoRA functions choose it
per weight (`ops.precision`: float64 where float32 is not accurate enough).

Experts that bring their own rotation (OFT adapters) skip step 1 for that weight: `given`
(`BlockRotation`) holds the exact ``P_i`` and its block-diagonal ``Q_i``; such a weight always takes
the dense driver.

Modules: `paths` (`decoupling_path`: which driver a weight takes), `given` (`BlockRotation`), `targets` (``TARGETS``, the conflict mask), `solve` (`iter_procrustes`: the rotations,
reduced basis), `stats` (`DecoupleStats`, the so(in) skew sum and magnitude factor), `dense`
(`decouple_merge`, any residual method), `reduced` (task arithmetic in the reduced basis),
`rows` (task arithmetic by row blocks, `RowSource`). Their public names are re-exported here.
"""

from .dense import decouple_merge
from .given import BlockRotation
from .paths import PATHS, decoupling_path
from .residual_rows import decouple_merge_rows
from .rows import RowSource, TensorRows, decouple_merge_ta_rows, task_arithmetic_rows
from .solve import iter_procrustes, procrustes_batch, procrustes_rotation
from .stats import DecoupleStats
from .targets import TARGETS

__all__ = [
    "PATHS",
    "TARGETS",
    "BlockRotation",
    "DecoupleStats",
    "RowSource",
    "TensorRows",
    "decouple_merge",
    "decouple_merge_rows",
    "decouple_merge_ta_rows",
    "decoupling_path",
    "iter_procrustes",
    "procrustes_batch",
    "procrustes_rotation",
    "task_arithmetic_rows",
]
