"""Hostile and broken inputs to the OFT path (`merge_oft_checkpoints`, `merge_oft_adapters`).

Every failure is a specific `OrthoMergeError` naming the file (and the tensor where there is one),
nothing is written, inputs are untouched, and no output ever holds NaN/Inf. Successful edge cases
are checked against an independent dense float64 computation from the raw stored vectors.
"""

from __future__ import annotations

import errno
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from _hostile_utils import assert_names, assert_nothing_written, edit_config, pickle_only_copy, rewrite, tree_hash
from conftest import build_tiny_llama
from safetensors.torch import load_file, save_file

from peft_orthomerge import merge_oft_adapters, merge_oft_checkpoints
from peft_orthomerge.errors import (
    ConfigError,
    IncompatibleInputsError,
    InputError,
    NumericalError,
    OrthoMergeError,
    OutputError,
    UnsafeInputError,
)
from peft_orthomerge.sinks import output as output_mod

TARGETS = ["q_proj", "v_proj", "down_proj"]
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "legacy-oft-peft-0.15.2"


# --------------------------------------------------------------------------------------------
# independent reference
# --------------------------------------------------------------------------------------------
def dense_skew(vec: torch.Tensor, b: int) -> torch.Tensor:
    """Row k of ``vec`` fills the strict upper triangle of block k row by row; Q = U - U^T."""
    out = torch.zeros(vec.shape[0], b, b, dtype=torch.float64)
    rows, cols = [], []
    for i in range(b):
        for j in range(i + 1, b):
            rows.append(i)
            cols.append(j)
    out[:, rows, cols] = vec.double()
    return out - out.transpose(-2, -1)


def block_of(n: int) -> int:
    return next(b for b in range(2, 400) if b * (b - 1) // 2 == n)


def reference_orthomerge(
    stored: list[torch.Tensor], flags: list[bool], weights: list[float], out_flag: bool
) -> torch.Tensor:
    """Magnitude-corrected merge (module granularity) of raw stored vectors; returns the vector
    an adapter with ``use_cayley_neumann=out_flag`` must store."""
    b = block_of(stored[0].shape[-1])
    qs = [dense_skew(s, b) * (1.0 if f else -1.0) for s, f in zip(stored, flags)]  # canonical
    total = sum(w * q for w, q in zip(weights, qs))
    target = sum(w * float(torch.linalg.matrix_norm(q).square().sum().sqrt()) for w, q in zip(weights, qs))
    norm = float(torch.linalg.matrix_norm(total).square().sum().sqrt())
    merged = torch.zeros_like(total) if norm == 0 else total * (target / norm)
    iu = torch.triu_indices(b, b, 1)
    vec = merged[:, iu[0], iu[1]]
    return vec if out_flag else -vec


def oft_keys(tensors: dict[str, torch.Tensor]) -> list[str]:
    return sorted(k for k in tensors if k.endswith("oft_R.weight"))


# --------------------------------------------------------------------------------------------
# inputs (built with PEFT itself, on tiny local models)
# --------------------------------------------------------------------------------------------
def make_oft(
    base_dir: Path,
    out: Path,
    *,
    seed: int,
    flag: bool = True,
    block_size: int = 8,
    scale: float = 0.05,
    dtype: torch.dtype | None = None,
    targets=TARGETS,
    **config,
) -> Path:
    from peft import OFTConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base_dir),
        OFTConfig(oft_block_size=block_size, r=0, target_modules=targets, use_cayley_neumann=flag, **config),
    )
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "oft_R" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * scale)
    model.save_pretrained(out)
    if dtype is not None:
        file = out / "adapter_model.safetensors"
        save_file({k: v.to(dtype) for k, v in load_file(file).items()}, str(file))
    return out


