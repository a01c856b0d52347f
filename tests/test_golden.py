"""Every golden case reproduces the tensor hashes recorded before the pipeline was restructured.

The cases and how they are hashed: `golden.py` (beside this file). Hashes are bit-exact, so the
comparison runs on the machine type they were recorded on and skips, with that reason, elsewhere.
"""

from __future__ import annotations

import golden
import pytest

ENV = golden.environment()
RECORD = golden.matching_recording(ENV)


@pytest.fixture(scope="module")
def results():
    if RECORD is None:
        pytest.skip(
            f"no golden recording for this machine {ENV}; recorded: {[r['environment'] for r in golden.recordings()]}"
        )
    return golden.run_all()


def test_every_case_is_recorded():
    for rec in golden.recordings():
        assert set(golden.cases()) == set(rec["cases"]), rec["environment"]
        assert all(rec["cases"].values()), f"a case recorded no tensor: {rec['environment']}"


def test_the_kernel_fingerprint_is_stable():
    assert golden.kernel_fingerprint() == ENV["kernels"]


@pytest.mark.parametrize("case", sorted(golden.cases()))
def test_case_matches_golden(results, case):
    expected, got = RECORD["cases"][case], results[case]
    assert got.keys() == expected.keys()
    changed = sorted(k for k in expected if got[k] != expected[k])
    assert not changed, f"{case}: {len(changed)} tensor(s) changed, e.g. {changed[:3]}"
