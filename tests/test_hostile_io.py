"""Hostile inputs and outputs for the foundation I/O: `TensorReader`, `atomic_output_dir`,
`check_output_dir`, `ShardedSafetensorsWriter` and `resolve_source`.

Every failure must be a specific `OrthoMergeError` subclass naming the file (and the tensor when
there is one); pickles are never executed; inputs are never modified; a failed or interrupted
write leaves neither the output directory nor a temporary sibling behind.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import pickletools
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from peft_orthomerge.errors import (
    InputError,
    NumericalError,
    OrthoMergeError,
    OutputError,
    UnsafeInputError,
)
from peft_orthomerge.sinks import output as output_mod
from peft_orthomerge.sinks.output import (
    ShardedSafetensorsWriter,
    atomic_output_dir,
    check_output_dir,
    finalize_shards,
)
from peft_orthomerge.sources.resolve import looks_like_repo_id, resolve_source
from peft_orthomerge.sources.tensors import TensorReader

REPO_ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def _good_file(path: Path) -> bytes:
    save_file({"a": torch.randn(4, 3), "b": torch.arange(6, dtype=torch.float32).reshape(2, 3)}, str(path))
    return path.read_bytes()


def _split(raw: bytes) -> tuple[dict, bytes]:
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _join(header: dict, body: bytes) -> bytes:
    hb = json.dumps(header).encode()
    return struct.pack("<Q", len(hb)) + hb + body


def _read_all(path: Path) -> dict[str, torch.Tensor]:
    reader = TensorReader.from_file(path)
    return {k: reader.get(k) for k in reader.keys()}


def _tree_hash(root: Path) -> dict[str, str]:
    """Content hash and mode of every file under ``root`` (to prove inputs are untouched)."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest() + oct(p.stat().st_mode)
    return out


def _leftovers(parent: Path, name: str) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}."))


def _assert_one_line_naming(exc: OrthoMergeError, *parts: str) -> None:
    text = str(exc)
    assert "\n" not in text
    for part in parts:
        assert part in text, (part, text)


