import json

import nbformat
import pytest

from bilevel_ssl import reproduce


def _notebook(path, source_cells, params_src):
    nb = nbformat.v4.new_notebook()
    p = nbformat.v4.new_code_cell(params_src)
    p.metadata["tags"] = ["parameters"]
    nb.cells = [p] + [nbformat.v4.new_code_cell(s) for s in source_cells]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)


@pytest.fixture
def fake_repo(tmp_path, monkeypatch):
    (tmp_path / "notebooks").mkdir()
    (tmp_path / "params" / "smoke").mkdir(parents=True)
    (tmp_path / "pyproject.toml").write_text("")
    monkeypatch.setenv("BILEVEL_SSL_ROOT", str(tmp_path))
    return tmp_path


def test_validate_params_catches_unknown_names_and_yaml_strings(fake_repo):
    _notebook(fake_repo / "notebooks" / "01_x.ipynb", [], 'lr: float = 0.1  # learning rate\nprofile: str = "smoke"')
    assert reproduce.validate_params("01_x", {"lr": 1, "profile": "smoke"}) == []
    errs = reproduce.validate_params("01_x", {"lr": "1e-3", "epochz": 3})
    assert any("'lr' must be float, got str '1e-3' (YAML 1.1" in e for e in errs)
    assert any("unknown parameter 'epochz'; allowed: lr, profile" in e for e in errs)


def test_invalid_params_run_nothing(fake_repo, capsys):
    _notebook(fake_repo / "notebooks" / "01_x.ipynb", ["open('ran', 'w')"], "lr: float = 0.1\nprofile: str = 'x'")
    (fake_repo / "params" / "smoke" / "01_x.yaml").write_text("lr: 1e-3\n")
    assert reproduce.main(["--profile", "smoke"]) == 2
    assert "1.0e-3" in capsys.readouterr().err and not (fake_repo / "ran").exists()


def test_unknown_notebook_lists_available(fake_repo, capsys):
    _notebook(fake_repo / "notebooks" / "01_x.ipynb", [], "profile: str = 'x'")
    assert reproduce.main(["--nb", "02_nope"]) == 2
    assert "allowed: 01_x" in capsys.readouterr().err


def test_failing_notebook_exits_nonzero_and_keeps_partial_output(fake_repo, capsys):
    cells = ["print('first cell ran')", "raise RuntimeError('boom')", "print('never')"]
    _notebook(fake_repo / "notebooks" / "01_x.ipynb", cells, "profile: str = 'x'")
    (fake_repo / "params" / "smoke" / "01_x.yaml").write_text("{}\n")
    assert reproduce.main(["--profile", "smoke", "--nb", "01_x"]) == 1
    assert "RuntimeError: boom" in capsys.readouterr().err
    out = fake_repo / "outputs" / "01_x" / "smoke" / "01_x.ipynb"
    nb = json.loads(out.read_text())
    assert nb["metadata"]["papermill"]["exception"] is True
    texts = "".join("".join(o.get("text", "")) for c in nb["cells"] for o in c.get("outputs", []))
    assert "first cell ran" in texts and "never" not in texts
    assert (fake_repo / "outputs" / "index.md").exists()  # the index is rebuilt even after a failure


def test_successful_run_rebuilds_the_index_with_the_notebooks_metrics(fake_repo):
    cells = ["from bilevel_ssl.paths import run_dir\nfrom bilevel_ssl.report import write_metrics\n"
             "write_metrics(run_dir('01_x', profile), params={}, seed=0, results={'m': {'knn_acc': 0.5}},"
             " verdicts={'R0': 'holds'}, wall_time_s=1.0)"]
    _notebook(fake_repo / "notebooks" / "01_x.ipynb", cells, "profile: str = 'x'")
    (fake_repo / "params" / "smoke" / "01_x.yaml").write_text("{}\n")
    assert reproduce.main(["--profile", "smoke", "--nb", "01_x"]) == 0
    md = (fake_repo / "outputs" / "index-smoke.md").read_text()  # smoke runs are not committed: their own index
    assert "## 01_x" in md and "| m | 0.500 |" in md and "**R0**: holds" in md


