"""`merge_models`: streamed merge of full fine-tunes, reloaded with transformers, and bad input."""

from __future__ import annotations

import json

import pytest
import torch
from _lora_utils import (
    perturbed_state,
    single_thread,  # noqa: F401  (autouse fixture)
)
from conftest import build_tiny_llama
from safetensors.torch import load_file, save_file
from test_decouple_ops import ref_merge

from peft_orthomerge import MergeReport, merge_models
from peft_orthomerge.errors import ConfigError, IncompatibleInputsError, NumericalError, OutputError, UnsafeInputError
from peft_orthomerge.ops.decouple import decouple_merge
from peft_orthomerge.ops.registry import get_euclidean


def _save_expert(path, seed, dtype=torch.float32, shard=None, **overrides):
    model = build_tiny_llama(**overrides).to(dtype)
    model.load_state_dict(perturbed_state(model, seed))
    kwargs = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(path, **kwargs)
    return path


@pytest.fixture(scope="module")
def experts(tmp_path_factory):
    root = tmp_path_factory.mktemp("full")
    base = root / "base"
    build_tiny_llama().save_pretrained(base)
    return base, [
        _save_expert(root / "e1", 1),
        _save_expert(root / "e2", 2, shard="60KB"),
        _save_expert(root / "e3", 3),
    ]


def _load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).state_dict()


def _states(base, paths):
    return _load(base), [_load(p) for p in paths]


def test_reloaded_output_equals_in_memory_merge(experts, tmp_path):
    base, paths = experts
    weights = [0.5, 0.3, 0.2]
    out = tmp_path / "merged"
    report = merge_models(base, paths, out, weights, target="global", residual="ties")
    assert isinstance(report, MergeReport) and report.kind == "full"
    assert (out / "config.json").is_file() and (out / "README.md").is_file()
    assert MergeReport.from_json(out / "orthomerge_report.json").method == "orthomerge-global+ties"
    assert len(list(out.glob("*.safetensors"))) >= 1
    merged = _load(out)
    w0s, states = _states(base, paths)
    ties = get_euclidean("ties")
    n2d = 0
    for name, w0 in w0s.items():
        ws = [s[name] for s in states]
        if w0.dim() == 2:
            want, _ = decouple_merge(w0, ws, weights, "global", "ties", solver="svd")
            n2d += 1
        else:
            taus = [w.double() - w0.double() for w in ws]
            want = w0.double() + ties(taus, weights)
        assert merged[name].dtype == w0.dtype
        assert torch.allclose(merged[name].double(), want, atol=1e-6, rtol=0), name
    names = {m.name for m in report.modules}
    assert "model.embed_tokens.weight" in names and "lm_head.weight" in names
    assert len(report.modules) == n2d and "model.norm.weight" in report.passthrough
    extra = report.modules[0].extra
    assert {"task_vector_norm_2", "orth_part_norm_0", "residual_norm_1", "merged_delta_norm"} <= set(extra)


def test_conflict_target_against_independent_reference(experts, tmp_path):
    base, paths = experts
    merge_models(base, paths[:2], tmp_path / "m", target="conflict", include=r"layers\.0\.", solver="newton_schulz")
    merged = _load(tmp_path / "m")
    w0s, states = _states(base, paths[:2])
    for name, w0 in w0s.items():
        ws = [s[name] for s in states]
        if w0.dim() == 2 and "layers.0." in name:
            want = ref_merge(w0, ws, [0.5, 0.5], "conflict")
        else:  # not selected: Euclidean TA (the mean) on the task vectors
            want = w0.double() + 0.5 * (ws[0].double() - w0.double()) + 0.5 * (ws[1].double() - w0.double())
        assert torch.allclose(merged[name].double(), want, atol=1e-6, rtol=0), name