class Evil:
    """Unpickling this runs ``open(marker, "w")``: proof of code execution if the marker appears."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


class EvilSystem:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


# --------------------------------------------------------------------------------------------
# corrupted safetensors
# --------------------------------------------------------------------------------------------
def test_good_file_round_trips(tmp_path):
    path = tmp_path / "good.safetensors"
    _good_file(path)
    data = _read_all(path)
    assert set(data) == {"a", "b"} and data["b"].shape == (2, 3)


@pytest.mark.parametrize(
    "mutate",
    [
        pytest.param(lambda raw: raw[:-10], id="truncated-body"),
        pytest.param(lambda raw: raw[:20], id="truncated-header"),
        pytest.param(lambda raw: raw[:4], id="shorter-than-length-prefix"),
        pytest.param(lambda raw: os.urandom(256), id="random-bytes"),
        pytest.param(lambda raw: struct.pack("<Q", 2**62) + b"{}", id="header-length-huge"),
        pytest.param(lambda raw: struct.pack("<Q", 5) + b"{{{{{", id="header-not-json"),
        pytest.param(lambda raw: struct.pack("<Q", 2) + b"[]", id="header-is-a-list"),
        pytest.param(lambda raw: b"PK\x03\x04" + raw[4:], id="zip-magic"),
        pytest.param(lambda raw: raw + b"\x00" * 7, id="trailing-garbage"),
    ],
)
def test_corrupted_safetensors_is_input_error(tmp_path, mutate):
    good = tmp_path / "good.safetensors"
    bad = tmp_path / "adapter_model.safetensors"
    bad.write_bytes(mutate(_good_file(good)))
    with pytest.raises(InputError) as info:
        _read_all(bad)
    _assert_one_line_naming(info.value, str(bad))


@pytest.mark.parametrize(
    "field, value",
    [
        ("shape", [5, 3]),  # more elements than the bytes it owns
        ("shape", [-1, 3]),
        ("shape", [2**40, 2**40]),  # overflow
        ("dtype", "F64"),  # twice the bytes it owns
        ("dtype", "Q99"),  # unknown dtype
        ("data_offsets", [0, 10**12]),  # beyond the end of the file
        ("data_offsets", [40, 0]),  # reversed
        ("data_offsets", [8, 56]),  # shifted: leaves a hole, overlaps the next tensor
    ],
)
def test_header_that_lies_is_input_error(tmp_path, field, value):
    header, body = _split(_good_file(tmp_path / "good.safetensors"))
    header["a"] = dict(header["a"], **{field: value})
    bad = tmp_path / "lies.safetensors"
    bad.write_bytes(_join(header, body))
    with pytest.raises(InputError) as info:
        _read_all(bad)
    _assert_one_line_naming(info.value, str(bad))


def test_header_lie_consistent_with_bytes_is_visible_in_shape(tmp_path):
    """A header that relabels (4, 3) as (3, 4) cannot be detected from the file alone; the reader
    must then report the header's shape faithfully so that callers' shape checks see it."""
    header, body = _split(_good_file(tmp_path / "good.safetensors"))
    header["a"] = dict(header["a"], shape=[3, 4])
    bad = tmp_path / "relabelled.safetensors"
    bad.write_bytes(_join(header, body))
    reader = TensorReader.from_file(bad)
    assert reader.shape("a") == (3, 4) and reader.get("a").shape == (3, 4)


def test_zero_byte_file(tmp_path):
    empty = tmp_path / "adapter_model.safetensors"
    empty.write_bytes(b"")
    with pytest.raises(InputError) as info:
        TensorReader.from_dir(tmp_path, "adapter_model")
    _assert_one_line_naming(info.value, str(empty), "empty")


def test_missing_files(tmp_path):
    with pytest.raises(InputError) as info:
        TensorReader.from_dir(tmp_path, "adapter_model")
    _assert_one_line_naming(info.value, str(tmp_path), "adapter_model.safetensors")
    with pytest.raises(InputError):
        TensorReader.from_file(tmp_path / "nope.safetensors")
    (tmp_path / "dir.safetensors").mkdir()
    with pytest.raises(InputError):
        TensorReader.from_file(tmp_path / "dir.safetensors")


def test_unknown_tensor_name_is_input_error(tmp_path):
    path = tmp_path / "good.safetensors"
    _good_file(path)
    with pytest.raises(InputError) as info:
        TensorReader.from_file(path).get("not.there")
    _assert_one_line_naming(info.value, str(path), "not.there")


def test_corrupted_data_region_giving_nan_is_caught(tmp_path):
    """Bytes 0xFF in a float32 tensor decode as NaN: the reader refuses them by name."""
    header, body = _split(_good_file(tmp_path / "good.safetensors"))
    start, end = header["b"]["data_offsets"]
    body = body[:start] + b"\xff" * (end - start) + body[end:]
    bad = tmp_path / "nan.safetensors"
    bad.write_bytes(_join(header, body))
    reader = TensorReader.from_file(bad)
    reader.get("a")  # the intact tensor still reads
    with pytest.raises(NumericalError) as info:
        reader.get("b")
    _assert_one_line_naming(info.value, str(bad), "b")


# --------------------------------------------------------------------------------------------
# numbers
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_tensors_are_numerical_errors(tmp_path, dtype, bad):
    path = tmp_path / "x.safetensors"
    t = torch.zeros(3, 4, dtype=dtype)
    t[1, 2] = bad
    save_file({"layer.oft_R.weight": t, "ok": torch.ones(2, dtype=dtype)}, str(path))
    reader = TensorReader.from_file(path)
    assert torch.equal(reader.get("ok"), torch.ones(2, dtype=dtype))
    with pytest.raises(NumericalError) as info:
        reader.get("layer.oft_R.weight")
    _assert_one_line_naming(info.value, str(path), "layer.oft_R.weight")
    raw = reader.get("layer.oft_R.weight", check_finite=False)  # explicit opt-out returns the data
    assert not bool(torch.isfinite(raw.float()).all())


@pytest.mark.parametrize(
    "dtype, nan_bytes, ok_bytes",
    [
        ("F8_E4M3", b"\x7f", b"\x38"),
        ("F8_E5M2", b"\xff", b"\x3c"),
        ("F8_E4M3FNUZ", b"\x80", b"\x40"),  # torch.isfinite does not implement the fnuz types
        ("F8_E5M2FNUZ", b"\x80", b"\x40"),
        ("C64", struct.pack("<ff", float("nan"), 0.0), struct.pack("<ff", 1.0, 2.0)),
    ],
)
def test_non_finite_in_exotic_dtypes(tmp_path, dtype, nan_bytes, ok_bytes):
    """Found by fuzz/fuzz_adapter_reader.py: float8 fnuz tensors crashed the NaN check."""
    n = len(nan_bytes)
    header = {
        "bad": {"dtype": dtype, "shape": [2], "data_offsets": [0, 2 * n]},
        "good": {"dtype": dtype, "shape": [2], "data_offsets": [2 * n, 4 * n]},
    }
    path = tmp_path / "x.safetensors"
    path.write_bytes(_join(header, ok_bytes + nan_bytes + ok_bytes * 2))
    reader = TensorReader.from_file(path)
    assert reader.get("good").shape == (2,)
    with pytest.raises(NumericalError) as info:
        reader.get("bad")
    _assert_one_line_naming(info.value, str(path), "bad")


@pytest.mark.parametrize("dtype, shape, nbytes", [("F4", [4], 2), ("F4", [0, 8], 0), ("F6_E2M3", [4], 3)])
def test_sub_byte_dtypes_are_refused(tmp_path, dtype, shape, nbytes):
    """Found by fuzz/fuzz_adapter_reader.py: torch packs F4 two values per element, so the loaded
    tensor's shape disagreed with the header's (which every shape check reads)."""
    path = tmp_path / "packed.safetensors"
    path.write_bytes(_join({"x": {"dtype": dtype, "shape": shape, "data_offsets": [0, nbytes]}}, b"\x11" * nbytes))
    reader = TensorReader.from_file(path)
    for call in (reader.shape, reader.get):
        with pytest.raises(InputError) as info:
            call("x")
        _assert_one_line_naming(info.value, str(path), "x")


def test_zero_size_and_integer_tensors_read(tmp_path):
    path = tmp_path / "x.safetensors"
    save_file(
        {
            "empty": torch.zeros(0, 5),
            "empty3": torch.zeros(2, 0, 3, dtype=torch.bfloat16),
            "ints": torch.tensor([1, 2]),
        },
        str(path),
    )
    reader = TensorReader.from_file(path)
    assert reader.shape("empty") == (0, 5) and reader.get("empty").shape == (0, 5)
    assert reader.get("empty3").shape == (2, 0, 3) and reader.get("empty3").dtype == torch.bfloat16
    assert reader.get("ints").tolist() == [1, 2]


# --------------------------------------------------------------------------------------------
# shard indexes
# --------------------------------------------------------------------------------------------
def _sharded(directory: Path, index) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    save_file({"a": torch.ones(2)}, str(directory / "model-00001-of-00002.safetensors"))
    save_file({"b": torch.ones(3)}, str(directory / "model-00002-of-00002.safetensors"))
    path = directory / "model.safetensors.index.json"
    if isinstance(index, bytes):
        path.write_bytes(index)
    elif isinstance(index, str):
        path.write_text(index)
    else:
        path.write_text(json.dumps(index))
    return path


GOOD_MAP = {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}


def test_good_index(tmp_path):
    _sharded(tmp_path / "m", {"metadata": {}, "weight_map": GOOD_MAP})
    reader = TensorReader.from_dir(tmp_path / "m", "model")
    assert sorted(reader.keys()) == ["a", "b"] and reader.get("b").shape == (3,)


@pytest.mark.parametrize(
    "index",
    [
        pytest.param("{not json", id="invalid-json"),
        pytest.param(b"\xff\xfe{", id="not-utf8"),
        pytest.param("[]", id="list"),
        pytest.param("null", id="null"),
        pytest.param("{}", id="no-weight-map"),
        pytest.param({"weight_map": "abc"}, id="weight-map-string"),
        pytest.param({"weight_map": ["a"]}, id="weight-map-list"),
        pytest.param({"weight_map": {}}, id="weight-map-empty"),
        pytest.param({"weight_map": {"a": 5}}, id="file-name-int"),
        pytest.param({"weight_map": {"a": None}}, id="file-name-null"),
        pytest.param({"weight_map": {"a": ""}}, id="file-name-empty"),
        pytest.param("[" * 100_000 + "]" * 100_000, id="deeply-nested"),
        pytest.param({"weight_map": {**GOOD_MAP, "ghost": GOOD_MAP["a"]}}, id="tensor-not-in-its-shard"),
        pytest.param({"weight_map": {"a": GOOD_MAP["a"], "b": GOOD_MAP["a"]}}, id="tensor-in-wrong-shard"),
        pytest.param({"weight_map": {"a": "nope.safetensors"}}, id="missing-shard"),
    ],
)
def test_bad_index_is_input_error(tmp_path, index):
    path = _sharded(tmp_path / "m", index)
    with pytest.raises(InputError) as info:
        TensorReader.from_dir(tmp_path / "m", "model")
    assert "\n" not in str(info.value)
    assert str(path) in str(info.value) or str(tmp_path / "m") in str(info.value)


@pytest.mark.parametrize(
    "target", ["../outside.safetensors", "ABS", "sub/../../outside.safetensors", "sub/x.safetensors", "."]
)
def test_index_pointing_outside_its_directory(tmp_path, target):
    outside = tmp_path / "outside.safetensors"
    save_file({"secret": torch.ones(1)}, str(outside))
    (tmp_path / "m" / "sub").mkdir(parents=True)
    save_file({"a": torch.ones(1)}, str(tmp_path / "m" / "sub" / "x.safetensors"))
    name = str(outside) if target == "ABS" else target
    index = _sharded(tmp_path / "m", {"weight_map": {"a": name}})
    with pytest.raises(InputError) as info:
        TensorReader.from_dir(tmp_path / "m", "model")
    _assert_one_line_naming(info.value, str(index))


def test_same_tensor_in_two_shards(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    save_file({"a": torch.ones(2)}, str(d / "model-00001-of-00002.safetensors"))
    save_file({"a": torch.zeros(2)}, str(d / "model-00002-of-00002.safetensors"))
    with pytest.raises(InputError) as info:
        TensorReader.from_dir(d, "model")  # no index: shards found by name
    _assert_one_line_naming(info.value, "a", "two files")


# --------------------------------------------------------------------------------------------
# pickle: refused by default, weights_only when opted in, payload never executed
# --------------------------------------------------------------------------------------------
def _write_malicious(directory: Path, fmt: str, marker: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    if fmt == "legacy-bin":
        path = directory / "adapter_model.bin"
        with open(path, "wb") as fh:
            pickle.dump({"w": EvilSystem(marker)}, fh)
    elif fmt == "torch-zip-pt":
        path = directory / "adapter_model.pt"
        torch.save({"w": Evil(marker)}, path)
    else:  # a tensor dict whose pickle stream smuggles a call among real tensors
        path = directory / "adapter_model.bin"
        torch.save({"w": torch.ones(2), "x": Evil(marker)}, path)
    return path


@pytest.mark.parametrize("fmt", ["legacy-bin", "torch-zip-pt", "mixed-bin"])
def test_malicious_pickle_payload_is_never_executed(tmp_path, fmt):
    marker = tmp_path / "PWNED"
    path = _write_malicious(tmp_path / "adapter", fmt, marker)
    before = _tree_hash(tmp_path / "adapter")

    with pytest.raises(UnsafeInputError) as info:  # default: refused without opening
        TensorReader.from_dir(tmp_path / "adapter", "adapter_model")
    _assert_one_line_naming(info.value, str(path), "pickle")
    with pytest.raises(UnsafeInputError):
        TensorReader.from_file(path)
    assert not marker.exists()

    with pytest.raises(UnsafeInputError) as info:  # opted in: weights_only refuses the payload
        TensorReader.from_dir(tmp_path / "adapter", "adapter_model", allow_pickle=True)
    _assert_one_line_naming(info.value, str(path), "weights_only=True")
    assert len(str(info.value)) < 400
    assert not marker.exists()
    assert _tree_hash(tmp_path / "adapter") == before


def test_malicious_pickle_payload_is_live(tmp_path):
    """Guard for the test above: the file really calls ``os.system("touch marker")`` when unpickled,
    so the marker's absence there means the payload was blocked. Checked statically, from the
    pickle's opcodes, so that no test ever unpickles it."""
    marker = tmp_path / "PWNED"
    path = _write_malicious(tmp_path / "adapter", "legacy-bin", marker)
    args = [arg for _, arg, _ in pickletools.genops(path.read_bytes())]
    assert "system" in args or any(isinstance(a, str) and a.endswith(" system") for a in args), args
    assert f"touch {marker}" in args
    assert any(op.name == "REDUCE" for op, _, _ in pickletools.genops(path.read_bytes()))