@pytest.fixture(scope="module")
def lab(tmp_path_factory, tiny_base_dir):
    root = tmp_path_factory.mktemp("hostile_oft")
    small = root / "small_base"
    build_tiny_llama(seed=1, hidden_size=32, intermediate_size=96, num_attention_heads=2).save_pretrained(small)
    paths = {
        "base": tiny_base_dir,
        "small_base": small,
        "n1": make_oft(tiny_base_dir, root / "n1", seed=1, flag=True),
        "n2": make_oft(tiny_base_dir, root / "n2", seed=2, flag=True),
        "e3": make_oft(tiny_base_dir, root / "e3", seed=3, flag=False),
        "b4": make_oft(tiny_base_dir, root / "b4", seed=4, flag=True, block_size=4),
        "bf16": make_oft(tiny_base_dir, root / "bf16", seed=5, flag=True, dtype=torch.bfloat16),
        "other_base": make_oft(small, root / "other_base", seed=6, flag=True),
        "q_only": make_oft(tiny_base_dir, root / "q_only", seed=7, flag=True, targets=["q_proj"]),
    }
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    lora = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_base_dir), LoraConfig(r=4, target_modules=TARGETS))
    lora.save_pretrained(root / "lora")
    paths["lora"] = root / "lora"
    paths["root"] = root
    return paths


@pytest.fixture
def out(tmp_path) -> Path:
    return tmp_path / "merged"


def merged_vectors(out: Path) -> dict[str, torch.Tensor]:
    tensors = load_file(out / "adapter_model.safetensors")
    for k, v in tensors.items():
        assert torch.isfinite(v.float()).all(), k
    return tensors


# --------------------------------------------------------------------------------------------
# broken files
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "missing, named", [("adapter_config.json", "adapter_config.json"), ("adapter_model.safetensors", "adapter_model")]
)
def test_missing_adapter_file(lab, tmp_path, out, missing, named):
    bad = tmp_path / "incomplete"
    shutil.copytree(lab["n1"], bad)
    (bad / missing).unlink()
    with pytest.raises(InputError) as info:
        merge_oft_checkpoints([lab["n2"], bad], out)
    assert_names(info.value, str(bad), named)
    assert_nothing_written(out)


@pytest.mark.parametrize(
    "text", ["{not json", "", "[1, 2]", "null", '"OFT"', "\udcff".encode("utf-8", "surrogateescape").decode("latin-1")]
)
def test_invalid_config_json(lab, tmp_path, out, text):
    bad = tmp_path / "badjson"
    shutil.copytree(lab["n1"], bad)
    (bad / "adapter_config.json").write_text(text)
    with pytest.raises(InputError) as info:
        merge_oft_checkpoints([bad, lab["n2"]], out)
    assert_names(info.value, str(bad))
    assert_nothing_written(out)


@pytest.mark.parametrize("peft_type", ["BOFT", "FOO", "", None, 3, ["OFT"]])
def test_unknown_peft_type(lab, tmp_path, out, peft_type):
    bad = edit_config(lab["n1"], tmp_path / "unknown", lambda c: {**c, "peft_type": peft_type})
    with pytest.raises(IncompatibleInputsError) as info:
        merge_oft_checkpoints([bad, lab["n2"]], out)
    assert_names(info.value, str(bad))
    assert_nothing_written(out)


def test_peft_013_config_is_refused_with_advice(lab, tmp_path, out):
    def old(cfg):
        cfg = {k: v for k, v in cfg.items() if k != "oft_block_size"}
        cfg["peft_version"] = "0.13.2"
        return cfg

    bad = edit_config(lab["n1"], tmp_path / "old", old)
    with pytest.raises(IncompatibleInputsError) as info:
        merge_oft_checkpoints([bad], out)
    assert_names(info.value, str(bad), "0.13")
    assert_nothing_written(out)


def test_truncated_weights(lab, tmp_path, out):
    bad = tmp_path / "truncated"
    shutil.copytree(lab["n1"], bad)
    file = bad / "adapter_model.safetensors"
    file.write_bytes(file.read_bytes()[:-20])
    with pytest.raises(InputError) as info:
        merge_oft_checkpoints([bad, lab["n2"]], out)
    assert_names(info.value, str(file))
    assert_nothing_written(out)


def test_oft_tensor_with_impossible_length(lab, tmp_path, out):
    """n = 27 is not b(b-1)/2 for any b."""

    def corrupt(t):
        key = oft_keys(t)[0]
        return {**t, key: torch.zeros(t[key].shape[0], 27)}

    bad = rewrite(lab["n1"], tmp_path / "len27", corrupt)
    with pytest.raises(InputError) as info:
        merge_oft_checkpoints([bad], out)
    assert_names(info.value, str(bad), oft_keys(load_file(lab["n1"] / "adapter_model.safetensors"))[0])
    assert_nothing_written(out)


