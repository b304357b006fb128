"""Every params file is valid for its notebook; smoke = the notebook's own defaults (what nbval executes)."""

import ast

import pytest

from bilevel_ssl.paths import repo_root
from bilevel_ssl.reproduce import PROFILES, list_notebooks, load_params, notebook_parameters, params_path, validate_params

NOTEBOOKS = list_notebooks()


def test_there_are_notebooks():
    assert "00_quickstart" in NOTEBOOKS


@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_params_file_exists_and_matches_parameters_cell(name, profile):
    path = params_path(name, profile)
    assert path.exists(), f"missing {path.relative_to(repo_root())}"
    params = load_params(path)
    assert params, f"{path} is empty"
    assert validate_params(name, {**params, "profile": profile}) == []


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_every_parameter_is_typed_and_documented(name):
    for key, spec in notebook_parameters(name).items():
        assert spec["inferred_type_name"] not in (None, "None"), f"{name}: {key} has no type annotation"
        assert spec["help"], f"{name}: {key} has no '# help' comment"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_smoke_profile_equals_notebook_defaults(name):
    defaults = {k: ast.literal_eval(v["default"]) for k, v in notebook_parameters(name).items()}
    smoke = load_params(params_path(name, "smoke"))
    differing = {k: (defaults[k], v) for k, v in smoke.items() if defaults[k] != v}
    assert not differing, f"smoke params differ from the notebook defaults that nbval runs: {differing}"