def test_pickle_opt_in_reads_plain_tensor_dicts_only(tmp_path):
    d = tmp_path / "a"
    d.mkdir()
    torch.save({"w": torch.arange(3.0)}, d / "adapter_model.bin")
    reader = TensorReader.from_dir(d, "adapter_model", allow_pickle=True)
    assert torch.equal(reader.get("w"), torch.arange(3.0))
    for i, bad in enumerate([[torch.ones(1)], {"w": torch.ones(1), "n": 3}, {1: torch.ones(1)}]):
        path = tmp_path / f"bad{i}.pt"
        torch.save(bad, path)
        with pytest.raises(InputError):
            TensorReader.from_file(path, allow_pickle=True)
    nan = tmp_path / "nan.pt"
    torch.save({"w": torch.tensor([float("nan")])}, nan)
    with pytest.raises(NumericalError):
        TensorReader.from_file(nan, allow_pickle=True).get("w")


def test_pickle_with_safetensors_name_is_not_unpickled(tmp_path):
    marker = tmp_path / "PWNED"
    path = tmp_path / "adapter_model.safetensors"
    path.write_bytes(pickle.dumps({"w": EvilSystem(marker)}))
    with pytest.raises(InputError):
        _read_all(path)
    assert not marker.exists()


def test_safetensors_wins_over_pickle(tmp_path):
    marker = tmp_path / "PWNED"
    _write_malicious(tmp_path, "legacy-bin", marker)
    save_file({"w": torch.ones(2)}, str(tmp_path / "adapter_model.safetensors"))
    reader = TensorReader.from_dir(tmp_path, "adapter_model", allow_pickle=True)
    assert reader.keys() == ["w"] and not marker.exists()


