"""Each notebook's smoke numbers against the committed references, within tolerances measured across CPU kernels.

``make test`` runs the notebooks (nbval) before these tests (``conftest.py`` orders them last), and each notebook
writes ``outputs/<nb>/smoke/metrics.json``; a notebook whose file was not written in this session (e.g.
``pytest tests`` alone) is run here with papermill first.  The tolerances and how they were measured:
``tests/smoke_reference.py`` and ``tests/reference/smoke_metrics.json`` (``spread``).
"""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import smoke_reference as sr  # noqa: E402

REF = sr.load_reference()


def _fresh_metrics(notebook: str, since: float) -> dict:
    path = sr.ROOT / "outputs" / notebook / "smoke" / "metrics.json"
    if not path.exists() or path.stat().st_mtime < since:
        from bilevel_ssl.reproduce import run

        assert run([notebook], "smoke") == 0, f"{notebook}: its smoke run failed (partial output in {path.parent})"
    return json.loads(path.read_text())


def test_every_notebook_has_references():
    assert sorted(REF["values"]) == sr._notebooks()
    assert all(REF["values"][nb] for nb in REF["values"] if nb != "90_benchmarks"), "a notebook with no numbers"


def test_tolerances_come_from_a_measured_spread():
    """Every tolerance is SAFETY x a recorded measurement between this machine's kernels and another set."""
    assert len(REF["kernel_sets"]) >= 2
    for nb, tols in REF["tolerances"].items():
        for fam, tol in tols.items():
            assert tol == pytest.approx(sr.SAFETY * REF["spread"][nb][fam]["diff"]), (nb, fam)
    for fam, tol in REF["tolerances_any_notebook"].items():
        assert tol == pytest.approx(max(t.get(fam, 0.0) for t in REF["tolerances"].values())), fam


@pytest.mark.parametrize("notebook", sr._notebooks())
def test_smoke_numbers_match_the_references(notebook, session_start):
    got = sr.comparable(_fresh_metrics(notebook, session_start))
    problems = sr.differences(REF, notebook, got)
    assert not problems, "\n".join(problems)


def test_a_changed_result_is_caught():
    """The comparison itself: a number moved by more than its tolerance, a missing and a new key all fail."""
    nb = next(n for n in sr._notebooks() if any(sr.family(k) == "knn_acc" for k in REF["values"][n]))
    values = dict(REF["values"][nb])
    key = next(k for k in values if sr.family(k) == "knn_acc")
    assert sr.differences(REF, nb, values) == []
    moved = {**values, key: values[key] + 2 * sr.tolerance(REF, key, values[key], nb) + 1e-3}
    assert len(sr.differences(REF, nb, moved)) == 1
    missing = {k: v for k, v in values.items() if k != key}
    assert "missing" in sr.differences(REF, nb, missing)[0]
    assert "is new" in sr.differences(REF, nb, {**values, "x/knn_acc": 0.5})[0]


def test_timings_and_memory_are_not_compared():
    assert sr.is_volatile("simclr/train_s_per_run") and sr.is_volatile("engines/aid_cg/time_ms")
    assert not sr.is_volatile("simclr/knn_acc") and not sr.is_volatile("toy/engines/aid_fd/short_err_unrolled")


def test_walkthrough_teaches_what_it_computes(session_start):
    """Notebook 05's verdicts are the statements its Markdown makes (undamped CG is exact at the inner optimum, the
    library's damped CG is not, first-order engines give g exactly zero gradient, ...), computed in float64 on
    this run.  A change of an engine's defaults that contradicts the text fails here, not only in a reader's eyes
    (the damped ``aid_cg`` default did, unnoticed, until the notebook ran its toy rows undamped)."""
    verdicts = _fresh_metrics("05_bilevel_walkthrough", session_start)["verdicts"]
    assert len(verdicts) >= 13
    assert [k for k, v in verdicts.items() if v is not True] == []