def _with_ghost_module(lab, tmp_path) -> Path:
    """n1 plus an OFT tensor for ``model.layers.0.mlp.ghost_proj``, a module the base does not have."""

    def extra(t):
        key = oft_keys(t)[0]
        ghost = key.replace("mlp.down_proj", "mlp.ghost_proj")
        assert ghost != key
        return {**t, ghost: t[key].clone()}

    return rewrite(lab["n1"], tmp_path / "ghost", extra)


def test_tensor_key_matching_no_module_of_the_base_fold(lab, tmp_path, out):
    bad = _with_ghost_module(lab, tmp_path)
    with pytest.raises(IncompatibleInputsError) as info:
        merge_oft_checkpoints([bad, lab["n2"]], out, fold_into=lab["base"])
    assert_names(info.value, str(bad), "ghost_proj")
    assert_nothing_written(out)


def test_tensor_key_matching_no_module_of_the_base_in_memory(lab, tmp_path):
    bad = _with_ghost_module(lab, tmp_path)
    with pytest.raises(IncompatibleInputsError) as info:
        merge_oft_adapters(build_tiny_llama(), [bad, lab["n2"]])
    assert_names(info.value, "ghost_proj")


def test_nan_in_adapter(lab, tmp_path, out):
    def poison(t):
        key = oft_keys(t)[1]
        v = t[key].clone()
        v[0, 0] = float("nan")
        return {**t, key: v}

    bad = rewrite(lab["n1"], tmp_path / "nan", poison)
    key = oft_keys(load_file(bad / "adapter_model.safetensors"))[1]
    for fold in (None, lab["base"]):
        with pytest.raises(NumericalError) as info:
            merge_oft_checkpoints([lab["n2"], bad], out, fold_into=fold)
        assert_names(info.value, str(bad), key)
        assert_nothing_written(out)


def test_pickle_only_adapter_refused_and_payload_never_runs(lab, tmp_path, out):
    marker = tmp_path / "PWNED"

    bad = pickle_only_copy(lab["n1"], tmp_path / "pickled", marker)
    with pytest.raises(UnsafeInputError) as info:
        merge_oft_checkpoints([bad], out)
    assert_names(info.value, "adapter_model.bin", "pickle")
    with pytest.raises(UnsafeInputError):
        merge_oft_checkpoints([bad], out, allow_pickle=True)
    assert not marker.exists()
    assert_nothing_written(out)


def test_benign_pickle_with_opt_in_equals_safetensors(lab, tmp_path, out):
    pk = tmp_path / "pickled"
    shutil.copytree(lab["n1"], pk)
    tensors = load_file(pk / "adapter_model.safetensors")
    (pk / "adapter_model.safetensors").unlink()
    torch.save(tensors, pk / "adapter_model.bin")
    merge_oft_checkpoints([pk, lab["n2"]], out, allow_pickle=True)
    merge_oft_checkpoints([lab["n1"], lab["n2"]], tmp_path / "ref")
    a, b = merged_vectors(out), merged_vectors(tmp_path / "ref")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------------------------
# compatibility
# --------------------------------------------------------------------------------------------
def test_lora_given_to_the_oft_path(lab, out):
    with pytest.raises(IncompatibleInputsError) as info:
        merge_oft_checkpoints([lab["n1"], lab["lora"]], out)
    assert_names(info.value, str(lab["lora"]), "merge_lora_adapters")
    assert_nothing_written(out)
    with pytest.raises(IncompatibleInputsError):
        merge_oft_adapters(build_tiny_llama(), [lab["lora"]])


def test_different_block_sizes(lab, out, tmp_path, tiny_base_dir):
    """Block sizes 8 and 4 merge at 8 (issue 13); a block_share adapter of another block size is refused."""
    merge_oft_checkpoints([lab["n1"], lab["b4"]], out)
    shared = make_oft(tiny_base_dir, tmp_path / "shared4", seed=9, block_size=4, block_share=True)
    with pytest.raises(IncompatibleInputsError) as info:
        merge_oft_checkpoints([lab["n1"], shared], tmp_path / "refused")
    assert_names(info.value, "block size", "block_share")
    assert str(shared) in str(info.value)
    assert_nothing_written(tmp_path / "refused")