# --------------------------------------------------------------------------------------------
# output directory checks
# --------------------------------------------------------------------------------------------
@pytest.fixture
def an_input(tmp_path) -> Path:
    d = tmp_path / "input"
    d.mkdir()
    save_file({"w": torch.ones(4)}, str(d / "adapter_model.safetensors"))
    (d / "adapter_config.json").write_text("{}")
    return d


def test_output_exists_and_not_empty(tmp_path, an_input):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(OutputError) as info:
        check_output_dir(out, inputs=[an_input])
    _assert_one_line_naming(info.value, str(out), "overwrite")
    with pytest.raises(OutputError):
        with atomic_output_dir(out, inputs=[an_input]):
            pytest.fail("must not be entered")
    assert (out / "keep.txt").read_text() == "precious"
    assert _leftovers(tmp_path, "out") == []
    (tmp_path / "empty").mkdir()
    assert check_output_dir(tmp_path / "empty") == (tmp_path / "empty").resolve()  # empty dir: fine


def test_output_is_a_file(tmp_path):
    f = tmp_path / "out"
    f.write_text("x")
    for overwrite in (False, True):
        with pytest.raises(OutputError):
            check_output_dir(f, overwrite=overwrite)
    with pytest.raises(OutputError):
        check_output_dir(f / "sub")  # a parent is a file
    assert f.read_text() == "x"


