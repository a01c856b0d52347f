"""The method-comparison harness `peft_orthomerge.compare.compare_methods` on a tiny Llama.

The toy evaluation returns numbers derived from the merged model's logits on fixed inputs, so that
each row can be checked against an independent computation: merging N copies of one adapter must
give that adapter back for every averaging method, and the rows must equal the evaluation of
models built independently (PEFT's own loading / `merge_and_unload`, plain tensor arithmetic).
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import build_tiny_llama

from peft_orthomerge import ConfigError
from peft_orthomerge.compare import available_methods, compare_methods, format_table

TARGETS = ["q_proj", "v_proj", "down_proj"]
IDS = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(0))


def evaluate(model) -> dict[str, float]:
    with torch.no_grad():
        logits = model(input_ids=IDS).logits.double()
    return {"mean": float(logits.mean()), "norm": float(logits.norm()), "first": float(logits[0, -1, 0])}


def _assert_scores_equal(row: dict, expected: dict, rel: float = 1e-5) -> None:
    assert row["error"] is None, row["error"]
    for key, value in expected.items():
        assert row[key] == pytest.approx(value, rel=rel, abs=1e-6), (row["method"], key)


def _save_adapter(tmp_path, kind: str, seed: int, neumann: bool = True) -> str:
    from peft import LoraConfig, OFTConfig, get_peft_model

    config = (
        OFTConfig(r=0, oft_block_size=16, target_modules=TARGETS, use_cayley_neumann=neumann)
        if kind == "oft"
        else LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS)
    )
    model = get_peft_model(build_tiny_llama(), config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "oft_R" in name or "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    path = tmp_path / f"{kind}-{seed}-{neumann}"
    model.save_pretrained(path)
    return str(path)


def _folded(base, adapter: str):
    from peft import PeftModel

    return PeftModel.from_pretrained(copy.deepcopy(base), adapter).merge_and_unload()


def _mean_model(base, models):
    """``W0 + mean_i (W_i - W0)`` for every parameter: task arithmetic with lambda = 1/N."""
    out = copy.deepcopy(base)
    params = [dict(m.named_parameters()) for m in models]
    with torch.no_grad():
        for name, p in out.named_parameters():
            p.copy_(sum(ps[name].double() for ps in params) / len(params))
    return out


@pytest.fixture(scope="module")
def base():
    return build_tiny_llama()


@pytest.mark.parametrize("neumann", [True, False])
def test_oft_copies_of_one_adapter_give_it_back(base, tmp_path, neumann):
    adapter = _save_adapter(tmp_path, "oft", 1, neumann)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    methods = ["orthomerge", "orthomerge/block", "mean_q", "karcher", "ta", "mean_r"]
    rows = compare_methods(
        base, [adapter, adapter], evaluate, kind="oft", methods=methods, include_individual=True, verbose=False
    )
    assert [r["method"] for r in rows] == ["base", f"single:{adapter}", f"single:{adapter}", *methods]
    single = evaluate(_folded(base, adapter))
    _assert_scores_equal(rows[0], evaluate(base))
    for row in rows[1:]:
        _assert_scores_equal(row, single)
        assert row["average"] == pytest.approx(sum(single.values()) / 3, rel=1e-5)
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items()), "base model was modified"


def test_oft_euclidean_rows_match_mean_of_folded_adapters(base, tmp_path):
    adapters = [_save_adapter(tmp_path, "oft", s) for s in (2, 3)]
    rows = compare_methods(
        base, adapters, evaluate, kind="oft", methods=["ta", "orthomerge"], include_base=False, verbose=False
    )
    expected = evaluate(_mean_model(base, [_folded(base, a) for a in adapters]))
    _assert_scores_equal(rows[0], expected)
    assert rows[1]["error"] is None
    assert rows[1]["norm"] != pytest.approx(expected["norm"], rel=1e-6)  # OrthoMerge is not TA


def test_lora_rows(base, tmp_path):
    adapters = [_save_adapter(tmp_path, "lora", s) for s in (4, 5)]
    rows = compare_methods(
        base, adapters, evaluate, kind="lora", methods=["ta", "ta+G"], include_base=False, verbose=False
    )
    expected = evaluate(_mean_model(base, [_folded(base, a) for a in adapters]))
    _assert_scores_equal(rows[0], expected)
    assert rows[1]["error"] is None
    # N copies of one adapter: decoupled merge (rotation mean + residual mean) gives it back.
    rows = compare_methods(
        base, adapters[:1] * 2, evaluate, kind="lora", methods=["ta+G", "ta+C"], include_base=False, verbose=False
    )
    single = evaluate(_folded(base, adapters[0]))
    _assert_scores_equal(rows[0], single, rel=1e-4)


def test_failed_method_is_a_row_and_table(base, tmp_path):
    adapter = _save_adapter(tmp_path, "oft", 6)
    rows = compare_methods(
        base, [adapter], evaluate, kind="oft", methods=["no_such_method"], average_over=["mean"], verbose=False
    )
    assert rows[0]["average"] == pytest.approx(rows[0]["mean"])
    assert rows[1]["method"] == "no_such_method" and "no_such_method" in rows[1]["error"]
    table = format_table(rows)
    lines = table.splitlines()
    assert lines[0].startswith("| method | mean | norm | first | average |")
    assert len(lines) == 2 + len(rows) and "failed:" in lines[-1]


def test_bad_arguments(base):
    with pytest.raises(ConfigError):
        compare_methods(base, ["x"], evaluate, kind="dora")
    with pytest.raises(ConfigError):
        compare_methods(base, [], evaluate)
    assert "orthomerge" in available_methods("oft") and "ta+G" in available_methods("lora")