def test_bf16_tied_embeddings_and_exclude(tmp_path):
    base = tmp_path / "base"
    build_tiny_llama(tie_word_embeddings=True).to(torch.bfloat16).save_pretrained(base)
    paths = [_save_expert(tmp_path / f"e{i}", i, torch.bfloat16, tie_word_embeddings=True) for i in (1, 2)]
    assert "lm_head.weight" not in load_file(base / "model.safetensors")
    report = merge_models(base, paths, tmp_path / "out", exclude=["embed_tokens"], residual="dare_ta")
    assert "model.embed_tokens.weight" in report.passthrough
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model.dtype == torch.bfloat16
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    # DARE is seeded per tensor: a second run writes the same numbers
    merge_models(base, paths, tmp_path / "again", exclude=["embed_tokens"], residual="dare_ta")
    a, b = load_file(tmp_path / "out" / "model.safetensors"), load_file(tmp_path / "again" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_default_ta_streams_rows_and_matches_reference(experts, tmp_path, monkeypatch):
    """Global + TA (the default) reads decoupled weights by blocks of rows, never whole: a reader
    that refuses whole 2-D tensors, blocks of 5 rows, and the output still equals the independent
    dense reference, with the report's statistics."""
    from peft_orthomerge.ops.decouple import rows as decouple_rows
    from peft_orthomerge.sources.tensors import TensorReader

    base, paths = experts
    weights = [0.2, 0.5, 0.3]
    whole = TensorReader.get

    def refuse_matrices(self, key, **kw):
        tensor = whole(self, key, **kw)
        if tensor.dim() == 2 and 2 * tensor.shape[0] >= tensor.shape[1]:
            raise AssertionError(f"{key} was read whole")
        return tensor

    monkeypatch.setattr(TensorReader, "get", refuse_matrices)
    monkeypatch.setattr(decouple_rows, "BLOCK_BYTES", 5 * 64 * 8)
    report = merge_models(base, paths, tmp_path / "m", weights, residual_kwargs={"lam": 0.6})
    monkeypatch.undo()
    merged = _load(tmp_path / "m")
    w0s, states = _states(base, paths)
    for name, w0 in w0s.items():
        ws = [s[name] for s in states]
        if w0.dim() == 2:
            want = ref_merge(w0, ws, weights, "global", lam=0.6)
        else:
            want = w0.double() + 0.6 * 3 * sum(w * (x.double() - w0.double()) for w, x in zip(weights, ws))
        assert torch.allclose(merged[name].double(), want, atol=1e-6, rtol=0), name
    stats = {m.name: m for m in report.modules}
    q = "model.layers.0.self_attn.q_proj.weight"
    want_delta = ref_merge(w0s[q], [s[q] for s in states], weights, "global", lam=0.6) - w0s[q].double()
    assert stats[q].extra["merged_delta_norm"] == pytest.approx(float(want_delta.norm()), rel=1e-5)
    assert stats[q].extra["task_vector_norm_1"] == pytest.approx(
        float((states[1][q].double() - w0s[q].double()).norm()), rel=1e-6
    )


def test_merging_copies_of_base_returns_base(experts, tmp_path):
    base, _ = experts
    merge_models(base, [base, base], tmp_path / "same")
    got, want = _load(tmp_path / "same"), _load(base)
    assert all(torch.equal(got[k], want[k]) for k in want)


def _nothing_written(path):
    return not path.exists() and not list(path.parent.glob(f".{path.name}.tmp-*"))


def test_bad_inputs_write_nothing(experts, tmp_path):
    base, paths = experts
    out = tmp_path / "out"
    wide = _save_expert(tmp_path / "wide", 4, intermediate_size=96)
    with pytest.raises(IncompatibleInputsError, match="mlp.*shape mismatch"):
        merge_models(base, [paths[0], wide], out)
    assert _nothing_written(out)

    nan_dir = tmp_path / "nan"
    nan_dir.mkdir()
    (nan_dir / "config.json").write_text((base / "config.json").read_text())
    state = load_file(paths[0] / "model.safetensors")
    state["model.layers.1.mlp.up_proj.weight"][3, 3] = float("inf")
    save_file(state, nan_dir / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(NumericalError, match=r"model.safetensors: model\.layers\.1\.mlp\.up_proj\.weight"):
        merge_models(base, [paths[0], nan_dir], out)
    assert _nothing_written(out)

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((base / "config.json").read_text())
    torch.save(build_tiny_llama().state_dict(), pickled / "pytorch_model.bin")
    with pytest.raises(UnsafeInputError):
        merge_models(base, [paths[0], pickled], out)
    assert _nothing_written(out)
    merge_models(base, [pickled], out, allow_pickle=True)  # opt-in, weights_only=True
    assert (out / "model.safetensors").is_file()

    for weights in ([1.0, -1.0, 0.0], [0.0, 0.0, 0.0], [1.0]):
        with pytest.raises(ConfigError):
            merge_models(base, paths, tmp_path / "w", weights)
    with pytest.raises(ConfigError):
        merge_models(base, paths, tmp_path / "w", include="(")
    assert _nothing_written(tmp_path / "w")

    with pytest.raises(OutputError):
        merge_models(base, paths, base / "inside")
    with pytest.raises(OutputError):
        merge_models(base, paths, out)  # exists and is not empty
    before = json.loads((out / "orthomerge_report.json").read_text())
    assert before["inputs"] == [str(pickled)]
    merge_models(base, paths[:1], out, overwrite=True)
    assert json.loads((out / "orthomerge_report.json").read_text())["inputs"] == [str(paths[0])]


def test_float32_precision_is_close_to_float64(experts, tmp_path):
    base, paths = experts
    merge_models(base, paths, tmp_path / "m64", target="global", residual="dare_ta")
    report = merge_models(base, paths, tmp_path / "m32", target="global", residual="dare_ta", precision="float32")
    assert report.params["precision"] == "float32"
    m64, m32, w0s = _load(tmp_path / "m64"), _load(tmp_path / "m32"), _load(base)
    differs = False
    for name, want in m64.items():
        got = m32[name]
        assert got.dtype == want.dtype
        differs |= not torch.equal(got, want)
        rel = torch.linalg.vector_norm(got.double() - want.double()) / torch.linalg.vector_norm(want.double())
        assert float(rel) < 1e-4, name
        if want.dim() == 2:
            delta = torch.linalg.vector_norm(got.double() - want.double()) / torch.linalg.vector_norm(
                want.double() - w0s[name].double()
            )
            assert float(delta) < 1e-3, name
    assert differs


@pytest.mark.parametrize("residual", ["ta", "ties"])
def test_float32_agrees_with_float64_on_rank_deficient_weights(tmp_path, residual):
    """A vocabulary below the hidden size makes ``M = W0^T W_i`` of the embeddings rank-deficient
    on the row-block path (``out < in <= 2 out``), as GQA k/v are on the reduced path: float32 must
    leave their null space alone (`closest_polar.rank_rtol`), not rotate its rounding noise."""
    base = tmp_path / "base"
    build_tiny_llama(vocab_size=40).save_pretrained(base)
    paths = [_save_expert(tmp_path / f"e{i}", i, vocab_size=40) for i in (1, 2, 3)]
    merge_models(base, paths, tmp_path / "m64", target="global", residual=residual)
    merge_models(base, paths, tmp_path / "m32", target="global", residual=residual, precision="float32")
    m64, m32 = _load(tmp_path / "m64"), _load(tmp_path / "m32")
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.layers.0.self_attn.k_proj.weight"):
        rel = torch.linalg.vector_norm(m32[name].double() - m64[name].double()) / torch.linalg.vector_norm(
            m64[name].double()
        )
        assert float(rel) < 1e-5, (name, float(rel))


def test_invalid_precision_writes_nothing(experts, tmp_path):
    base, paths = experts
    with pytest.raises(ConfigError, match="precision"):
        merge_models(base, paths, tmp_path / "p", precision="bfloat16")
    assert _nothing_written(tmp_path / "p")


def test_recipe_precision_is_passed_through(experts, tmp_path):
    import shutil

    import yaml

    from peft_orthomerge.recipe import (
        load_recipe,
        parse_recipe,
        plan_recipe,
        run_recipe,
    )

    base, paths = experts
    root = tmp_path / "r"
    root.mkdir()
    for src, dst in [(base, "base"), (paths[0], "a"), (paths[1], "b")]:
        shutil.copytree(src, root / dst)
    full = {
        "kind": "full",
        "base_model": "base",
        "inputs": [{"path": "a"}, {"path": "b"}],
        "method": {"precision": "float32", "include": "layers\\.0\\."},
        "output": {"path": "m"},
    }
    (root / "full.yaml").write_text(yaml.safe_dump(full))
    assert plan_recipe(load_recipe(root / "full.yaml")).kwargs["precision"] == "float32"
    report = run_recipe(load_recipe(root / "full.yaml"), quiet=True)
    assert report.params["precision"] == "float32"
    lora = {
        "kind": "lora",
        "base_model": "base",
        "inputs": [{"path": "a"}],
        "method": {"precision": "float32"},
        "output": {"path": "l"},
    }
    assert parse_recipe(lora).method.precision == "float32"
    with pytest.raises(ConfigError, match="precision"):
        parse_recipe({**full, "method": {"precision": "float16"}})


@pytest.mark.parametrize("residual", ["ta", "ties"])
def test_gpt2_conv1d_weights_are_rotated_on_the_input_side(tmp_path, residual):
    """GPT-2 stores its projections as ``Conv1D`` ``(in, out)``: the merge must rotate the input
    side, i.e. act on the transposed tensor, while the embeddings keep the torch layout."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=50, n_positions=16)
    model = GPT2LMHeadModel(config)
    model.save_pretrained(tmp_path / "base")
    paths = []
    for seed in (1, 2):
        expert = GPT2LMHeadModel(config)
        expert.load_state_dict(perturbed_state(model, seed, scale=0.2))
        expert.save_pretrained(tmp_path / f"e{seed}")
        paths.append(tmp_path / f"e{seed}")
    merge_models(tmp_path / "base", paths, tmp_path / "out", target="global", residual=residual)
    got = load_file(tmp_path / "out" / "model.safetensors")
    w0s = load_file(tmp_path / "base" / "model.safetensors")
    states = [load_file(p / "model.safetensors") for p in paths]
    checked = 0
    for name in ("transformer.h.0.attn.c_attn.weight", "transformer.h.0.mlp.c_fc.weight", "transformer.wte.weight"):
        conv1d = ".c_" in name
        w0 = w0s[name].T if conv1d else w0s[name]
        ws = [s[name].T if conv1d else s[name] for s in states]
        if residual == "ta":
            want = ref_merge(w0, ws, [0.5, 0.5], "global")
        else:
            want, _ = decouple_merge(w0, ws, [0.5, 0.5], "global", "ties", solver="svd")
        want = want.T if conv1d else want
        assert torch.allclose(got[name].double(), want, atol=1e-5, rtol=0), name
        if conv1d:  # the wrong side gives a clearly different answer
            wrong = ref_merge(w0s[name], [s[name] for s in states], [0.5, 0.5], "global")
            assert float((wrong - want).abs().max()) > 1e-3
        checked += 1
    assert checked == 3