@pytest.mark.parametrize("where", ["equal", "inside", "inside-via-dotdot", "contains", "symlink-to-input"])
@pytest.mark.parametrize("overwrite", [False, True])
def test_output_equal_to_inside_or_containing_an_input(tmp_path, an_input, where, overwrite):
    before = _tree_hash(tmp_path)
    if where == "equal":
        out = an_input
    elif where == "inside":
        out = an_input / "merged"
    elif where == "inside-via-dotdot":
        out = tmp_path / "elsewhere" / ".." / "input" / "merged"
    elif where == "contains":
        out = tmp_path
    else:
        out = tmp_path / "link"
        out.symlink_to(an_input, target_is_directory=True)
        before = _tree_hash(tmp_path)
    with pytest.raises(OutputError) as info:
        with atomic_output_dir(out, inputs=[str(an_input)], overwrite=overwrite) as tmp:
            (tmp / "adapter_model.safetensors").write_text("clobbered")
    assert "input" in str(info.value)
    assert _tree_hash(tmp_path) == before
    assert not list(tmp_path.rglob(".*.tmp-*"))


@pytest.mark.parametrize("name", ["nul\x00byte", "~no-such-user-xyz/out", "loop/out", "loop"])
def test_invalid_output_paths(tmp_path, name):
    (tmp_path / "loop").symlink_to("loop")
    with pytest.raises(OutputError) as info:
        with atomic_output_dir(tmp_path / name if not name.startswith("~") else name):
            pytest.fail("must not be entered")
    assert "invalid output path" in str(info.value) and "\n" not in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loop"]


