"""Several processes (and machines) cooperating on one merge, through ``torch.distributed``.

Launch with the tools people already use; nothing here schedules or transports anything itself::

    torchrun --nproc_per_node 4 -m peft_orthomerge merge recipe.yaml
    accelerate launch --num_processes 4 -m peft_orthomerge merge recipe.yaml
    torchrun --nnodes 2 --node_rank R --master_addr HOST --master_port 29500 \\
        --nproc_per_node 8 -m peft_orthomerge merge recipe.yaml

(On a machine without GPUs, ``accelerate launch`` needs ``--multi_gpu`` to start several
processes; it then runs torchrun's launcher, and the processes use gloo.)
Both launchers set ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``.
`process_context` reads them and, only when ``WORLD_SIZE > 1``, initialises the default process
group (gloo for CPU work, nccl for CUDA work). Without a launcher everything runs in-process.

How a merge is split (`distributed_output`; for checkpoints `sinks.checkpoint.distributed_write`):

1. Rank 0 validates the output path and creates the hidden temporary output directory
   (`atomic_output_dir`); its path is broadcast. With several machines it must lie on a
   file system they share.
2. The work items (tensor names with estimated costs, `estimate_cost`) are split by
   `split_by_cost` (greedy longest-processing-time; the same answer on every rank and for any
   input order). Each rank computes its items and writes its own safetensors shards
   (``shard_tag=f"rank{r}-"``).
3. Every rank reports success or its error (`all_gather_object`). If any rank failed, every
   rank raises that rank's error (lowest failing rank first) and rank 0 removes the
   temporary directory: no partial output, no hung rank.
4. Rank 0 gathers the ``(file, tensor names)`` lists of all ranks, calls `finalize_shards`,
   writes the index, report and model card, and renames the directory into place. Its
   outcome is broadcast, so every rank returns (or raises) only once the output is final.

A rank that dies without raising (killed, out of memory) is handled by the launcher, which
stops the other ranks; ``ORTHOMERGE_DIST_TIMEOUT_S`` bounds any wait in a collective.

The values written do not depend on the number of processes: each tensor is computed by
exactly one rank, with the same code, in the same dtype.
"""

from __future__ import annotations

import atexit
import contextlib
import heapq
import importlib
import os
import sys
from collections.abc import Callable, Iterable
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import torch

from ..device import resolve_device
from ..errors import ConfigError, OrthoMergeError
from .output import (
    atomic_output_dir,
)

T = TypeVar("T")
R = TypeVar("R")

ENV_TIMEOUT = "ORTHOMERGE_DIST_TIMEOUT_S"


