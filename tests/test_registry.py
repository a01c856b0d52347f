"""The method registry: declarations read from signatures, `check_params`, and no global state left by runs."""

from __future__ import annotations

import importlib

import pytest
from click.testing import CliRunner

from peft_orthomerge import cli
from peft_orthomerge.errors import ConfigError
from peft_orthomerge.ops.registry import (
    SEED,
    Fraction,
    Range,
    check_params,
    euclidean_methods,
    get_method,
    method_names,
)
from peft_orthomerge.ops.so_merge import get_so_method, so_methods
from peft_orthomerge.progress import library_progress_bars_off
from peft_orthomerge.recipe import parse_recipe


def test_one_registry_for_both_families():
    rotation, euclidean = method_names("rotation"), method_names("euclidean")
    assert rotation == ["orthomerge", "mean_q", "mean_r", "product_r", "karcher"]
    assert euclidean[:5] == ["ta", "ties", "dare_ta", "dare_ties", "tsvm"] and "fisher_rao" in euclidean
    assert method_names() == rotation + euclidean
    assert so_methods() == sorted(rotation) and euclidean_methods() == sorted(euclidean)
    assert [m for m in rotation if not get_method(m).orthogonal] == ["mean_r"]
    assert not any(get_method(m).orthogonal for m in euclidean)
    assert [m for m in method_names() if get_method(m).linear] == ["ta", "dare_ta"]
    assert get_so_method("karcher").space == "rotation" and get_method("orthomerge").space == "skew"
    with pytest.raises(ConfigError, match="unknown method family"):
        method_names("spherical")


def test_parameters_come_from_signatures():
    ties = {p.name: p for p in get_method("ties").params}
    assert list(ties) == ["density", "lam"]
    assert ties["density"].default == 0.2 and ties["density"].annotation is float
    assert ties["density"].ranges == (Fraction(low_open=True),) and str(ties["density"].ranges[0]) == "(0, 1]"
    assert [p.name for p in get_method("orthomerge").params] == ["granularity"]
    assert get_method("karcher").params == ()
    assert "base" not in get_method("fisher_rao").param_names()


def test_check_params_valid_and_invalid():
    assert check_params("ties", {"density": 0.5, "lam": 1}) == {"density": 0.5, "lam": 1}
    assert check_params("ta", None) == {} and check_params("ta", {"lam": None}) == {"lam": None}
    with pytest.raises(ConfigError, match=r"unknown parameter 'densty' for method 'ties'; valid: density, lam$"):
        check_params("ties", {"densty": 0.3})
    with pytest.raises(ConfigError, match=r"'density' of method 'ties' must be in \(0, 1\], got 0"):
        check_params("ties", {"density": 0})
    with pytest.raises(ConfigError, match="must be float"):
        check_params("ties", {"density": "0.3"})
    with pytest.raises(ConfigError, match="must be float"):
        check_params("ties", {"density": True})
    with pytest.raises(ConfigError, match=r"must be in \[0, 1\)"):
        check_params("dare_ta", {"p": 1.0})
    with pytest.raises(ConfigError, match="must be int"):
        check_params("dare_ties", {"seed": 1.5})
    with pytest.raises(ConfigError, match="one of 'weights', 'task_vectors'"):
        check_params("fisher_rao", {"on": "tensors"})
    with pytest.raises(ConfigError, match=r"must be in \[1, inf\)"):
        check_params("fisher_rao", {"max_iter": 0})
    assert check_params("fisher_rao", {"max_iter": 10**400}) == {"max_iter": 10**400}  # compared exactly
    with pytest.raises(ConfigError, match="unknown parameter 'granularity' for method 'mean_q'; valid: none"):
        check_params("mean_q", {"granularity": "block"})
    with pytest.raises(ConfigError, match="unknown merge method"):
        check_params("nope", {})
    with pytest.raises(ConfigError, match="must be a mapping"):
        check_params("ta", [("lam", 1.0)])
    assert check_params("ta", {"seed": 3}, extra=(SEED,)) == {"seed": 3}


def test_range_check_keeps_the_methods_messages():
    with pytest.raises(ConfigError, match=r"^density must be in \(0, 1\], got 0.0$"):
        Fraction(low_open=True).check("density", 0)
    assert Range(low=1).check("n", 3) == 3.0 and str(Range(low=0.0, low_open=True)) == "(0, inf)"


def test_recipe_rejects_misspelt_residual_kwargs():
    data = {
        "kind": "full",
        "base_model": "o/b",
        "inputs": [{"path": "a"}],
        "method": {"residual": "ties", "residual_kwargs": {"densty": 0.3}},
        "output": {"path": "o"},
    }
    with pytest.raises(ConfigError, match="method.residual_kwargs: unknown parameter 'densty'.*valid: density, lam"):
        parse_recipe(data)
    data["method"]["residual_kwargs"] = {"density": 0.3, "seed": 7}
    assert parse_recipe(data).method.residual_kwargs == {"density": 0.3, "seed": 7}


def test_methods_command_lists_the_registry():
    result = CliRunner().invoke(cli.main, ["methods"])
    assert result.exit_code == 0
    assert [line.split()[0] for line in result.output.splitlines()] == method_names()
    assert "density: float in (0, 1] = 0.2" in result.output


def test_library_progress_bars_are_restored():
    from transformers.utils import logging as hf_logging

    hub_tqdm = importlib.import_module("huggingface_hub.utils.tqdm")
    before = (hf_logging.is_progress_bar_enabled(), dict(hub_tqdm.progress_bar_states))
    with library_progress_bars_off():
        assert not hf_logging.is_progress_bar_enabled() and hub_tqdm.are_progress_bars_disabled()
    assert (hf_logging.is_progress_bar_enabled(), dict(hub_tqdm.progress_bar_states)) == before
    with library_progress_bars_off(False):
        assert (hf_logging.is_progress_bar_enabled(), dict(hub_tqdm.progress_bar_states)) == before