def test_invalid_input_references(tmp_path):
    for ref in ["nul\x00byte", "~no-such-user-xyz/adapter", "org/name\x00"]:
        with pytest.raises(InputError):
            resolve_source(ref)


def test_parent_not_writable(tmp_path, monkeypatch):
    """Root can write anywhere, so simulate a read-only parent through ``os.access``."""
    ro = tmp_path / "ro"
    ro.mkdir()
    real_access = os.access
    monkeypatch.setattr(
        os, "access", lambda p, mode, *a, **k: False if Path(p) == ro else real_access(p, mode, *a, **k)
    )
    with pytest.raises(OutputError) as info:
        with atomic_output_dir(ro / "new" / "out"):
            pytest.fail("must not be entered")
    _assert_one_line_naming(info.value, str(ro))
    assert list(ro.iterdir()) == []


@pytest.mark.skipif(not Path("/sys/kernel").is_dir(), reason="needs a sysfs mount as a real unwritable directory")
def test_really_unwritable_location_even_for_root():
    """sysfs refuses mkdir even for root (os.access says yes): creation failure is an OutputError."""
    target = Path("/sys/peft-orthomerge-test-output")
    with pytest.raises(OutputError):
        with atomic_output_dir(target):
            pytest.fail("must not be entered")
    assert not target.exists()


# --------------------------------------------------------------------------------------------
# failures while writing: disk full, interrupts, failed commit
# --------------------------------------------------------------------------------------------
def _merge_like(inputs: list[Path], out: Path, *, fail_after: int, exc: BaseException, overwrite=False, **writer_kw):
    """Read every tensor of every input and write sums through the sharded writer; raise ``exc``
    after ``fail_after`` tensors (a stand-in for a merge interrupted half-way)."""
    readers = [TensorReader.from_dir(p, "adapter_model") for p in inputs]
    with atomic_output_dir(out, inputs=inputs, overwrite=overwrite) as tmp:
        writer = ShardedSafetensorsWriter(tmp, prefix="adapter_model", **writer_kw)
        for i, key in enumerate(readers[0].keys()):
            if i == fail_after:
                raise exc
            writer.add(key, sum(r.get(key) for r in readers))
        finalize_shards(tmp, writer.close(), prefix="adapter_model")
        (tmp / "adapter_config.json").write_text("{}")


@pytest.fixture
def two_inputs(tmp_path) -> list[Path]:
    dirs = []
    for j in range(2):
        d = tmp_path / f"in{j}"
        d.mkdir()
        save_file({f"t{i}": torch.full((64,), float(i + j)) for i in range(6)}, str(d / "adapter_model.safetensors"))
        (d / "adapter_config.json").write_text(json.dumps({"peft_type": "OFT"}))
        dirs.append(d)
    return dirs


