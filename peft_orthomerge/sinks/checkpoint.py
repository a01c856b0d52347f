"""The one writer of full-model checkpoints: streamed, atomic, for one process or many.

Every merge that produces a whole model (folded OFT adapters, `merge_models`) hands this sink a
`TensorJobs`: the output tensors' names with estimated costs, in checkpoint order, and a way to
compute each one. The sink splits the names between the ranks of a torchrun / accelerate launch
by cost (`parallel.split_by_cost`; one process: all of them), computes and writes one tensor at a
time into safetensors shards, and rank 0 indexes the shards, copies the base's config and
tokenizer files and writes the report and model card once. The output does not depend on the
number of processes.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Protocol, TypeVar

import torch

from ..memory import large_blocks_returned, release_free_memory
from ..progress import progress
from ..report import MergeReport, ModuleStats
from .card import write_report_files
from .output import DEFAULT_MAX_SHARD_BYTES, ShardedSafetensorsWriter, copy_base_side_files, finalize_shards
from .parallel import ProcessContext, distributed_output, split_by_cost

Entry = ModuleStats | str | None  # a report entry; "passthrough": merged without statistics; None: nothing
ShardParts = list[tuple[str, list[str]]]
T = TypeVar("T")
R = TypeVar("R")


class TensorJobs(Protocol):
    """The tensors of one output checkpoint, computed on demand."""

    def items(self) -> list[tuple[str, float]]:
        """``(name, estimated cost)`` of every output tensor, in checkpoint order."""
        ...

    def compute(self, name: str) -> tuple[torch.Tensor, Entry]:
        """The tensor to write under ``name`` (stored layout and dtype) and its report entry."""
        ...

    def finish(self) -> None:
        """Called once after this process's last `compute` (statistics gathered in batches)."""
        ...


def distributed_write(
    ctx: ProcessContext,
    output_dir: str | os.PathLike,
    *,
    compute: Callable[[Path, ShardedSafetensorsWriter], T],
    finalize: Callable[[Path, list[T]], R],
    inputs: Iterable[str | os.PathLike] = (),
    overwrite: bool = False,
    prefix: str = "model",
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    metadata: dict[str, str] | None = None,
) -> R:
    """`distributed_output` for safetensors shards: each rank writes its own, rank 0 indexes them all.

    Args:
        ctx: from `process_context`.
        output_dir: the final directory (validated by rank 0 before any work).
        compute: ``compute(tmp_dir, writer) -> T`` runs on every rank, adding its tensors to
            ``writer`` (shards tagged ``rank{r}-``, flushed every ``max_shard_bytes``); ``T``
            (picklable, small: e.g. per-module statistics) is gathered to rank 0.
        finalize: ``finalize(tmp_dir, results) -> R`` runs on rank 0 once all shards are
            renamed to transformers' names and indexed (`finalize_shards`); it writes configs,
            report and card. ``R`` must be picklable; every rank returns it.
        inputs, overwrite: as for `atomic_output_dir`.
        prefix, max_shard_bytes, metadata: as for `ShardedSafetensorsWriter`.

    Raises:
        The error of the first failing rank, on every rank; nothing is left on disk.
    """

    def work(tmp: Path) -> tuple[ShardParts, int, T]:
        writer = ShardedSafetensorsWriter(
            tmp, prefix=prefix, max_shard_bytes=max_shard_bytes, shard_tag=f"rank{ctx.rank}-", metadata=metadata
        )
        result = compute(tmp, writer)
        return writer.close(), writer.total_bytes, result

    def finish(tmp: Path, gathered: list[tuple[ShardParts, int, T]]) -> R:
        parts = [part for rank_parts, _, _ in gathered for part in rank_parts]
        finalize_shards(tmp, parts, prefix=prefix, total_bytes=sum(n for _, n, _ in gathered))
        return finalize(tmp, [result for _, _, result in gathered])

    return distributed_output(ctx, output_dir, work=work, finalize=finish, inputs=inputs, overwrite=overwrite)


def add_report_entries(report: MergeReport, names: Iterable[str], done: dict[str, Entry]) -> None:
    """Report entries in checkpoint order, whatever rank computed them."""
    for name in names:
        entry = done[name]
        if isinstance(entry, ModuleStats):
            report.modules.append(entry)
        elif entry == "passthrough":
            report.passthrough.append(name)


def write_checkpoint(
    ctx: ProcessContext,
    output_dir: str | os.PathLike,
    jobs: TensorJobs,
    report: MergeReport,
    *,
    base_dir: Path,
    base_ref: str,
    inputs: Iterable[str | os.PathLike],
    overwrite: bool = False,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    desc: str = "merging",
) -> MergeReport:
    """Compute ``jobs`` (this rank's share) and write them as the checkpoint ``output_dir``.

    The directory appears atomically with the shards, the base's side files, ``README.md`` and
    ``orthomerge_report.json``; on any error, on any rank, nothing is left behind. While it runs,
    glibc returns large freed blocks to the OS (`memory.large_blocks_returned`), so resident
    memory follows what is alive. Returns ``report`` with its per-tensor entries (every rank).
    """
    items = jobs.items()
    mine = split_by_cost(items, ctx.world_size)[ctx.rank]

    def compute(tmp: Path, writer: ShardedSafetensorsWriter) -> dict[str, Entry]:
        done: dict[str, Entry] = {}
        with torch.no_grad():
            for name in progress(mine, desc=desc, unit="tensor"):
                tensor, done[name] = jobs.compute(name)
                writer.add(name, tensor)
                del tensor
                release_free_memory()
            jobs.finish()
        return done

    def finalize(tmp: Path, results: list[dict[str, Entry]]) -> MergeReport:
        add_report_entries(report, (name for name, _ in items), {k: v for part in results for k, v in part.items()})
        copy_base_side_files(base_dir, tmp)
        write_report_files(tmp, report, base_model=base_ref, library_name="transformers")
        return report

    with large_blocks_returned():
        return distributed_write(
            ctx, output_dir, compute=compute, finalize=finalize, inputs=list(inputs), overwrite=overwrite,
            max_shard_bytes=max_shard_bytes,
        )  # fmt: skip