@dataclass(frozen=True)
class ProcessContext:
    """This process's place in the run.

    Attributes:
        rank: global rank (0 when not launched by a launcher).
        world_size: number of processes.
        local_rank: rank on this machine (selects the GPU).
        device: where this process computes (``cuda:<local_rank>`` for CUDA work).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "")
    if raw == "":
        return default
    try:
        return int(raw)
    except ValueError as exc:
        raise ConfigError(f"environment variable {name}={raw!r} is not an integer") from exc


def launcher_env() -> tuple[int, int, int]:
    """``(RANK, WORLD_SIZE, LOCAL_RANK)`` as set by torchrun / accelerate launch (0, 1, 0 without one)."""
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local = _env_int("LOCAL_RANK", rank if world > 1 else 0)
    if world < 1 or not 0 <= rank < world:
        raise ConfigError(f"inconsistent launcher environment: RANK={rank}, WORLD_SIZE={world}")
    return rank, world, local


def process_context(device: str | torch.device | None = "cpu") -> ProcessContext:
    """Return this process's `ProcessContext`, initialising ``torch.distributed`` when needed.

    The default process group is created only when ``WORLD_SIZE > 1`` and none exists yet
    (backend nccl when ``device`` resolves to CUDA, else gloo; rendezvous ``env://`` from the
    launcher's ``MASTER_ADDR`` / ``MASTER_PORT``). An existing group (e.g. created by
    ``accelerate``) is reused as it is. ``ORTHOMERGE_DIST_TIMEOUT_S`` sets the collective
    timeout (default 1800 s).
    """
    import torch.distributed as dist

    rank, world, local = launcher_env()
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    dev = resolve_device(device)  # a bare "cuda" means cuda:LOCAL_RANK
    if world > 1 and not dist.is_initialized():
        if not dist.is_available():
            raise ConfigError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
        backend = "nccl" if dev.type == "cuda" else "gloo"
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        timeout = timedelta(seconds=_env_int(ENV_TIMEOUT, 1800))
        dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world, timeout=timeout)
        atexit.register(_destroy_process_group)
    return ProcessContext(rank=rank, world_size=world, local_rank=local, device=dev)


def _destroy_process_group() -> None:
    """At exit: tear down the group we created while the interpreter is alive (gloo threads
    finalised later can abort the process)."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def leave_process_group(code: int | str | None = 0) -> None:
    """End a process of a launched run: destroy the process group, flush, ``os._exit(code)``.

    Call it last in scripts run by torchrun / ``accelerate launch`` (the CLI does). Skipping
    interpreter finalisation avoids gloo's worker threads aborting the process (``terminate
    called without an active exception``) after the work is done. Does nothing (and returns)
    when no process group is initialised.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code if isinstance(code, int) else (0 if code is None else 1))


def _settle(ctx: ProcessContext) -> None:
    """A last barrier after a successful run, so that no rank exits while another still receives."""
    if ctx.distributed:
        import torch.distributed as dist

        dist.barrier()


# -- splitting the work ------------------------------------------------------------------------
def split_by_cost(items: Iterable[tuple[str, float]], world_size: int) -> list[list[str]]:
    """Assign named work items to ``world_size`` ranks, balancing estimated cost.

    Greedy longest-processing-time: items sorted by cost (descending, ties by name) go one by
    one to the least loaded rank (ties to the lowest rank). The assignment depends only on the
    set of ``(name, cost)`` pairs, never on their order; within a rank, items keep the order
    in which they were given (the model's tensor order, so shards read naturally).
    """
    items = list(items)
    if world_size < 1:
        raise ConfigError(f"world_size must be >= 1, got {world_size}")
    names = [name for name, _ in items]
    if len(set(names)) != len(names):
        raise ConfigError("work item names must be unique")
    heap = [(0.0, r) for r in range(world_size)]
    owner: dict[str, int] = {}
    for name, cost in sorted(items, key=lambda it: (-float(it[1]), it[0])):
        load, r = heapq.heappop(heap)
        owner[name] = r
        heapq.heappush(heap, (load + float(cost), r))
    out: list[list[str]] = [[] for _ in range(world_size)]
    for name in names:
        out[owner[name]].append(name)
    return out


# -- agreeing on success -----------------------------------------------------------------------
@dataclass(frozen=True)
class _Failure:
    rank: int
    module: str
    qualname: str
    text: str
    message: str | None = None
    path: str | None = None
    tensor: str | None = None
    hint: str | None = None

    @classmethod
    def of(cls, rank: int, exc: BaseException) -> _Failure:
        fields = {}
        if isinstance(exc, OrthoMergeError):
            fields = {"message": exc.message, "path": exc.path, "tensor": exc.tensor, "hint": exc.hint}
        return cls(rank, type(exc).__module__, type(exc).__qualname__, str(exc), **fields)

    def rebuild(self) -> BaseException:
        """The same error for the ranks that did not fail (same class and message for library errors)."""
        if self.message is not None and self.module.startswith("peft_orthomerge"):
            try:
                cls = getattr(importlib.import_module(self.module), self.qualname)
                if isinstance(cls, type) and issubclass(cls, OrthoMergeError):
                    exc: BaseException = cls(self.message, path=self.path, tensor=self.tensor, hint=self.hint)
                    _tag(exc, self.rank)
                    return exc
            except Exception:
                pass
        exc = OrthoMergeError(f"rank {self.rank} failed: {self.qualname}: {self.text}")
        _tag(exc, self.rank)
        return exc


def _tag(exc: BaseException, rank: int) -> None:
    """Mark an error as agreed by all ranks (``exc.rank``: the rank where it happened)."""
    with contextlib.suppress(AttributeError):  # exotic exception types with __slots__
        exc.rank = rank  # type: ignore[attr-defined]


def all_gather(ctx: ProcessContext, obj: Any) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]``; no communication in a single process."""
    if not ctx.distributed:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_from_main(ctx: ProcessContext, obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not ctx.distributed:
        return obj
    import torch.distributed as dist

    box = [obj if ctx.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_checked(ctx: ProcessContext, run: Callable[[], T]) -> list[T]:
    """Run ``run()`` on every rank, then agree: all results (in rank order), or everyone raises.

    A rank whose ``run`` raised re-raises its own exception; the others raise the same error
    (`OrthoMergeError` subclasses keep class and message; anything else is wrapped in an
    `OrthoMergeError` naming the rank). With several failures, the lowest rank's error wins.
    """
    try:
        payload: tuple[bool, Any] = (True, run())
        own: BaseException | None = None
    except BaseException as exc:
        payload, own = (False, _Failure.of(ctx.rank, exc)), exc
    gathered = all_gather(ctx, payload)
    failures = [p for ok, p in gathered if not ok]
    if failures:
        if own is not None and failures[0].rank == ctx.rank:
            _tag(own, ctx.rank)
            raise own
        raise failures[0].rebuild()
    return [p for _, p in gathered]


def main_checked(ctx: ProcessContext, run: Callable[[], R]) -> R:
    """Run ``run()`` on rank 0 only; every rank returns its result or raises its error."""
    try:
        payload: tuple[bool, Any] = (True, run() if ctx.is_main else None)
        own: BaseException | None = None
    except BaseException as exc:
        payload, own = (False, _Failure.of(ctx.rank, exc)), exc
    ok, value = broadcast_from_main(ctx, payload)
    if not ok:
        if own is not None:
            _tag(own, ctx.rank)
            raise own
        raise value.rebuild()
    return value


# -- the atomic, multi-process output --------------------------------------------------------


def distributed_output(
    ctx: ProcessContext,
    output_dir: str | os.PathLike,
    *,
    work: Callable[[Path], T],
    finalize: Callable[[Path, list[T]], R],
    inputs: Iterable[str | os.PathLike] = (),
    overwrite: bool = False,
) -> R:
    """One output directory built by every rank, appearing atomically; ``finalize``'s result on every rank.

    Rank 0 validates ``output_dir`` and creates the temporary directory (`atomic_output_dir`);
    every rank runs ``work(tmp) -> T``; if all succeed, rank 0 runs ``finalize(tmp, [T of rank
    0, T of rank 1, ...]) -> R`` and renames the directory into place. ``T`` and ``R`` must be
    picklable (they travel with ``all_gather_object`` / ``broadcast_object_list``).

    Raises:
        On every rank, the error of the first failing rank (see `gather_checked`); the
        temporary directory is removed and ``output_dir`` is left as it was.
    """
    inputs = list(inputs)
    if not ctx.distributed:
        with atomic_output_dir(output_dir, inputs=inputs, overwrite=overwrite) as tmp:
            results = gather_checked(ctx, lambda: work(tmp))
            return finalize(tmp, results)

    # Collectives, in the same order on every rank: (1) rank 0's temporary directory,
    # (2) every rank's work, (3) rank 0's finalisation and rename into place.
    if not ctx.is_main:
        tmp = Path(main_checked(ctx, lambda: None))
        gather_checked(ctx, lambda: work(tmp))
        result = main_checked(ctx, lambda: None)
        _settle(ctx)
        return result

    stack = ExitStack()
    tmp = main_checked(
        ctx, lambda: stack.enter_context(atomic_output_dir(output_dir, inputs=inputs, overwrite=overwrite))
    )
    try:
        results = gather_checked(ctx, lambda: work(tmp))

        def finish() -> R:
            result = finalize(tmp, results)
            stack.close()  # renames into place (or removes the directory and raises OutputError)
            return result

        result = main_checked(ctx, finish)
    except BaseException:
        stack.__exit__(*sys.exc_info())  # removes the temporary directory (if still there); never suppresses
        raise
    _settle(ctx)
    return result