def test_successful_write_for_reference(tmp_path, two_inputs):
    out = tmp_path / "out"
    _merge_like(two_inputs, out, fail_after=-1, exc=RuntimeError(), max_shard_bytes=600)
    reader = TensorReader.from_dir(out, "adapter_model")
    assert len(reader.keys()) == 6 and torch.equal(reader.get("t3"), torch.full((64,), 7.0))
    assert (out / "adapter_model.safetensors.index.json").is_file()
    assert _leftovers(tmp_path, "out") == []


@pytest.mark.parametrize(
    "exc, expected",
    [
        (KeyboardInterrupt(), KeyboardInterrupt),
        (OSError(errno.ENOSPC, "No space left on device"), OutputError),
        (RuntimeError("bug"), RuntimeError),
        (NumericalError("nan", tensor="t2"), NumericalError),
    ],
)
def test_interrupted_merge_leaves_nothing(tmp_path, two_inputs, exc, expected):
    before = {p.name: _tree_hash(p) for p in two_inputs}
    out = tmp_path / "out"
    with pytest.raises(expected):
        _merge_like(two_inputs, out, fail_after=3, exc=exc, max_shard_bytes=600)  # after a shard was flushed
    assert not out.exists()
    assert _leftovers(tmp_path, "out") == []
    assert {p.name: _tree_hash(p) for p in two_inputs} == before


