"""Model cards: Hub metadata, inputs, method, version, capped module table."""

from __future__ import annotations

import yaml

from peft_orthomerge import __version__
from peft_orthomerge.report import MergeReport, ModuleStats
from peft_orthomerge.sinks.card import MAX_TABLE_ROWS, render_model_card, write_model_card


def _report(n_modules=3, kind="oft"):
    mods = [
        ModuleStats(
            name=f"model.layers.{i}.self_attn.q_proj",
            input_norms=[1.0, 3.0],
            merged_norm=1.5 + i,
            magnitude_factor=1.25,
            orthogonality_error=1e-15,
        )
        for i in range(n_modules)
    ]
    return MergeReport(
        kind=kind,
        method="orthomerge",
        inputs=["org/math-oft", "./code|oft"],
        weights=[0.75, 0.25],
        params={"granularity": "module", "cayley": "auto", "scale": 1.0},
        modules=mods,
        passthrough=["lm_head.bias"],
        warnings=["flags differed"],
    )


def _front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def test_adapter_card_metadata_and_body():
    card = render_model_card(_report(), base_model="org/base", library_name="peft")
    meta = _front_matter(card)
    assert meta["library_name"] == "peft" and meta["base_model"] == "org/base"
    assert meta["base_model_relation"] == "adapter"
    assert {"merge", "orthomerge"} <= set(meta["tags"])
    assert "| 0 | `org/math-oft` | 0.7500 |" in card
    assert "| 1 | `./code\\|oft` | 0.2500 |" in card  # pipes escaped in tables
    assert "- granularity: `module`" in card and f"`{__version__}`" in card
    assert "PeftModel.from_pretrained" in card
    assert "magnitude factor c over 3 modules: mean 1.2500" in card
    assert "`model.layers.2.self_attn.q_proj` | 1.2500 | 1.5 | 3.5 | 1.00e-15 |" in card  # 0.75 * 1 + 0.25 * 3
    assert "`lm_head.bias`" in card and "flags differed" in card


def test_model_card_local_base_not_in_metadata(tmp_path):
    base = tmp_path / "org" / "base"
    base.mkdir(parents=True)
    card = render_model_card(_report(kind="full"), base_model=str(base))
    meta = _front_matter(card)
    assert meta["library_name"] == "transformers" and "base_model" not in meta
    assert f"Base model: `{base}`" in card and "AutoModelForCausalLM.from_pretrained" in card


def test_long_tables_are_capped(tmp_path):
    n = MAX_TABLE_ROWS * 5
    card = render_model_card(_report(n_modules=n), library_name="peft")
    rows = [line for line in card.splitlines() if line.startswith("| `model.layers.")]
    assert len(rows) == MAX_TABLE_ROWS
    assert f"{n - MAX_TABLE_ROWS} more modules" in card
    assert f"model.layers.{n - 1}." in card  # the tail is shown
    path = write_model_card(tmp_path, _report(), library_name="peft")
    assert path.name == "README.md" and path.read_text().startswith("---\n")


def test_report_json_has_one_line_per_module_and_round_trips(tmp_path):
    """The report file: the standard JSON of `dataclasses.asdict` (same keys, same order), indented,
    each module entry on one line; `to_dict` returns copies."""
    import json
    from dataclasses import asdict

    report = _report(n_modules=4)
    report.params["nested"] = {"density": 0.2}
    report.modules[1].extra = {"c_block_min": 1.0}
    text = report.to_json(tmp_path / "r.json")
    assert (tmp_path / "r.json").read_text() == text + "\n"
    assert json.loads(text) == asdict(report)
    assert list(json.loads(text)) == list(asdict(report))  # key order kept, modules in place
    module_lines = [line for line in text.splitlines() if line.lstrip().startswith('{"name"')]
    assert [json.loads(line.rstrip(","))["name"] for line in module_lines] == [m.name for m in report.modules]
    assert MergeReport.from_json(tmp_path / "r.json") == report
    assert json.loads(MergeReport(kind="oft", method="m", inputs=[], weights=[]).to_json())["modules"] == []
    data = report.to_dict()
    data["params"]["nested"]["density"] = 0.9
    data["modules"][0]["input_norms"].append(7.0)
    assert report.params["nested"]["density"] == 0.2 and report.modules[0].input_norms == [1.0, 3.0]
