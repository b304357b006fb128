"""A bad value of a notebook parameter stops the notebook with one clear error naming the key and the allowed values,
before any data is prepared or any run trains (the validation sits in the set-up cell of each notebook).

``selection_seeds`` (the number of seeds each validation-selection candidate trains on, notebooks 11, 21, 30 and 40) is
checked against ``seeds``: it must lie in 1..len(seeds).  Each case runs the notebook's smoke profile through
papermill with one value too many, outputs under ``tmp_path``."""

from __future__ import annotations

import os
from pathlib import Path

import papermill
import pytest

import bilevel_ssl
from bilevel_ssl.paths import repo_root
from bilevel_ssl.reproduce import load_params, notebooks_dir, params_path

LIB = Path(bilevel_ssl.__file__).resolve().parents[1]  # the package the kernel must import too


@pytest.mark.parametrize("notebook", ["11_gessl_sensitivity", "21_tc2_ablation", "30_bissl", "40_mcr"])
def test_too_many_selection_seeds_are_refused_before_any_compute(notebook, tmp_path, monkeypatch):
    params = load_params(params_path(notebook, "smoke"))
    bad = len(params["seeds"]) + 1
    params = {**params, "profile": "smoke", "selection_seeds": bad}
    source, repo = notebooks_dir() / f"{notebook}.ipynb", repo_root()
    root = tmp_path / "root"
    root.mkdir()
    monkeypatch.setenv("BILEVEL_SSL_ROOT", str(root))  # outputs -> root/outputs/<notebook>/smoke/
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(LIB), os.environ.get("PYTHONPATH")) if p))

    with pytest.raises(papermill.PapermillExecutionError) as err:
        papermill.execute_notebook(str(source), str(tmp_path / "executed.ipynb"), parameters=params,
                                   kernel_name="python3", cwd=str(repo), progress_bar=False)

    assert err.value.ename == "ValueError"
    assert err.value.evalue == (f"selection_seeds: {bad} not allowed; allowed: 1 to len(seeds) = "
                                f"{len(params['seeds'])}")
    assert not (root / "outputs" / "cache").exists(), "something trained before the parameter check"
