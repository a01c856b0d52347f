"""Multi-process merging on torch.distributed (gloo, CPU): work split, per-rank shards, failures.

The multi-process cases launch real processes with ``python -m torch.distributed.run`` (what
``torchrun`` is), running this module's ``__main__`` toy job: every tensor is computed by one
rank and written into that rank's shards; rank 0 finalises.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import re
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch

from peft_orthomerge.errors import ConfigError, InputError, OrthoMergeError, OutputError
from peft_orthomerge.plan.checkpoint import estimate_cost
from peft_orthomerge.sinks.checkpoint import distributed_write
from peft_orthomerge.sinks.parallel import (
    ProcessContext,
    launcher_env,
    leave_process_group,
    process_context,
    split_by_cost,
)
from peft_orthomerge.sources.tensors import TensorReader

REPO = Path(__file__).resolve().parents[1]
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")

# -- the toy job (also run under torch.distributed.run via __main__) --------------------------
TOY_SHAPES = {
    **{f"layers.{i}.weight": (6 + 3 * i, 20 - 2 * i) for i in range(7)},
    **{f"layers.{i}.bias": (6 + 3 * i,) for i in range(7)},
    "embed.weight": (40, 12),
}


def _toy_tensor(name: str) -> torch.Tensor:
    """Seeded per name; 2-D weights become their orthogonal polar factor (real work per tensor)."""
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    t = torch.randn(TOY_SHAPES[name], generator=g, dtype=torch.float64)
    if t.ndim == 2:
        u, _, vh = torch.linalg.svd(t, full_matrices=False)
        t = u @ vh
    return t.to(torch.float32)


def toy_job(
    out_dir: str | Path, *, fail_rank: int | None = None, fail_in: str = "compute", max_shard_bytes: int = 1500
):
    ctx = process_context("cpu")
    items = [(name, estimate_cost(shape)) for name, shape in TOY_SHAPES.items()]
    mine = split_by_cost(items, ctx.world_size)[ctx.rank]

    def compute(tmp: Path, writer) -> dict[str, float]:
        stats = {}
        for i, name in enumerate(mine):
            if fail_in == "compute" and ctx.rank == fail_rank and i == 1:
                raise InputError("simulated bad tensor", path="expert-3/model.safetensors", tensor=name)
            tensor = _toy_tensor(name)
            writer.add(name, tensor)
            stats[name] = float(tensor.double().norm())
        return stats

    def finalize(tmp: Path, results: list[dict[str, float]]) -> dict[str, float]:
        if fail_in == "finalize":
            raise RuntimeError("simulated failure while writing the index")
        merged = {k: v for r in results for k, v in r.items()}
        (tmp / "report.json").write_text(json.dumps(merged, sort_keys=True))
        return merged

    return distributed_write(ctx, out_dir, compute=compute, finalize=finalize, max_shard_bytes=max_shard_bytes)


def _main() -> None:  # python -m torch.distributed.run ... -m test_parallel OUT [FAIL_RANK FAIL_IN]
    torch.set_num_threads(1)
    out = sys.argv[1]
    fail_rank = int(sys.argv[2]) if len(sys.argv) > 2 else None
    fail_in = sys.argv[3] if len(sys.argv) > 3 else "compute"
    rank = os.environ.get("RANK", "0")
    try:
        result = toy_job(out, fail_rank=fail_rank, fail_in=fail_in)
    except Exception as exc:
        print(f"rank{rank} {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        leave_process_group(1)
        sys.exit(1)
    print(f"rank{rank} OK {len(result)}", flush=True)
    leave_process_group(0)


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "tests"), str(REPO)])
    env["OMP_NUM_THREADS"] = "1"
    return env


def _launch(nproc: int, *args: str) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "test_parallel",
        *args,
    ]
    return subprocess.run(cmd, env=_clean_env(), capture_output=True, text=True, timeout=120)


def _read_all(directory: Path) -> dict[str, torch.Tensor]:
    reader = TensorReader.from_dir(directory, "model")
    return {k: reader.get(k) for k in reader.keys()}


@pytest.fixture(autouse=True)
def _no_launcher_env(monkeypatch):
    for var in LAUNCHER_VARS:
        monkeypatch.delenv(var, raising=False)


# -- splitting ---------------------------------------------------------------------------------
def _lpt_reference(items, world):
    """Independent LPT: sort by cost desc / name, give each to the min-load, lowest-index rank."""
    loads = [0.0] * world
    owner = {}
    for name, cost in sorted(items, key=lambda it: (-it[1], it[0])):
        r = min(range(world), key=lambda k: (loads[k], k))
        owner[name] = r
        loads[r] += cost
    return owner


@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_split_by_cost_is_lpt_and_order_independent(world):
    rng = random.Random(world)
    items = [(f"t{i}", float(rng.choice([1, 8, 27, 64, 64, 125, 1000]))) for i in range(23)]
    owner = _lpt_reference(items, world)
    for trial in range(4):
        shuffled = items[:]
        random.Random(trial).shuffle(shuffled)
        split = split_by_cost(shuffled, world)
        assert len(split) == world
        assert sorted(n for part in split for n in part) == sorted(n for n, _ in items)
        for r, part in enumerate(split):
            assert all(owner[n] == r for n in part)
            order = [n for n, _ in shuffled if owner[n] == r]
            assert part == order  # the caller's order within a rank


def test_split_by_cost_balance_within_lpt_bound():
    items = [(f"t{i}", float(c)) for i, c in enumerate([7, 7, 6, 6, 5, 4, 4, 3, 2, 2])]
    world = 3
    split = split_by_cost(items, world)
    cost = dict(items)
    makespan = max(sum(cost[n] for n in part) for part in split)
    best = min(
        max(sum(c for (_, c), a in zip(items, assign) if a == r) for r in range(world))
        for assign in itertools.product(range(world), repeat=len(items))
        if assign[0] == 0
    )
    assert makespan <= (4 / 3 - 1 / (3 * world)) * best + 1e-9


def test_split_by_cost_rejects_bad_input():
    with pytest.raises(ConfigError):
        split_by_cost([("a", 1.0)], 0)
    with pytest.raises(ConfigError):
        split_by_cost([("a", 1.0), ("a", 2.0)], 2)
    assert split_by_cost([], 3) == [[], [], []]


def test_estimate_cost():
    assert estimate_cost((4, 8)) == 8**3 + 4 * 8**2
    assert estimate_cost((4, 8), decoupled=False) == 32
    assert estimate_cost((7,)) == 7
    assert estimate_cost((2, 3, 4)) == 24


def test_parse_size():
    from peft_orthomerge.sinks.output import parse_size

    assert parse_size("5GB") == 5 * 10**9 and parse_size("500mb") == 5 * 10**8
    assert parse_size("2GiB") == 2 * 2**30 and parse_size(123) == 123 and parse_size("1.5MB") == 1_500_000
    for bad in ("x", "-1", 0, "5XB", True):
        with pytest.raises(ConfigError):
            parse_size(bad)


# -- process context ---------------------------------------------------------------------------
def test_process_context_without_launcher():
    ctx = process_context("cpu")
    assert ctx == ProcessContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    assert ctx.is_main and not ctx.distributed
    assert not torch.distributed.is_initialized()


def test_launcher_env(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert launcher_env() == (3, 4, 1)
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(ConfigError, match="RANK=4"):
        launcher_env()
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(ConfigError, match="RANK"):
        launcher_env()


# -- single process ----------------------------------------------------------------------------
def test_single_process_writes_expected_tensors(tmp_path):
    out = tmp_path / "out"
    stats = toy_job(out)
    tensors = _read_all(out)
    assert set(tensors) == set(TOY_SHAPES)
    for name, tensor in tensors.items():
        assert torch.equal(tensor, _toy_tensor(name))
        assert stats[name] == pytest.approx(float(tensor.double().norm()))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(TOY_SHAPES)
    assert json.loads((out / "report.json").read_text()) == stats
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_single_process_failure_leaves_nothing(tmp_path):
    with pytest.raises(InputError, match="simulated bad tensor"):
        toy_job(tmp_path / "out", fail_rank=0)
    with pytest.raises(RuntimeError, match="index"):
        toy_job(tmp_path / "out", fail_in="finalize")
    assert list(tmp_path.iterdir()) == []


# -- two processes -----------------------------------------------------------------------------
def test_two_processes_identical_to_one(tmp_path):
    one = tmp_path / "one"
    toy_job(one)
    two = tmp_path / "two"
    proc = _launch(2, str(two))
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = _read_all(one), _read_all(two)
    assert set(a) == set(b) == set(TOY_SHAPES)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    # both ranks wrote shards, rank 0 indexed them all
    assert json.loads((one / "report.json").read_text()) == json.loads((two / "report.json").read_text())
    index = json.loads((two / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(TOY_SHAPES)
    assert all(f.startswith("model-") for f in index["weight_map"].values())
    assert not [p for p in two.iterdir() if "rank" in p.name]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "two"]


def test_failing_rank_fails_the_run_with_its_message(tmp_path):
    out = tmp_path / "out"
    proc = _launch(2, str(out), "1", "compute")
    assert proc.returncode != 0
    # the two ranks write to one stderr concurrently, so lines may interleave: match, do not split
    found = re.findall(r"rank([01]) (InputError: expert-3/model\.safetensors: \S+: simulated bad tensor)", proc.stderr)
    messages = dict(found)
    assert "1" in messages, proc.stderr[-3000:]
    # rank 0 did not fail itself, but raises rank 1's error (same class, same message)
    assert messages.get("0") == messages["1"], proc.stderr[-3000:]
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_failing_finalisation_fails_every_rank(tmp_path):
    out = tmp_path / "out"
    proc = _launch(2, str(out), "0", "finalize")
    assert proc.returncode != 0
    assert "rank0 RuntimeError: simulated failure while writing the index" in proc.stderr, proc.stderr[-3000:]
    assert (
        "rank1 OrthoMergeError: rank 0 failed: RuntimeError: simulated failure while writing the index" in proc.stderr
    )
    assert list(tmp_path.iterdir()) == []


def test_unusable_output_dir_fails_every_rank(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    proc = _launch(2, str(out))
    assert proc.returncode != 0
    for rank in (0, 1):
        assert f"rank{rank} OutputError: {out}: output directory exists and is not empty" in proc.stderr, proc.stderr[
            -3000:
        ]
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_rebuilt_errors_keep_class_and_message():
    from peft_orthomerge.sinks.parallel import _Failure

    exc = OutputError("cannot write", path="/x", tensor="w", hint="Try again.")
    rebuilt = _Failure.of(1, exc).rebuild()
    assert type(rebuilt) is OutputError and str(rebuilt) == str(exc) and rebuilt.rank == 1
    other = _Failure.of(2, ValueError("boom")).rebuild()
    assert type(other) is OrthoMergeError and str(other) == "rank 2 failed: ValueError: boom"


if __name__ == "__main__":
    _main()
