"""The fast paths of the OFT merge and fold against dense float64 references: float32 merging,
per-block norms, the batched block fold (every dtype / layout), and the orthogonality statistic."""

from __future__ import annotations

import json

import pytest
import torch
from _oft_utils import (
    make_oft_adapter,
    oft_modules,
    ref_canonical,
    ref_fold,
    ref_orthomerge,
    ref_peft_rotation,
    ref_skew,
)
from safetensors.torch import load_file

from peft_orthomerge import merge_oft_checkpoints
from peft_orthomerge.errors import ConfigError, NumericalError
from peft_orthomerge.ops import oft_fold as fold_mod
from peft_orthomerge.ops.oft_fold import fold_weight
from peft_orthomerge.ops.skew import block_norms
from peft_orthomerge.ops.so_merge import merge_module


def _vecs(count, r, b, *, dtype, std=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(r, b * (b - 1) // 2, generator=g, dtype=torch.float64) * std).to(dtype) for _ in range(count)]


def _rotations(r, b, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(r, b, b, generator=g, dtype=torch.float64))[0]


# -- merge in float32 --------------------------------------------------------------------------
@pytest.mark.parametrize("granularity", ["module", "block"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_float32_merge_matches_float64_reference(granularity, dtype):
    vecs = _vecs(4, 7, 8, dtype=dtype)
    weights = [0.1, 0.2, 0.3, 0.4]
    out = merge_module(vecs, weights, granularity=granularity, scale=0.8)
    assert out.vec.dtype == torch.float32
    exact = [v.double() for v in vecs]  # the reference sees the same (rounded) inputs
    expected = ref_orthomerge([ref_skew(v) for v in exact], weights, granularity) * 0.8
    torch.testing.assert_close(ref_skew(out.vec.double()), expected, rtol=1e-5, atol=1e-7)
    assert out.input_norms == pytest.approx([float(torch.linalg.vector_norm(ref_skew(v))) for v in exact], rel=1e-6)
    assert out.merged_norm == pytest.approx(float(torch.linalg.vector_norm(expected)), rel=1e-5)
    per_block = torch.linalg.matrix_norm(expected)
    torch.testing.assert_close(out.block_norms, per_block, rtol=1e-5, atol=1e-9)


def test_block_norms_survive_float32_overflow_and_flag_nan():
    vec = torch.full((2, 6), 1e30, dtype=torch.float32)
    norms = block_norms(vec)
    expected = torch.linalg.matrix_norm(ref_skew(vec.double()))
    torch.testing.assert_close(norms, expected, rtol=1e-6, atol=0)
    vec[1, 3] = float("nan")
    assert not bool(torch.isfinite(block_norms(vec)).all())


def test_nan_in_a_float32_adapter_names_file_and_tensor(tmp_path):
    src = make_oft_adapter(tmp_path / "a", seed=1)
    state = load_file(src / "adapter_model.safetensors")
    key = sorted(k for k in state if "oft_R" in k)[0]
    state[key][0, 0] = float("inf")
    from safetensors.torch import save_file

    save_file(state, str(src / "adapter_model.safetensors"))
    with pytest.raises(NumericalError) as info:
        merge_oft_checkpoints([src], tmp_path / "out")
    assert key in str(info.value) and str(src) in str(info.value)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_block_norms_of_a_stack_equal_each_slice_bit_for_bit():
    g = torch.Generator().manual_seed(0)
    stack = torch.randn(4, 7, 120, generator=g) * 0.03
    stack[2, 1] = 1e30  # this slice overflows float32 and is redone in float64, the others are not
    norms = block_norms(stack)
    for i in range(4):
        assert torch.equal(norms[i], block_norms(stack[i]))


def test_nan_in_a_later_adapter_names_its_file(tmp_path):
    from safetensors.torch import save_file

    good, bad = make_oft_adapter(tmp_path / "a", seed=1), make_oft_adapter(tmp_path / "b", seed=2, neumann=False)
    state = load_file(bad / "adapter_model.safetensors")
    key = sorted(k for k in state if "oft_R" in k)[-1]
    state[key][1, 2] = float("nan")
    save_file(state, str(bad / "adapter_model.safetensors"))
    with pytest.raises(NumericalError) as info:
        merge_oft_checkpoints([good, bad], tmp_path / "out")
    assert key in str(info.value) and str(bad) in str(info.value) and str(good) not in str(info.value)


def test_read_into_equals_get(tmp_path):
    from safetensors.torch import save_file

    from peft_orthomerge.sources.in_memory import DictSource
    from peft_orthomerge.sources.tensors import TensorReader

    state = {"a": torch.randn(3, 5), "b": torch.arange(6, dtype=torch.int64), "c": torch.randn(2, 2).bfloat16()}
    save_file(state, str(tmp_path / "t.safetensors"))
    reader = TensorReader.from_file(tmp_path / "t.safetensors")
    for source in (reader, DictSource(state, "mem")):
        for key, value in state.items():
            out = torch.empty(value.numel(), dtype=value.dtype)
            assert source.read_into(key, out) is out and torch.equal(out, value.reshape(-1))
    with pytest.raises(ValueError):
        reader.read_into("a", torch.empty(15, dtype=torch.float64))


def test_merged_adapter_file_is_byte_identical_to_save_file(tmp_path):
    """The streamed adapter file (modules, a pass-through ``modules_to_save`` copy) is what ``save_file``
    writes for its tensors."""
    from safetensors.torch import save_file

    inputs = [
        make_oft_adapter(tmp_path / f"a{i}", seed=i, modules_to_save=["lm_head"], perturb=0.01) for i in range(2)
    ]
    merge_oft_checkpoints(inputs, tmp_path / "out", cayley="exact")
    file = tmp_path / "out" / "adapter_model.safetensors"
    tensors = load_file(file)
    assert any("oft_R" not in k for k in tensors)
    save_file(tensors, str(tmp_path / "ref.safetensors"), metadata={"format": "pt"})
    assert file.read_bytes() == (tmp_path / "ref.safetensors").read_bytes()


# -- the streamed safetensors writer -----------------------------------------------------------
def _all_dtypes_tensors():
    from peft_orthomerge.sinks.output import StreamedSafetensorsFile

    g = torch.Generator().manual_seed(0)
    shapes = [(3,), (2, 5), (), (0, 4), (7, 1, 3)]
    tensors = {
        f'{"zb"[i % 2]}.layers.{i}.w\u00e9"\\\n': (torch.randn(shapes[i % 5], generator=g) * 10).to(dtype)
        for i, dtype in enumerate(StreamedSafetensorsFile.DTYPES)
    }
    tensors.update({"m.layers.10.x": torch.randn(4, 6), "m.layers.2.x": torch.randn(4, 6)})
    return tensors


@pytest.mark.parametrize("metadata", [None, {"format": "pt"}])
def test_streamed_file_is_byte_identical_to_save_file(tmp_path, metadata):
    from safetensors.torch import save_file

    from peft_orthomerge.sinks.output import StreamedSafetensorsFile

    tensors = _all_dtypes_tensors()
    save_file(tensors, str(tmp_path / "ref.safetensors"), metadata=metadata)
    specs = {k: (v.dtype, tuple(v.shape)) for k, v in tensors.items()}
    with StreamedSafetensorsFile(tmp_path / "out.safetensors", specs, metadata=metadata) as file:
        for key in reversed(list(tensors)):  # any order
            file.write(key, tensors[key])
    assert (tmp_path / "out.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()


def test_streamed_file_refuses_what_was_not_declared(tmp_path):
    from peft_orthomerge.errors import OutputError
    from peft_orthomerge.sinks.output import StreamedSafetensorsFile

    specs = {"a": (torch.float32, (2, 3)), "b": (torch.int64, (4,))}
    file = StreamedSafetensorsFile(tmp_path / "x.safetensors", specs)
    file.write("a", torch.zeros(2, 3))
    for name, tensor in (("a", torch.zeros(2, 3)), ("c", torch.zeros(1)), ("b", torch.zeros(4))):
        with pytest.raises(OutputError):  # twice, undeclared, wrong dtype
            file.write(name, tensor)
    with pytest.raises(OutputError, match="not written"):
        file.close()


# -- the block fold ----------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("kind", ["linear", "embedding"])
@pytest.mark.parametrize("shared", [False, True])
def test_fold_matches_dense_reference(monkeypatch, dtype, kind, shared):
    monkeypatch.setattr(fold_mod, "CHUNK_ELEMENTS", 1000)  # several row chunks for the converted dtypes
    b, groups, rows = 8, 6, 37
    weight = torch.randn(rows, groups * b, dtype=torch.float64).to(dtype)
    rotation = _rotations(1 if shared else groups, b)
    scale = torch.rand(rows, 1, dtype=torch.float64) + 0.5
    tol = {torch.float64: 1e-12, torch.float32: 1e-5}.get(dtype, 1e-2)
    for out_scale in (None, scale):
        got = fold_weight(weight, rotation, kind, out_scale=out_scale)
        expected = ref_fold(weight, rotation, kind) * (1 if out_scale is None else out_scale)
        assert got.dtype == dtype and got.shape == weight.shape
        assert float((got.double() - expected).abs().max()) <= tol * float(expected.abs().max())


def test_fold_conv_and_non_contiguous_weights():
    rotation = _rotations(1, 8)
    conv = torch.randn(5, 2, 2, 2, dtype=torch.float32)  # rotated dim: in * kh * kw = 8
    torch.testing.assert_close(
        fold_weight(conv, rotation, "linear").double(), ref_fold(conv, rotation), rtol=1e-5, atol=1e-6
    )
    wide = torch.randn(16, 40, dtype=torch.float32)[:, :32]
    blocks = _rotations(4, 8)
    torch.testing.assert_close(
        fold_weight(wide, blocks, "linear").double(), ref_fold(wide, blocks), rtol=1e-5, atol=1e-6
    )


# -- the orthogonality statistic ---------------------------------------------------------------
@pytest.fixture(scope="module")
def two_adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("ortho")
    return [
        make_oft_adapter(root / f"n{i}", seed=10 + i, neumann=True, magnitude=0.2, oft_block_size=8) for i in range(2)
    ]


def _reference_errors(out_dir) -> dict[str, torch.Tensor]:
    """Per module, ``||R_k^T R_k - I||_F`` per block of the rotations PEFT builds from the written adapter."""
    config = json.loads((out_dir / "adapter_config.json").read_text())
    errors = {}
    for name, (_, stored) in oft_modules(load_file(out_dir / "adapter_model.safetensors")).items():
        q = ref_skew(stored.double())
        rot = ref_peft_rotation(q, config["use_cayley_neumann"], config["num_cayley_neumann_terms"])
        eye = torch.eye(rot.shape[-1], dtype=torch.float64)
        errors[name] = (
            torch.linalg.matrix_norm(rot.transpose(-2, -1) @ rot - eye),
            torch.linalg.matrix_norm(ref_canonical(stored, True)),
        )
    return errors


@pytest.mark.parametrize("blocks", [None, 1, 3])
def test_orthogonality_error_is_measured_on_the_largest_blocks(two_adapters, tmp_path, blocks):
    out = tmp_path / "out"
    report = merge_oft_checkpoints(two_adapters, out, orthogonality_blocks=blocks)
    assert report.params["orthogonality_blocks"] == ("all" if blocks is None else blocks)
    reference = _reference_errors(out)
    assert {m.name for m in report.modules} == set(reference)
    for m in report.modules:
        errors, norms = reference[m.name]
        chosen = errors if blocks is None else errors[torch.topk(norms, min(blocks, len(norms))).indices]
        assert m.orthogonality_error == pytest.approx(float(chosen.max()), rel=1e-3, abs=2e-6)
        assert float(chosen.max()) > 1e-4  # the Neumann truncation error is well above float32 rounding here


@pytest.mark.parametrize("bad", [0, -2, True, 2.5, "3"])
def test_orthogonality_blocks_is_validated(two_adapters, tmp_path, bad):
    with pytest.raises(ConfigError):
        merge_oft_checkpoints(two_adapters, tmp_path / "out", orthogonality_blocks=bad)
    assert not (tmp_path / "out").exists()


def test_measured_blocks_are_chosen_by_norm_not_by_error(tmp_path):
    """Block 0 has the larger norm spread over 4 small angles, block 1 a smaller norm in one large
    angle (a larger Neumann error): the default statistic sees block 0 only, as documented."""
    from safetensors.torch import save_file

    src = make_oft_adapter(tmp_path / "a", seed=3, neumann=True, oft_block_size=8)
    state = load_file(src / "adapter_model.safetensors")
    key = sorted(k for k in state if "oft_R" in k)[0]
    q = torch.zeros(state[key].shape[0], 8, 8, dtype=torch.float64)
    for i in range(4):
        q[0, 2 * i, 2 * i + 1] = 0.3
    q[1, 0, 1] = 0.58
    q = q - q.transpose(-2, -1)
    rows, cols = torch.triu_indices(8, 8, 1)
    state[key] = q[:, rows, cols].float()
    save_file(state, str(src / "adapter_model.safetensors"))
    errors, norms = _reference_errors(src)[key[len("base_model.model.") : -len(".oft_R.weight")]]
    assert norms[0] > norms[1] and errors[1] > 5 * errors[0]
    name = key[len("base_model.model.") : -len(".oft_R.weight")]
    for blocks, expected in ((1, errors[0]), (2, errors[1]), (None, errors.max())):
        report = merge_oft_checkpoints([src], tmp_path / f"out{blocks}", orthogonality_blocks=blocks)
        stats = next(m for m in report.modules if m.name == name)
        assert stats.orthogonality_error == pytest.approx(float(expected), rel=1e-3)
