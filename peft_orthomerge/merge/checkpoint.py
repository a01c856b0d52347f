"""Merging the tensors of a full-checkpoint plan, read from the files, for the checkpoint sink.

`CheckpointMerge` is the `sinks.checkpoint.TensorJobs` of `merge_models`: it runs each
`plan.checkpoint.TensorTask` by its route (``rows``: task arithmetic, or a residual method with a
row-block form, by blocks of rows straight from the files; ``tensor``: the base tensor in memory and the experts read one at a time;
``copy``: non-floating tensors from the base) and returns the tensor in its stored layout
(``Conv1D`` weights transposed back) and dtype.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..device import to_output
from ..plan.checkpoint import TensorTask
from ..plan.options import DecoupleOptions
from ..report import ModuleStats
from ..sources.checkpoint import Expert, FileRows, LazyTensors, expert_rotation
from ..sources.tensors import TensorReader
from .tensor import decoupled_stats, finite_output, merge_rows, merge_tensor


def merge_checkpoint_tensor(
    task: TensorTask,
    base: TensorReader,
    experts: Sequence[Expert],
    weights: Sequence[float],
    options: DecoupleOptions,
    device: torch.device,
) -> tuple[torch.Tensor, ModuleStats | str]:
    """Merge one planned checkpoint tensor (read from the files) into its stored layout and dtype.

    Returns the tensor to write and its report entry: `ModuleStats` for a decoupled tensor,
    ``"passthrough"`` for one merged by the Euclidean method alone, ``"copied"`` for a
    non-floating tensor taken from the base."""
    name = task.name
    if task.route == "copy":
        return base.get(name), "copied"
    if task.route == "rows":
        rows = [FileRows(r, name) for r in experts]
        out, stats = merge_rows(
            name, FileRows(base, name), rows, weights, options, decoupled=task.decoupled,
            storage=base.dtype(name), device=device,
        )  # fmt: skip
        return finite_output(out, name, base.file_of(name)), stats or "passthrough"
    w0 = base.get(name)
    # read when used (the merge converts one expert at a time), not all at once
    lazy = LazyTensors(experts, name, transpose=task.transposed)
    if task.transposed:  # the math sees the torch layout (out, in)
        w0 = w0.T
    given = [expert_rotation(e, name) for e in experts] if task.path == "dense" else None
    out, stats = merge_tensor(name, w0, lazy, weights, options, decoupled=task.decoupled, device=device, given=given)
    del lazy
    entry: ModuleStats | str = "passthrough"
    if task.decoupled:  # below the merge's own peak: out and two temporaries
        entry = decoupled_stats(name, stats, float(torch.linalg.vector_norm(torch.sub(out, w0.to(device=device)))))
    if task.transposed:
        out = out.T
    result = finite_output(to_output(out, w0.dtype), name, base.file_of(name))
    return result, entry


class CheckpointMerge:
    """The tensors of one planned checkpoint merge, computed on demand (`sinks.checkpoint.TensorJobs`)."""

    def __init__(
        self,
        tasks: Sequence[TensorTask],
        base: TensorReader,
        experts: Sequence[Expert],
        weights: Sequence[float],
        options: DecoupleOptions,
        device: torch.device,
    ) -> None:
        self.tasks = {task.name: task for task in tasks}
        self.base, self.experts, self.weights = base, list(experts), list(weights)
        self.options, self.device = options, device

    def items(self) -> list[tuple[str, float]]:
        return [(task.name, task.cost) for task in self.tasks.values()]

    def compute(self, name: str) -> tuple[torch.Tensor, ModuleStats | str]:
        task = self.tasks[name]
        return merge_checkpoint_tensor(task, self.base, self.experts, self.weights, self.options, self.device)

    def finish(self) -> None:
        """Nothing is batched: every entry is complete when its tensor is."""
