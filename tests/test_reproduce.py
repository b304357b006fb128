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
    md = (fake_repo / "outputs" / "index.md").read_text()
    assert "## 01_x" in md and "| m | 0.500 |" in md and "**R0**: holds" in md
