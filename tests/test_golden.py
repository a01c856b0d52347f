"""Every golden case reproduces the tensor hashes recorded before the pipeline was restructured.

The cases and how they are hashed: `golden.py` (beside this file). Hashes are bit-exact, so the
comparison runs on the machine type they were recorded on and skips, with that reason, elsewhere.
"""

from __future__ import annotations

import json

import golden
import pytest

RECORD = json.loads(golden.GOLDEN_FILE.read_text())


@pytest.fixture(scope="module")
def results():
    if RECORD["environment"] != golden.environment():
        pytest.skip(f"golden hashes were recorded on {RECORD['environment']}, this is {golden.environment()}")
    return golden.run_all()


def test_every_case_is_recorded():
    assert set(golden.cases()) == set(RECORD["cases"])
    assert all(RECORD["cases"].values()), "a case recorded no tensor"


@pytest.mark.parametrize("case", sorted(RECORD["cases"]))
def test_case_matches_golden(results, case):
    expected, got = RECORD["cases"][case], results[case]
    assert got.keys() == expected.keys()
    changed = sorted(k for k in expected if got[k] != expected[k])
    assert not changed, f"{case}: {len(changed)} tensor(s) changed, e.g. {changed[:3]}"