def test_disk_full_inside_safetensors_write(tmp_path, two_inputs, monkeypatch):
    """The writer's ``save_file`` writes half a shard and then fails with ENOSPC."""
    real_save = output_mod.save_file
    calls = []

    def full_disk(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 2:
            Path(filename).write_bytes(b"\x00" * 100)  # a partial file on disk
            raise OSError(errno.ENOSPC, "No space left on device", filename)
        return real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(output_mod, "save_file", full_disk)
    before = {p.name: _tree_hash(p) for p in two_inputs}
    out = tmp_path / "out"
    with pytest.raises(OutputError) as info:
        _merge_like(two_inputs, out, fail_after=-1, exc=RuntimeError(), max_shard_bytes=600)
    assert len(calls) == 2
    _assert_one_line_naming(info.value, str(out), "No space left")
    assert not out.exists() and _leftovers(tmp_path, "out") == []
    assert {p.name: _tree_hash(p) for p in two_inputs} == before


@pytest.mark.parametrize("exc", [KeyboardInterrupt(), OSError(errno.ENOSPC, "No space left on device")])
def test_failed_overwrite_keeps_previous_output(tmp_path, two_inputs, exc):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("previous result")
    with pytest.raises((KeyboardInterrupt, OutputError)):
        _merge_like(two_inputs, out, fail_after=2, exc=exc, overwrite=True)
    assert [p.name for p in out.iterdir()] == ["old.txt"]
    assert _leftovers(tmp_path, "out") == []


def test_overwrite_replaces_atomically(tmp_path, two_inputs):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("previous result")
    _merge_like(two_inputs, out, fail_after=-1, exc=RuntimeError(), overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert _leftovers(tmp_path, "out") == []


@pytest.mark.parametrize("exc", [OSError(errno.EXDEV, "rename failed"), KeyboardInterrupt()])
def test_failure_while_committing_restores_previous_output(tmp_path, two_inputs, monkeypatch, exc):
    """The final rename of the temporary directory fails (or Ctrl-C lands there): the previous
    output is put back and nothing else remains."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("previous result")
    real_rename = Path.rename

    def rename(self, target):
        if ".out.tmp-" in self.name:
            raise exc
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises((OutputError, KeyboardInterrupt)):
        _merge_like(two_inputs, out, fail_after=-1, exc=RuntimeError(), overwrite=True)
    monkeypatch.undo()
    assert [p.name for p in out.iterdir()] == ["old.txt"]
    assert (out / "old.txt").read_text() == "previous result"
    assert _leftovers(tmp_path, "out") == []


def test_writer_refuses_duplicate_tensor(tmp_path):
    with pytest.raises(OutputError) as info:
        with atomic_output_dir(tmp_path / "out") as tmp:
            writer = ShardedSafetensorsWriter(tmp)
            writer.add("x", torch.ones(1))
            writer.add("x", torch.ones(1))
    _assert_one_line_naming(info.value, "x", "twice")
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path, "out") == []


# --------------------------------------------------------------------------------------------
# resolve_source: traversal, offline Hub, local Hub cache
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "ref",
    [
        "org/..",
        "../org",
        "org/../x",
        "..",
        "org/a..b",
        "org/.hidden",
        "org/name/extra",
        "/org/name",
        "org--x/name",
        "org/na me",
        "órg/name",
        "",
    ],
)
def test_bad_repo_ids_are_rejected_without_touching_the_hub(tmp_path, monkeypatch, ref):
    import huggingface_hub

    monkeypatch.chdir(tmp_path)
    called = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: called.append(a) or str(tmp_path))
    assert not looks_like_repo_id(ref)
    if Path(ref).exists():  # '' and '..' are local directories: the user's own choice of path
        return
    with pytest.raises(InputError):
        resolve_source(ref)
    assert called == []


@pytest.mark.parametrize("revision", ["../../etc", "main/../../x", "/abs", "a\\..\\b", ""])
def test_revision_traversal_is_rejected(monkeypatch, tmp_path, revision):
    import huggingface_hub

    called = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: called.append(k) or str(tmp_path))
    with pytest.raises(InputError):
        resolve_source("org/name", revision=revision)
    assert called == []


def test_good_repo_ids():
    for ref in ["org/name", "Org-1/my.model_v2", "a/b"]:
        assert looks_like_repo_id(ref)


def test_local_path_that_is_a_file(tmp_path):
    f = tmp_path / "adapter_model.safetensors"
    f.write_text("x")
    with pytest.raises(InputError):
        resolve_source(f)


def _run_resolve(cache: Path, code: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(
        HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(cache), HF_HOME=str(cache.parent / "hf_home"), PYTHONPATH=str(REPO_ROOT)
    )
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True, timeout=120
    )


def test_unreachable_hub_id_offline_is_input_error(tmp_path):
    proc = _run_resolve(
        tmp_path / "hub",
        """
        from peft_orthomerge.errors import InputError
        from peft_orthomerge.sources.resolve import resolve_source
        try:
            resolve_source("some-org/does-not-exist")
        except InputError as exc:
            print("INPUTERROR", exc)
        """,
    )
    assert proc.returncode == 0, proc.stderr
    assert "INPUTERROR some-org/does-not-exist" in proc.stdout
    assert "Traceback" not in proc.stderr


def test_local_hub_cache_layout_resolves_offline(tmp_path):
    """A snapshot laid out as huggingface_hub caches it (blobs + symlinks, refs/main) resolves with
    HF_HUB_OFFLINE=1, and its safetensors files read through the symlinks."""
    cache = tmp_path / "hub"
    repo = cache / "models--org--oft-math"
    rev = "0123456789abcdef0123456789abcdef01234567"
    snap = repo / "snapshots" / rev
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(rev)
    save_file({"w": torch.arange(4.0)}, str(repo / "blobs" / "sha-weights"))
    (repo / "blobs" / "sha-config").write_text(json.dumps({"peft_type": "OFT"}))
    (snap / "adapter_model.safetensors").symlink_to(Path("../../blobs/sha-weights"))
    (snap / "adapter_config.json").symlink_to(Path("../../blobs/sha-config"))
    proc = _run_resolve(
        cache,
        """
        from peft_orthomerge.sources.resolve import resolve_source
        from peft_orthomerge.sources.tensors import TensorReader
        d = resolve_source("org/oft-math", allow_patterns=["*.json", "*.safetensors"])
        r = TensorReader.from_dir(d, "adapter_model")
        print("DIR", d)
        print("VALUES", r.get("w").tolist())
        """,
    )
    assert proc.returncode == 0, proc.stderr
    assert f"DIR {snap.resolve().parent}/{rev}" in proc.stdout or f"DIR {snap}" in proc.stdout
    assert "VALUES [0.0, 1.0, 2.0, 3.0]" in proc.stdout