def test_different_bases(lab, out):
    with pytest.raises(IncompatibleInputsError) as info:
        merge_oft_checkpoints([lab["n1"], lab["other_base"]], out)
    assert_nothing_written(out)
    assert "\n" not in str(info.value)
    with pytest.raises(IncompatibleInputsError):  # right shapes among themselves, wrong base
        merge_oft_checkpoints([lab["other_base"]], out, fold_into=lab["base"])
    assert_nothing_written(out)


def test_empty_list(out):
    for empty in ([], ()):
        with pytest.raises(ConfigError):
            merge_oft_checkpoints(empty, out)
        with pytest.raises(ConfigError):
            merge_oft_adapters(build_tiny_llama(), empty)
    assert_nothing_written(out)


@pytest.mark.parametrize(
    "weights", [[1.0], [1.0, -1.0], [0.0, 0.0], [1.0, float("nan")], [1.0, float("inf")], ["a", 1.0]]
)
def test_bad_weights(lab, out, weights):
    with pytest.raises(ConfigError):
        merge_oft_checkpoints([lab["n1"], lab["n2"]], out, weights=weights)
    assert_nothing_written(out)


@pytest.mark.parametrize(
    "option",
    [
        {"method": "nope"},
        {"granularity": "row"},
        {"cayley": "maybe"},
        {"scale": float("nan")},
        {"scale": "big"},
        {"method": "mean_r"},
    ],
)
def test_bad_options(lab, out, option):
    with pytest.raises(ConfigError):
        merge_oft_checkpoints([lab["n1"], lab["n2"]], out, **option)
    assert_nothing_written(out)


def test_different_flags_merge_with_conversion(lab, out):
    """Mixed use_cayley_neumann: merged in one convention, written with the exact flag, warned."""
    report = merge_oft_checkpoints([lab["n1"], lab["e3"]], out, weights=[3.0, 1.0])
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["use_cayley_neumann"] is False
    assert any("use_cayley_neumann" in w for w in report.warnings)
    a = load_file(lab["n1"] / "adapter_model.safetensors")
    e = load_file(lab["e3"] / "adapter_model.safetensors")
    got = merged_vectors(out)
    assert oft_keys(got) == oft_keys(a)
    for key in oft_keys(a):
        want = reference_orthomerge([a[key], e[key]], [True, False], [0.75, 0.25], out_flag=False)
        assert torch.allclose(got[key].double(), want, atol=1e-6, rtol=1e-5), key


def test_same_vectors_opposite_flags_cancel_to_identity(lab, tmp_path, out):
    """The same stored numbers under the two flags are opposite rotations: their mean is I."""
    twin = edit_config(lab["n1"], tmp_path / "twin", lambda c: {**c, "use_cayley_neumann": False})
    merge_oft_checkpoints([lab["n1"], twin], out)
    for key, value in merged_vectors(out).items():
        if key.endswith("oft_R.weight"):
            assert torch.count_nonzero(value) == 0, key


@pytest.mark.parametrize("n", [2, 3])
def test_duplicate_inputs_are_allowed_and_return_the_input(lab, out, n):
    """Duplicates are allowed (they are an implicit weight); N copies of one adapter return it."""
    merge_oft_checkpoints([lab["n1"]] * n, out)
    src = load_file(lab["n1"] / "adapter_model.safetensors")
    got = merged_vectors(out)
    for key in oft_keys(src):
        assert torch.allclose(got[key].double(), src[key].double(), atol=1e-7, rtol=1e-6), key


def test_duplicate_equals_weighting(lab, tmp_path, out):
    merge_oft_checkpoints([lab["n1"], lab["n1"], lab["n2"]], out)
    merge_oft_checkpoints([lab["n1"], lab["n2"]], tmp_path / "weighted", weights=[2, 1])
    a, b = merged_vectors(out), merged_vectors(tmp_path / "weighted")
    for key in oft_keys(a):
        assert torch.allclose(a[key], b[key], atol=1e-7), key