def _counting_notebook(repo, name, extra=""):
    """A notebook that appends a line to ran-<name> each time it runs and writes metrics.json with its params."""
    cells = ["from bilevel_ssl.paths import run_dir\nfrom bilevel_ssl.report import write_metrics\n"
             f"open('ran-{name}', 'a').write('x\\n')\n{extra}"
             f"write_metrics(run_dir('{name}', profile), params={{'profile': profile, 'lr': lr}}, seed=0, "
             "results={'m': {'knn_acc': 0.5}}, wall_time_s=42.0)"]
    _notebook(repo / "notebooks" / f"{name}.ipynb", cells, "lr: float = 0.1  # lr\nprofile: str = 'x'  # profile")


def _git(repo):
    import subprocess

    for cmd in (["init", "-q"], ["add", "-A"], ["-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "x"]):
        subprocess.run(["git", *cmd], cwd=repo, check=True)


def test_resume_skips_notebooks_done_with_the_same_params_and_commit(fake_repo, capsys):
    _counting_notebook(fake_repo, "01_x")
    (fake_repo / "params" / "smoke" / "01_x.yaml").write_text("lr: 0.1\n")
    (fake_repo / ".gitignore").write_text("outputs/\nran-*\n")
    _git(fake_repo)
    ran = fake_repo / "ran-01_x"
    assert reproduce.main(["--profile", "smoke", "--resume"]) == 0 and ran.read_text() == "x\n"
    assert reproduce.estimate_s("01_x", "smoke") == 42.0
    assert reproduce.main(["--profile", "smoke", "--resume"]) == 0 and ran.read_text() == "x\n"  # skipped
    assert "already done with these parameters" in capsys.readouterr().out
    assert reproduce.main(["--profile", "smoke"]) == 0 and ran.read_text() == "x\nx\n"  # without --resume: runs
    (fake_repo / "params" / "smoke" / "01_x.yaml").write_text("lr: 0.2\n")  # other params: not done
    assert reproduce.main(["--profile", "smoke", "--resume"]) == 0 and ran.read_text() == "x\nx\nx\n"
    # the earlier runs were archived, and the estimate falls back to them when the current run is gone
    assert len(list((fake_repo / "outputs" / "01_x" / "archive").iterdir())) == 2
    (fake_repo / "outputs" / "01_x" / "smoke" / "metrics.json").unlink()
    assert reproduce.estimate_s("01_x", "smoke") == 42.0 and reproduce.estimate_s("01_x", "default") is None


def test_jobs_run_notebooks_in_parallel_processes_and_report_a_failure(fake_repo, capsys):
    _counting_notebook(fake_repo, "01_x")
    _counting_notebook(fake_repo, "02_y", extra="raise RuntimeError('boom in 02')\n")
    _counting_notebook(fake_repo, "03_z")
    for n in ("01_x", "02_y", "03_z"):
        (fake_repo / "params" / "smoke" / f"{n}.yaml").write_text("lr: 0.1\n")
    assert reproduce.main(["--profile", "smoke", "--jobs", "2"]) == 1
    err = capsys.readouterr().err
    assert "02_y FAILED" in err
    for n in ("01_x", "03_z"):  # a failure does not stop the others
        assert (fake_repo / "outputs" / n / "smoke" / "metrics.json").exists()
    assert (fake_repo / "outputs" / "index.md").exists()
    assert reproduce.main(["--profile", "smoke", "--jobs", "0"]) == 2
    assert "--jobs: must be >= 1" in capsys.readouterr().err


def _record(repo, name, profile, **fields):
    folder = repo / "outputs" / name / profile
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.json").write_text(json.dumps(fields))


def test_estimate_adds_the_training_of_runs_loaded_from_the_cache(fake_repo, capsys):
    # made from a full cache: 52 s of notebook, 23 loaded runs that took 5000 s to train where they were made
    _record(fake_repo, "01_x", "smoke", wall_time_s=52.0,
            training_runs={"trained": 0, "from_cache": 23, "from_cache_train_s": 5000.0})
    assert reproduce.estimate_s("01_x", "smoke") == 5052.0 and reproduce.unrecorded_loads("01_x", "smoke") == 0
    # everything trained here: the wall time is the estimate
    _record(fake_repo, "02_y", "smoke", wall_time_s=600.0,
            training_runs={"trained": 4, "from_cache": 0, "from_cache_train_s": 0.0})
    assert reproduce.estimate_s("02_y", "smoke") == 600.0 and reproduce.unrecorded_loads("02_y", "smoke") == 0
    # written before the field: the loaded runs' time is unknown, and the estimate says it is low
    _record(fake_repo, "03_z", "smoke", wall_time_s=631.0, training_runs={"trained": 2, "from_cache": 22})
    assert reproduce.estimate_s("03_z", "smoke") == 631.0 and reproduce.unrecorded_loads("03_z", "smoke") == 22
    _notebook(fake_repo / "notebooks" / "03_z.ipynb", ["pass"], "profile: str = 'x'")
    (fake_repo / "params" / "smoke" / "03_z.yaml").write_text("{}\n")
    assert reproduce.main(["--profile", "smoke", "--nb", "03_z"]) == 0
    out = capsys.readouterr().out
    assert "estimate from the last runs here" in out and "11 min" in out  # 631 s
    assert ("the estimate is low for 03_z (its last run loaded 22 pre-training runs from the encoder cache and did "
            "not record their training time)") in out


def test_estimate_counts_a_pre_training_run_that_notebooks_share_once(fake_repo, capsys):
    base = {"train_s": 600.0}
    # 10 trains the base (600 s) and its own run (900 s) in 1600 s; 11 loads the base and trains one run (300 s)
    _record(fake_repo, "10_a", "smoke", wall_time_s=1600.0, training_runs={
        "trained": 2, "from_cache": 0, "from_cache_train_s": 0.0,
        "runs": {"base": {**base, "loaded": False}, "gessl": {"train_s": 900.0, "loaded": False}}})
    _record(fake_repo, "11_b", "smoke", wall_time_s=400.0, training_runs={
        "trained": 1, "from_cache": 1, "from_cache_train_s": 600.0,
        "runs": {"base": {**base, "loaded": True}, "mu0": {"train_s": 300.0, "loaded": False}}})
    records = [reproduce._last_record(n, "smoke") for n in ("10_a", "11_b")]
    # per notebook from an empty cache: 1600 and 400 + 600; in one go the base trains once:
    # (1600 - 1500) + (400 - 300) + 600 + 900 + 300
    assert reproduce.estimate_s("11_b", "smoke") == 1000.0
    assert reproduce.plan_estimate_s(records) == 2000.0
    assert reproduce.plan_estimate_s(records[::-1]) == 2000.0  # whichever notebook trains it
    # a record from before training_runs.runs counts its empty-cache cost, shared runs included
    _record(fake_repo, "12_c", "smoke", wall_time_s=500.0,
            training_runs={"trained": 0, "from_cache": 1, "from_cache_train_s": 600.0})
    assert reproduce.plan_estimate_s([*records, reproduce._last_record("12_c", "smoke"), {}]) == 2000.0 + 1100.0
    for n in ("10_a", "11_b"):
        _notebook(fake_repo / "notebooks" / f"{n}.ipynb", ["pass"], "profile: str = 'x'")
        (fake_repo / "params" / "smoke" / f"{n}.yaml").write_text("{}\n")
    assert reproduce.main(["--profile", "smoke", "--nb", "10_a,11_b", "--no-index"]) == 0
    assert ("estimate from the last runs here: 33 min (43 min if each notebook trained its shared pre-training "
            "runs again)") in capsys.readouterr().out
