"""`TensorReader`'s positional reads: ``get``, ``get_rows`` and ``dtype`` against safetensors' own
reading, bit for bit, over every dtype torch maps; their errors; and the memory they leave behind.

The reference for every value is ``safetensors.safe_open(...).get_tensor`` (an independent
reader of the same file); for the pickle opt-in path it is the saved tensor itself.
"""

from __future__ import annotations

import json
import math
import os
import struct
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from peft_orthomerge.errors import InputError, NumericalError
from peft_orthomerge.sources import safetensors_file as safetensors_file_mod
from peft_orthomerge.sources import tensors as tensors_mod
from peft_orthomerge.sources.tensors import TensorReader

pytestmark = pytest.mark.skipif(sys.byteorder != "little", reason="positional reads assume a little-endian machine")


def _sample_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g)

    out = {
        "f32": randn(7, 5),
        "f64": randn(3, 4).double(),
        "f16": randn(6, 3).half(),
        "bf16": randn(5, 4, 2).bfloat16(),
        "f8_e4m3": randn(4, 3).to(torch.float8_e4m3fn),
        "f8_e5m2": randn(4, 6).to(torch.float8_e5m2),
        "i64": torch.randint(-(2**40), 2**40, (5, 2), generator=g),
        "i32": torch.randint(-1000, 1000, (3, 3), generator=g, dtype=torch.int32),
        "i8": torch.randint(-128, 128, (4, 2), generator=g, dtype=torch.int8),
        "u8": torch.randint(0, 256, (6,), generator=g, dtype=torch.uint8),
        "bool": torch.rand(6, 2, generator=g) > 0.5,
        "c64": torch.complex(randn(3, 2), randn(3, 2)),
        "vector": randn(9),
        "one_row": randn(1, 8),
        "no_rows": torch.zeros(0, 4),
        "scalar": torch.tensor(2.5),
    }
    if hasattr(torch, "uint16"):
        out["u16"] = torch.randint(0, 2**16, (4, 2), generator=g, dtype=torch.int32).to(torch.uint16)
    return out


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(_bits(a), _bits(b))


def _reference(path: Path, key: str) -> torch.Tensor:
    with safe_open(str(path), framework="pt") as f:
        return f.get_tensor(key).clone()