def test_module_targeted_by_one_adapter_only(lab, out):
    merge_oft_checkpoints([lab["q_only"], lab["n2"]], out)
    q = load_file(lab["q_only"] / "adapter_model.safetensors")
    n2 = load_file(lab["n2"] / "adapter_model.safetensors")
    got = merged_vectors(out)
    for key in oft_keys(n2):
        first = q.get(key, torch.zeros_like(n2[key]))
        want = reference_orthomerge([first, n2[key]], [True, True], [0.5, 0.5], out_flag=True)
        assert torch.allclose(got[key].double(), want, atol=1e-6, rtol=1e-5), key


# --------------------------------------------------------------------------------------------
# numbers
# --------------------------------------------------------------------------------------------
def test_mixed_dtypes_bf16_and_fp32(lab, out):
    merge_oft_checkpoints([lab["bf16"], lab["n2"]], out)
    b = load_file(lab["bf16"] / "adapter_model.safetensors")
    f = load_file(lab["n2"] / "adapter_model.safetensors")
    got = merged_vectors(out)
    for key in oft_keys(f):
        assert b[key].dtype == torch.bfloat16
        want = reference_orthomerge([b[key], f[key]], [True, True], [0.5, 0.5], out_flag=True)
        assert got[key].dtype in (torch.float32, torch.bfloat16)
        tol = 1e-2 if got[key].dtype == torch.bfloat16 else 1e-6
        assert torch.allclose(got[key].double(), want, atol=tol, rtol=tol), key


def test_all_zero_adapters_give_the_identity(lab, tmp_path, out):
    zero = lambda t: {k: torch.zeros_like(v) for k, v in t.items()}  # noqa: E731
    z1 = rewrite(lab["n1"], tmp_path / "z1", zero)
    z2 = rewrite(lab["e3"], tmp_path / "z2", zero)
    report = merge_oft_checkpoints([z1, z2], out)
    for key, value in merged_vectors(out).items():
        assert torch.count_nonzero(value) == 0, key
    for m in report.modules:
        assert m.magnitude_factor is None or math.isfinite(m.magnitude_factor)
        assert math.isfinite(m.merged_norm)
    folded = tmp_path / "folded"
    merge_oft_checkpoints([z1, z2], folded, fold_into=lab["base"])
    base = load_file(lab["base"] / "model.safetensors")
    for key, value in load_file(folded / "model.safetensors").items():
        assert torch.allclose(value, base[key], atol=1e-6), key


def test_exact_cancellation_gives_the_identity(lab, tmp_path, out):
    neg = rewrite(lab["n1"], tmp_path / "neg", lambda t: {k: -v for k, v in t.items()})
    report = merge_oft_checkpoints([lab["n1"], neg], out)
    for key, value in merged_vectors(out).items():
        assert torch.count_nonzero(value) == 0, key
    assert all(m.magnitude_factor is None or math.isfinite(m.magnitude_factor) for m in report.modules)
    json.dumps(json.loads((out / "orthomerge_report.json").read_text()), allow_nan=False)


def _huge_pair(lab, tmp_path, flag: bool, magnitude: float) -> tuple[Path, Path]:
    """Two adapters with entries ~``magnitude``: Cayley angles near pi (exact flag), or a Neumann
    series far outside its range of validity (whose rotation PEFT still builds)."""
    src = lab["n1"] if flag else lab["e3"]
    big1 = rewrite(src, tmp_path / "big1", lambda t: {k: v * (magnitude / 0.05) for k, v in t.items()})
    big2 = rewrite(
        src, tmp_path / "big2", lambda t: {k: torch.flip(v, [-1]) * (magnitude / 0.05) for k, v in t.items()}
    )
    return big1, big2


@pytest.mark.parametrize(
    "flag, magnitude",
    [(False, 1e2), (False, 1e4), (True, 1e2), (True, 1e4)],
)
def test_huge_rotations_adapter_export_never_gives_nan(lab, tmp_path, out, flag, magnitude):
    big1, big2 = _huge_pair(lab, tmp_path, flag, magnitude)
    try:
        merge_oft_checkpoints([big1, big2], out)
    except NumericalError as exc:
        assert_names(exc)
        assert_nothing_written(out)
    else:
        merged_vectors(out)
        json.loads((out / "orthomerge_report.json").read_text())


