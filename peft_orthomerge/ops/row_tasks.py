"""The row-block task source: what the residual methods by blocks of rows read, and what they return.

A `RowTasks` gives the rows ``[start, stop)`` of task ``i``'s vector ``tau_i`` (a task vector or a
decoupled residual ``W_i - W0 @ P_i``) of ONE tensor of shape ``(rows, ...)``, as a new tensor in the
compute dtype, the same values on every call. A method (`streamed_rows`, `streamed_rows_fisher`)
returns a `MergedRows`: ``merged(start, stop)``, the rows of the merged task vector, asked for block
by block in increasing row order (`row_blocks`), each once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Protocol

import torch

MergedRows = Callable[[int, int], torch.Tensor]


class RowTasks(Protocol):
    """The task vectors of one tensor by blocks of rows (module docstring)."""

    shape: tuple[int, ...]
    count: int
    step: int  # rows per block

    def rows(self, i: int, start: int, stop: int) -> torch.Tensor: ...

    def base_rows(self, start: int, stop: int) -> torch.Tensor:
        """The base tensor's rows (not to be modified): `streamed_rows_fisher` on the full weights."""
        ...


def row_blocks(rows: int, step: int) -> Iterator[tuple[int, int]]:
    """``(start, stop)`` of consecutive blocks of ``step`` rows covering ``rows``."""
    for start in range(0, rows, step):
        yield start, min(rows, start + step)


def row_numel(shape: Sequence[int]) -> int:
    """Entries per row (dim 0) of a tensor of ``shape``."""
    n = 1
    for size in shape[1:]:
        n *= int(size)
    return n