@pytest.fixture(params=["single", "sharded"])
def checkpoint(request, tmp_path) -> tuple[TensorReader, dict[str, Path]]:
    """A reader over `_sample_tensors` in one file or two shards with an index; and each tensor's file."""
    tensors = _sample_tensors()
    if request.param == "single":
        path = tmp_path / "model.safetensors"
        save_file(tensors, str(path))
        where = dict.fromkeys(tensors, path)
    else:
        names = sorted(tensors)
        where = {k: tmp_path / f"model-0000{1 + i % 2}-of-00002.safetensors" for i, k in enumerate(names)}
        for file in set(where.values()):
            save_file({k: tensors[k] for k in names if where[k] == file}, str(file))
        index = {"metadata": {}, "weight_map": {k: p.name for k, p in where.items()}}
        (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    return TensorReader.from_dir(tmp_path, "model"), where


def test_get_and_dtype_match_safetensors_bit_for_bit(checkpoint):
    reader, where = checkpoint
    assert sorted(reader.keys()) == sorted(where)
    for key, path in where.items():
        ref = _reference(path, key)
        got = reader.get(key)
        assert _same(got, ref), key
        assert reader.dtype(key) == ref.dtype and reader.shape(key) == tuple(ref.shape)
        assert reader.file_of(key) == path


def test_get_rows_equals_slicing_get(checkpoint):
    reader, where = checkpoint
    for key, path in where.items():
        shape = reader.shape(key)
        if not shape:
            continue
        n = shape[0]
        whole = _reference(path, key)
        ranges = {(0, 0), (0, n), (n, n)} | ({(n - 1, n), (0, 1)} if n else set()) | ({(1, n - 1)} if n > 2 else set())
        for start, stop in ranges:
            rows = reader.get_rows(key, start, stop)
            assert _same(rows, whole[start:stop]), (key, start, stop)
            assert rows.is_contiguous()


def test_get_rows_returns_fresh_memory(checkpoint):
    reader, _ = checkpoint
    rows = reader.get_rows("f32", 2, 5)
    expected = reader.get("f32")[2:5].clone()
    rows.zero_()
    assert torch.equal(reader.get_rows("f32", 2, 5), expected)
    assert torch.equal(reader.get("f32")[2:5], expected)


@pytest.mark.parametrize("start, stop", [(-1, 2), (3, 2), (0, 8), (8, 8), (-3, -1)])
def test_bad_row_ranges_are_input_errors(tmp_path, start, stop):
    path = tmp_path / "x.safetensors"
    save_file({"layer.weight": torch.ones(7, 5), "scalar": torch.tensor(1.0)}, str(path))
    reader = TensorReader.from_file(path)
    with pytest.raises(InputError) as info:
        reader.get_rows("layer.weight", start, stop)
    assert str(path) in str(info.value) and "layer.weight" in str(info.value)
    with pytest.raises(InputError) as info:
        reader.get_rows("scalar", 0, 1)
    assert str(path) in str(info.value) and "scalar" in str(info.value) and "0-d" in str(info.value)
    with pytest.raises(InputError) as info:
        reader.get_rows("not.there", 0, 1)
    assert "not.there" in str(info.value)


def test_get_rows_checks_only_the_rows_read_for_nan(tmp_path):
    path = tmp_path / "x.safetensors"
    t = torch.ones(6, 3, dtype=torch.bfloat16)
    t[3, 1] = float("nan")
    save_file({"w": t}, str(path))
    reader = TensorReader.from_file(path)
    assert torch.equal(reader.get_rows("w", 0, 3), t[:3]) and torch.equal(reader.get_rows("w", 4, 6), t[4:])
    for start, stop in [(3, 4), (0, 6)]:
        with pytest.raises(NumericalError) as info:
            reader.get_rows("w", start, stop)
        assert str(path) in str(info.value) and "w" in str(info.value)
    assert _same(reader.get_rows("w", 2, 5, check_finite=False), t[2:5])


def test_pickle_opt_in_path(tmp_path):
    tensors = {"w": torch.randn(5, 3), "v": torch.arange(4), "s": torch.tensor(1.0), "t": torch.randn(3, 4).t()}
    path = tmp_path / "adapter_model.bin"
    torch.save(tensors, path)
    reader = TensorReader.from_file(path, allow_pickle=True)
    for key, t in tensors.items():
        assert _same(reader.get(key), t) and reader.dtype(key) == t.dtype and reader.shape(key) == tuple(t.shape)
    for key, (start, stop) in {"w": (1, 4), "v": (0, 4), "t": (2, 4)}.items():
        rows = reader.get_rows(key, start, stop)
        assert _same(rows, tensors[key][start:stop]) and rows.is_contiguous()
        rows.fill_(7)
        assert _same(reader.get(key), tensors[key])  # a clone, not a view of the loaded tensor
    for key, start, stop in [("w", 4, 2), ("w", 0, 6), ("s", 0, 1)]:
        with pytest.raises(InputError) as info:
            reader.get_rows(key, start, stop)
        assert str(path) in str(info.value) and key in str(info.value)


def test_dtype_and_shape_read_no_data(checkpoint, monkeypatch):
    reader, where = checkpoint
    expected = {k: _reference(p, k).dtype for k, p in where.items()}

    def no_reads(*args, **kwargs):
        raise AssertionError("a data read")

    monkeypatch.setattr(safetensors_file_mod.os, "preadv", no_reads)
    assert {k: reader.dtype(k) for k in where} == expected
    with pytest.raises(AssertionError):  # the patch does stop data reads
        reader.get("f32")


@pytest.mark.parametrize("mode", ["dtype-not-mapped", "no-positional-reads"])
def test_fallback_to_safe_open_reads_the_same(checkpoint, monkeypatch, mode):
    reader, where = checkpoint
    positional = {k: reader.get(k) for k in where}
    if mode == "dtype-not-mapped":
        monkeypatch.setattr(tensors_mod, "DTYPES", {k: v for k, v in tensors_mod.DTYPES.items() if k != "BF16"})
    else:
        monkeypatch.setattr(tensors_mod, "POSITIONAL_READS", False)
    for key in where:
        assert _same(reader.get(key), positional[key]), key
        assert reader.dtype(key) == positional[key].dtype
        if positional[key].dim() and positional[key].shape[0] >= 2:
            assert _same(reader.get_rows(key, 1, 2), positional[key][1:2]), key


def test_file_truncated_after_open_is_input_error(tmp_path):
    path = tmp_path / "x.safetensors"
    save_file({"a": torch.ones(4, 4), "b": torch.ones(64, 64)}, str(path))
    reader = TensorReader.from_file(path)
    os.truncate(path, path.stat().st_size - 100)
    assert torch.equal(reader.get("a"), torch.ones(4, 4))  # written first: still whole
    for read in (lambda: reader.get("b"), lambda: reader.get_rows("b", 60, 64)):
        with pytest.raises(InputError) as info:
            read()
        assert str(path) in str(info.value) and "b" in str(info.value) and "short" in str(info.value)


def test_bool_bytes_other_than_zero_and_one_are_refused(tmp_path):
    header = json.dumps({"m": {"dtype": "BOOL", "shape": [2, 2], "data_offsets": [0, 4]}}).encode()
    path = tmp_path / "x.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\x00\x01\x02\x01")
    reader = TensorReader.from_file(path)
    assert reader.get_rows("m", 0, 1).tolist() == [[False, True]]
    for read in (lambda: reader.get("m"), lambda: reader.get_rows("m", 1, 2)):
        with pytest.raises(InputError) as info:
            read()
        assert str(path) in str(info.value) and "m" in str(info.value)