@pytest.mark.parametrize("flag", [False, True])
@pytest.mark.parametrize("magnitude", [1e2, 1e4])
def test_huge_rotations_folded_never_give_nan(lab, tmp_path, flag, magnitude):
    """Folding either stays finite or refuses with NumericalError; never writes NaN/Inf."""
    big1, big2 = _huge_pair(lab, tmp_path, flag, magnitude)
    folded = tmp_path / "folded"
    try:
        merge_oft_checkpoints([big1, big2], folded, fold_into=lab["base"])
    except NumericalError as exc:
        assert_names(exc)
        assert_nothing_written(folded)
    else:
        for key, value in load_file(folded / "model.safetensors").items():
            assert torch.isfinite(value).all(), key


@pytest.mark.parametrize("method", ["product_r", "mean_r"])
def test_half_turn_rotations_in_rotation_space_methods(lab, tmp_path, out, method):
    """Blocks rotated by nearly pi in one plane (1e7: 2e-7 short of it) give finite outputs, or an
    error that writes nothing; never NaN in the output. (Where the map is undefined to rounding:
    `test_an_undefined_inverse_cayley_map_names_the_module`.)"""

    def half_turn(t):
        res = {}
        for k, v in t.items():
            w = torch.zeros_like(v)
            w[:, 0] = 1e7  # Q's (0, 1) entry: Cayley angle 2*atan(1e7) ~ pi
            res[k] = w
        return res

    ht = rewrite(lab["e3"], tmp_path / "half", half_turn)
    kwargs = {"fold_into": lab["base"]} if method == "mean_r" else {}
    try:
        merge_oft_checkpoints([ht, ht], out, method=method, **kwargs)
    except NumericalError as exc:
        assert_names(exc)
        assert_nothing_written(out)
        return
    files = (
        [out / "adapter_model.safetensors"]
        if (out / "adapter_model.safetensors").exists()
        else sorted(out.glob("model*.safetensors"))
    )
    for file in files:
        for key, value in load_file(file).items():
            assert torch.isfinite(value).all(), key


def test_an_undefined_inverse_cayley_map_names_the_module(lab, tmp_path, out):
    """product_r of a half turn (in one plane of every block) and the identity is a half turn:
    its inverse Cayley map is undefined. The error names the module (the map itself does not
    know it) and nothing is written."""

    def half_turn(t):
        res = {}
        for k, v in t.items():
            w = torch.zeros_like(v)
            w[:, 0] = 1e12  # Q's (0, 1) entry: Cayley angle pi - 2e-12, a half turn to rounding
            res[k] = w
        return res

    ht = rewrite(lab["e3"], tmp_path / "half", half_turn)
    identity = rewrite(lab["e3"], tmp_path / "identity", lambda t: {k: torch.zeros_like(v) for k, v in t.items()})
    with pytest.raises(NumericalError, match="inverse Cayley map undefined") as info:
        merge_oft_checkpoints([ht, identity], out, method="product_r")
    assert info.value.tensor is not None and info.value.tensor.startswith("model.")
    assert_names(info.value, info.value.tensor)
    assert_nothing_written(out)


# --------------------------------------------------------------------------------------------
# output
# --------------------------------------------------------------------------------------------
def test_output_exists_equals_or_inside_an_input(lab, tmp_path):
    before = tree_hash(lab["n1"])
    for target in (lab["n1"], lab["n1"] / "merged"):
        for overwrite in (False, True):
            with pytest.raises(OutputError):
                merge_oft_checkpoints([lab["n1"], lab["n2"]], target, overwrite=overwrite)
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("keep")
    with pytest.raises(OutputError):
        merge_oft_checkpoints([lab["n1"], lab["n2"]], existing)
    assert (existing / "keep.txt").read_text() == "keep"
    with pytest.raises(OutputError):  # folded output inside the base
        merge_oft_checkpoints([lab["n1"]], lab["base"] / "folded", fold_into=lab["base"])
    assert tree_hash(lab["n1"]) == before


