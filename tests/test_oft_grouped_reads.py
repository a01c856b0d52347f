"""The OFT merge's grouped reads (`merge.oft.CanonicalInputs.prefetched`): modules read in groups,
one vectored read per file and group, the next group read by a background thread. Checked against
the stored tensors read independently (``safetensors.torch.load_file``) and against one-module
reads, over every kind of row (direct, negated, absent, converted); errors raised in the reading
thread reach the caller with file and tensor, and leave no output."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
from _oft_utils import make_oft_adapter, ref_canonical
from safetensors.torch import load_file, save_file

from peft_orthomerge import merge_oft_checkpoints
from peft_orthomerge.errors import InputError
from peft_orthomerge.merge import oft as merge_oft
from peft_orthomerge.merge.oft import CanonicalInputs
from peft_orthomerge.ops.skew import skew_to_vec
from peft_orthomerge.plan.oft import build_plan
from peft_orthomerge.plan.options import OftOptions
from peft_orthomerge.sources import safetensors_file as safetensors_file_mod
from peft_orthomerge.sources.oft import read_adapter_dir

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _to_float64(directory: Path) -> Path:
    """The adapter with its tensors stored in float64 (a stack of float64 then holds every input)."""
    file = directory / "adapter_model.safetensors"
    save_file({k: v.double() for k, v in load_file(file).items()}, str(file))
    return directory


@pytest.fixture(scope="module")
def mixed_inputs(tmp_path_factory) -> list[Path]:
    """Rows of every kind: Neumann (read as stored), exact Cayley (read, then negated), a subset of the
    modules (zeros elsewhere), block size 8 under a plan of 16 (converted: lifted), float64."""
    root = tmp_path_factory.mktemp("grouped")
    return [
        make_oft_adapter(root / "neumann", seed=0, targets=TARGETS),
        make_oft_adapter(root / "exact", seed=1, targets=TARGETS, neumann=False),
        make_oft_adapter(root / "subset", seed=2, targets=("q_proj", "down_proj")),
        make_oft_adapter(root / "small-blocks", seed=3, targets=TARGETS, oft_block_size=8),
        _to_float64(make_oft_adapter(root / "float64", seed=4, targets=TARGETS)),
    ]


def _plan(inputs, **options):
    adapters = [read_adapter_dir(str(d), d) for d in inputs]
    return build_plan(adapters, None, OftOptions(**options))


def _expected_row(directory: Path, key: str | None, b: int, rows: int) -> torch.Tensor:
    """One adapter's canonical vectors of a module at block size ``b``, from its file and config alone."""
    if key is None:
        return torch.zeros(rows, b * (b - 1) // 2, dtype=torch.float64)
    import json

    config = json.loads((directory / "adapter_config.json").read_text())
    stored = load_file(directory / "adapter_model.safetensors")[key].double()
    q = ref_canonical(stored, config.get("use_cayley_neumann", True))  # (r', b', b')
    small = q.shape[-1]
    if small != b:  # blockdiag of b / b' consecutive small blocks per plan block
        per = b // small
        q = torch.stack([torch.block_diag(*q[k * per : (k + 1) * per]) for k in range(q.shape[0] // per)])
    return skew_to_vec(q)


@pytest.mark.parametrize("with_float64", [False, True], ids=["float32-stacks", "float64-stacks"])
@pytest.mark.parametrize("group_bytes", [1, 40_000, 2**40])  # every module alone / a few per group / one group
def test_grouped_reads_equal_the_files_and_one_module_reads(mixed_inputs, monkeypatch, group_bytes, with_float64):
    """float32 stacks: the Neumann, exact-Cayley and subset adapters are read as stored (the exact one
    then negated); float64 stacks: the float64 adapter is read as stored, every other one converted."""
    monkeypatch.setattr(merge_oft, "GROUP_BYTES", group_bytes)
    inputs = mixed_inputs if with_float64 else mixed_inputs[:4]
    plan = _plan(inputs)
    reader_threads = set()
    real = safetensors_file_mod.os.preadv

    def spy(fd, buffers, offset):
        reader_threads.add(threading.current_thread().name)
        return real(fd, buffers, offset)

    monkeypatch.setattr(safetensors_file_mod.os, "preadv", spy)
    single = CanonicalInputs(plan)
    groups = CanonicalInputs(plan)._groups(plan.modules)
    seen = []
    for mp, (stack, norms) in CanonicalInputs(plan).prefetched(plan.modules):
        seen.append(mp.name)
        assert stack.dtype == (torch.float64 if with_float64 else torch.float32)
        for i, (directory, src) in enumerate(zip(inputs, mp.sources)):
            expected = _expected_row(directory, None if src is None else src.key, mp.b, mp.r)
            torch.testing.assert_close(stack[i].double(), expected, rtol=1e-12, atol=1e-12)
        one_stack, one_norms = single.read(mp)
        assert torch.equal(stack, one_stack) and torch.equal(norms, one_norms), mp.name
    assert seen == [mp.name for mp in plan.modules]
    assert (len(groups) > 1) == any(name.startswith("orthomerge-read") for name in reader_threads)
    if group_bytes == 1:
        assert len(groups) == len(plan.modules)


def test_merged_adapter_does_not_depend_on_the_grouping(mixed_inputs, tmp_path, monkeypatch):
    outputs = []
    for group_bytes in (1, 2**40):
        monkeypatch.setattr(merge_oft, "GROUP_BYTES", group_bytes)
        out = tmp_path / f"out-{group_bytes}"
        merge_oft_checkpoints(mixed_inputs, out)
        outputs.append((out / "adapter_model.safetensors").read_bytes())
    assert outputs[0] == outputs[1]


def test_a_read_error_in_the_reading_thread_names_file_and_tensor_and_leaves_no_output(
    mixed_inputs, tmp_path, monkeypatch
):
    """The third vectored read fails (as an I/O error would): the merge raises `InputError` naming the
    file and the first tensor of that read, from the caller's thread, and writes nothing."""
    monkeypatch.setattr(merge_oft, "GROUP_BYTES", 1)
    real, calls = safetensors_file_mod.os.preadv, []

    def failing(fd, buffers, offset):
        calls.append(fd)
        if len(calls) == 3:
            raise OSError(5, "Input/output error")
        return real(fd, buffers, offset)

    monkeypatch.setattr(safetensors_file_mod.os, "preadv", failing)
    out = tmp_path / "out"
    with pytest.raises(InputError) as info:
        merge_oft_checkpoints(mixed_inputs, out)
    message = str(info.value)
    assert "cannot read tensor data" in message and "Input/output error" in message
    assert ".oft_R.weight" in message and "adapter_model.safetensors" in message
    assert not out.exists()
    assert not [t for t in threading.enumerate() if t.name.startswith("orthomerge-read")]