class _LenientSafeOpen:
    """Stands in for `safe_open` and accepts any header, so that the reader's own checks are tested."""

    def __init__(self, path: str, **_) -> None:
        raw = Path(path).read_bytes()
        n = struct.unpack("<Q", raw[:8])[0]
        self._keys = [k for k in json.loads(raw[8 : 8 + n]) if k != "__metadata__"]

    def keys(self) -> list[str]:
        return self._keys


@pytest.mark.parametrize(
    "entry, words",
    [
        ({"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 400]}, "outside"),
        ({"dtype": "F32", "shape": [2, 2], "data_offsets": [8, 4]}, "outside"),
        ({"dtype": "F32", "shape": [3, 2], "data_offsets": [0, 16]}, "needs 24 bytes"),
        ({"dtype": "F64", "shape": [2, 2], "data_offsets": [0, 16]}, "needs 32 bytes"),
        ({"dtype": "F32", "shape": [-2, 2], "data_offsets": [0, 16]}, "malformed"),
        ({"dtype": "F32", "shape": [2, 2]}, "malformed"),
        ([1, 2, 3], "malformed"),
    ],
)
def test_own_header_checks_name_file_and_tensor(tmp_path, monkeypatch, entry, words):
    header = json.dumps({"__metadata__": {"format": "pt"}, "w": entry}).encode()
    path = tmp_path / "x.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + bytes(16))
    monkeypatch.setattr(safetensors_file_mod, "safe_open", _LenientSafeOpen)
    with pytest.raises(InputError) as info:
        TensorReader.from_file(path)
    assert str(path) in str(info.value) and ": w:" in str(info.value) and words in str(info.value)


def test_lenient_stand_in_accepts_a_good_file(tmp_path, monkeypatch):
    """The stand-in of the test above lets a correct file through (so the errors there are the reader's)."""
    path = tmp_path / "x.safetensors"
    save_file({"w": torch.arange(4.0).reshape(2, 2)}, str(path), metadata={"format": "pt"})
    monkeypatch.setattr(safetensors_file_mod, "safe_open", _LenientSafeOpen)
    assert torch.equal(TensorReader.from_file(path).get_rows("w", 1, 2), torch.tensor([[2.0, 3.0]]))


# --------------------------------------------------------------------------------------------
# memory: data reads leave no pages resident
# --------------------------------------------------------------------------------------------
def _resident_file_kib() -> int:
    """File-backed (and shared-memory, for a tmpfs) resident pages of this process, in KiB."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        name, _, value = line.partition(":")
        fields[name] = value.split()
    return int(fields["RssFile"][0]) + int(fields.get("RssShmem", ["0"])[0])


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="needs /proc/self/status")
def test_reading_every_tensor_leaves_no_file_pages_resident(tmp_path):
    if "RssFile" not in Path("/proc/self/status").read_text():
        pytest.skip("kernel does not report RssFile")
    path = tmp_path / "big.safetensors"
    save_file({f"t{i}": torch.full((1024, 1024), float(i)) for i in range(16)}, str(path))  # 64 MiB
    file_kib = path.stat().st_size // 1024

    reader = TensorReader.from_file(path)
    before = _resident_file_kib()
    for key in reader.keys():
        tensor = reader.get(key)
        assert float(tensor[-1, -1]) == float(key[1:])
        del tensor
    ours = _resident_file_kib() - before

    with safe_open(str(path), framework="pt") as handle:  # control: a memory map keeps what it touched
        before = _resident_file_kib()
        for key in handle.keys():
            tensor = handle.get_tensor(key)
            assert float(tensor.sum()) == float(key[1:]) * 1024 * 1024
            del tensor
        control = _resident_file_kib() - before

    assert control > 0.5 * file_kib, (control, file_kib)  # the measurement sees resident pages
    assert ours < 0.25 * file_kib, (ours, file_kib)


# -- vectored reads ----------------------------------------------------------------------------
def _offsets(path: Path) -> dict[str, list[int]]:
    """Each tensor's ``data_offsets`` from the file's header, read independently of `TensorReader`."""
    with open(path, "rb") as fh:
        (length,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(length))
    return {k: v["data_offsets"] for k, v in header.items() if k != "__metadata__"}


def _file_order(reader: TensorReader, keys) -> list[str]:
    """The keys in the order their data lies in the file."""
    offsets = _offsets(reader.files[0])
    return sorted(keys, key=lambda k: offsets[k][0])


def _runs(path: Path, keys) -> int:
    """How many runs of byte-adjacent, non-empty tensors the request ``keys`` (in its order) has."""
    offsets = _offsets(path)
    runs, end = 0, None
    for key in keys:
        begin, stop = offsets[key]
        if begin == stop:
            continue
        runs += begin != end
        end = stop
    return runs


def _read_all(reader: TensorReader, items) -> None:
    for read in reader.read_plan(items):
        read()


def _buffers(reader, keys):
    return [(k, torch.empty(math.prod(reader.shape(k)), dtype=reader.dtype(k))) for k in keys]


def test_read_plan_equals_get_and_coalesces_adjacent_tensors(tmp_path, monkeypatch):
    """Tensors back to back in the file are read by one ``preadv`` into all their buffers; the values
    equal `get` bit for bit, in any order of the request (a gap or a reversal starts a new call)."""
    state = {f"t{i}": torch.randn(3 + i, 5, dtype=torch.float64 if i % 2 else torch.float32) for i in range(6)}
    state["empty"] = torch.empty(0, 4)
    save_file(state, str(tmp_path / "t.safetensors"))
    reader = TensorReader.from_file(tmp_path / "t.safetensors")
    calls = []
    real = os.preadv
    monkeypatch.setattr(
        safetensors_file_mod.os, "preadv", lambda fd, bufs, off: calls.append(len(bufs)) or real(fd, bufs, off)
    )
    order = _file_order(reader, state)
    assert _runs(reader.files[0], order) == 1 and _runs(reader.files[0], order[::-1]) == 6
    for keys in (order, order[::-1], order[::2], order[1:4]):
        expected_calls = _runs(reader.files[0], keys)
        calls.clear()
        items = _buffers(reader, keys)
        reads = reader.read_plan(items)
        assert not calls  # planned, not yet read
        for read in reads:
            read()
        for key, out in items:
            assert _same(out, state[key].reshape(-1)), key
        assert len(calls) == expected_calls, (keys, calls)


def test_read_plan_resumes_short_reads_across_buffers(tmp_path, monkeypatch):
    """A vectored read that returns short (here: 7 bytes at a time) is resumed at the exact byte, also in
    the middle of a buffer."""
    state = {f"t{i}": torch.randn(4, 3) for i in range(4)}
    save_file(state, str(tmp_path / "t.safetensors"))
    reader = TensorReader.from_file(tmp_path / "t.safetensors")
    real = os.preadv

    def short(fd, bufs, off):
        first = memoryview(bufs[0])[:7]
        return real(fd, [first], off)

    monkeypatch.setattr(safetensors_file_mod.os, "preadv", short)
    items = _buffers(reader, _file_order(reader, state))
    _read_all(reader, items)
    for key, out in items:
        assert _same(out, state[key].reshape(-1)), key


def test_read_plan_of_a_truncated_file_names_the_tensor_cut_short(tmp_path):
    path = tmp_path / "x.safetensors"
    save_file({"a": torch.ones(4, 4), "b": torch.ones(64, 64)}, str(path))
    reader = TensorReader.from_file(path)
    os.truncate(path, path.stat().st_size - 100)
    items = _buffers(reader, _file_order(reader, ["a", "b"]))
    with pytest.raises(InputError) as info:
        _read_all(reader, items)
    assert str(info.value) == f"{path}: b: file ends 100 bytes short of the data its header promises (truncated?)"


@pytest.mark.parametrize("mode", ["no-positional-reads", "dtype-not-mapped"])
def test_read_plan_falls_back_like_read_into(tmp_path, monkeypatch, mode):
    state = {"a": torch.randn(3, 2), "b": torch.randn(2, 2).bfloat16(), "c": torch.arange(5)}
    save_file(state, str(tmp_path / "t.safetensors"))
    reader = TensorReader.from_file(tmp_path / "t.safetensors")
    if mode == "dtype-not-mapped":
        monkeypatch.setattr(tensors_mod, "DTYPES", {k: v for k, v in tensors_mod.DTYPES.items() if k != "BF16"})
    else:
        monkeypatch.setattr(tensors_mod, "POSITIONAL_READS", False)
    items = [(k, torch.empty(v.numel(), dtype=v.dtype)) for k, v in state.items()]
    _read_all(reader, items)
    for key, out in items:
        assert _same(out, state[key].reshape(-1)), key
    assert reader.positional is (mode != "no-positional-reads")