@pytest.mark.parametrize(
    "exc, expected",
    [(KeyboardInterrupt(), KeyboardInterrupt), (OSError(errno.ENOSPC, "No space left on device"), OutputError)],
)
@pytest.mark.parametrize("fold", [False, True])
def test_interrupted_merge_leaves_nothing(lab, out, monkeypatch, exc, expected, fold):
    """The writer fails (disk full) or Ctrl-C lands while writing: inputs untouched, no output. The
    folded export writes shards with ``save_file``, the adapter export streams its one file."""
    before = {k: tree_hash(lab[k]) for k in ("n1", "n2", "base")}
    real_save, real_write = output_mod.save_file, output_mod.StreamedSafetensorsFile.write

    def failing_save(tensors, filename, metadata=None):
        real_save(tensors, filename, metadata=metadata)  # a complete first file on disk, then the failure
        raise exc

    def failing_write(self, name, tensor):
        real_write(self, name, tensor)  # the first tensor's bytes on disk, then the failure
        raise exc

    monkeypatch.setattr(output_mod, "save_file", failing_save)
    monkeypatch.setattr(output_mod.StreamedSafetensorsFile, "write", failing_write)
    with pytest.raises(expected):
        merge_oft_checkpoints([lab["n1"], lab["n2"]], out, fold_into=lab["base"] if fold else None)
    assert_nothing_written(out)
    assert {k: tree_hash(lab[k]) for k in ("n1", "n2", "base")} == before


def test_ctrl_c_between_modules(lab, out, monkeypatch):
    import peft_orthomerge.ops.so_merge as so_merge

    real = so_merge.merge_module
    calls = []

    def interrupt_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(so_merge, "merge_module", interrupt_second)
    import peft_orthomerge.merge.oft as plan_mod

    monkeypatch.setattr(plan_mod, "merge_module", interrupt_second)
    with pytest.raises(KeyboardInterrupt):
        merge_oft_checkpoints([lab["n1"], lab["n2"]], out)
    assert len(calls) == 2
    assert_nothing_written(out)


def test_legacy_scaled_adapter_is_fold_only(tmp_path, out):
    scaled = FIXTURES / "legacy-oft-scaled"
    before = tree_hash(scaled)
    with pytest.raises(IncompatibleInputsError) as info:
        merge_oft_checkpoints([scaled], out)
    assert_names(info.value, str(scaled), "fold")
    assert_nothing_written(out)
    assert tree_hash(scaled) == before


# --------------------------------------------------------------------------------------------
# config values found by fuzzing the reader (fuzz/fuzz_adapter_reader.py)
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "patch",
    [
        {"num_cayley_neumann_terms": "five"},
        {"num_cayley_neumann_terms": None},
        {"oft_block_size": "eight"},
        {"r": "x"},
        {"coft": True, "eps": None},
        {"coft": True, "eps": "small"},
        {"num_cayley_neumann_terms": 0},
        {"num_cayley_neumann_terms": -3},
        {"use_cayley_neumann": "yes"},
        {"block_share": "no"},
        {"coft": True, "eps": -1.0},
        {"target_modules": 5},
    ],
)
def test_config_values_of_the_wrong_type(lab, tmp_path, out, patch):
    bad = edit_config(lab["n1"], tmp_path / "typed", lambda c: {**c, **patch})
    try:
        merge_oft_checkpoints([bad, lab["n2"]], out)
    except OrthoMergeError as exc:
        assert_names(exc, str(bad))
        assert_nothing_written(out)
    else:
        merged_vectors(out)


@pytest.mark.parametrize("coft", [False, True])
def test_oft_tensor_with_zero_blocks(lab, tmp_path, out, coft):
    def zero_rows(t):
        key = oft_keys(t)[0]
        return {**t, key: torch.zeros(0, t[key].shape[1])}

    bad = rewrite(lab["n1"], tmp_path / "zero_rows", zero_rows)
    bad = edit_config(bad, tmp_path / "zero_rows_cfg", lambda c: {**c, "coft": coft})
    with pytest.raises(InputError) as info:
        merge_oft_checkpoints([bad], out)
    assert_names(info.value, str(bad))
    assert_nothing_written(out)
