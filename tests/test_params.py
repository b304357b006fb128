"""Every params file is valid for its notebook; smoke = the notebook's own defaults (what nbval executes)."""

import ast

import pytest

from bilevel_ssl.paths import repo_root
from bilevel_ssl.reproduce import (PROFILES, list_notebooks, load_params, notebook_parameters, notebooks_dir,
                                   params_path, validate_params)

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


# ---------------------------------------------------------------------------------------------- paper profiles
GESSL = ["10_gessl_universality", "11_gessl_sensitivity", "12_gessl_tsne", "13_gessl_bilevel_ablation",
         "14_gessl_efficiency_stability"]
# keys that enter the TrainConfig (the training-cache key) or the training data of the runs 10-14 share
GESSL_SHARED = ("dataset", "data_root", "novel_classes", "test_fraction", "max_train", "seeds", "epochs",
                "batch_size", "lr", "optimizer", "weight_decay", "objective_args", "hypergrad", "gessl_args", "backbone",
                "backbone_args", "monitor", "device")
SHARING_PROFILES = ("default", "gpu", "paper")  # the profiles whose GeSSL runs are meant to be shared


def _profile(name, profile="paper"):
    return load_params(params_path(name, profile))


@pytest.mark.parametrize("profile", SHARING_PROFILES)
def test_gessl_profiles_share_their_runs(profile):
    """Notebooks 10-14 build the same base / GeSSL runs from these keys: equal values, one cache entry per run
    (``{}`` and ``{small_stem: true}`` build the same ResNet-18 but are different cache keys)."""
    profiles = {n: _profile(n, profile) for n in GESSL}
    for key in GESSL_SHARED:
        values = {n: p[key] for n, p in profiles.items() if key in p}
        assert len(values) >= 4, f"{key}: in too few GeSSL profiles: {sorted(values)}"
        assert len({repr(v) for v in values.values()}) == 1, f"{key} differs between the GeSSL paper profiles: {values}"
    hypergrad = profiles["10_gessl_universality"]["hypergrad"]
    if profile == "paper":
        assert hypergrad == "aid_fd"  # the paper's engine (GeSSL App. G.4)
    assert hypergrad in profiles["14_gessl_efficiency_stability"]["engines"]  # 14 has no hypergrad key
    assert hypergrad in profiles["13_gessl_bilevel_ablation"]["engines"]
    bases = profiles["10_gessl_universality"]["bases"]
    assert profiles["12_gessl_tsne"]["bases"] == bases
    assert all(profiles[n]["base"] in bases for n in GESSL if "base" in profiles[n])


@pytest.mark.parametrize("profile", SHARING_PROFILES)
def test_gessl_profiles_build_the_same_configuration(profile):
    """The centre GeSSL run of every notebook 10-14, built the way the notebooks build it, is one TrainConfig."""
    from bilevel_ssl.experiments import make_config

    engine = _profile("10_gessl_universality", profile)["hypergrad"]

    def centre(name):
        p = _profile(name, profile)
        hypergrad = p.get("hypergrad", engine if engine in p.get("engines", {}) else None)
        return make_config("simclr", meta="gessl", dataset=p["dataset"], seed=p["seeds"][0], epochs=p["epochs"],
                           batch_size=p["batch_size"], lr=p["lr"], optimizer=p["optimizer"],
                           weight_decay=p["weight_decay"], backbone=p["backbone"],
                           backbone_args=p["backbone_args"], meta_args=p["gessl_args"], hypergrad=hypergrad,
                           device=p["device"])

    configs = {n: centre(n) for n in GESSL}
    assert len({repr(c) for c in configs.values()}) == 1, configs


def test_every_paper_profile_lists_its_deviations():
    """Each ``params/paper/*.yaml`` opens with a comment block that lists how it deviates from its paper."""
    import re

    for name in NOTEBOOKS:
        lines = params_path(name, "paper").read_text().splitlines()
        header = []
        for line in lines:
            if not line.startswith("#"):
                break
            header.append(line)
        assert header, f"params/paper/{name}.yaml: no comment block at the top"
        assert re.search(r"\bDeviations?\b", "\n".join(header)), \
            f"params/paper/{name}.yaml: the top comment block does not list the deviations ('Deviation(s)')"


# ---------------------------------------------------------------------------------------------- objective_args
def _code_cells(name):
    import json

    nb = json.loads((notebooks_dir() / f"{name}.ipynb").read_text())
    return [ast.parse("".join(c["source"])) for c in nb["cells"] if c["cell_type"] == "code"]


def _passes_recipes(call, dicts) -> bool:
    """``recipes=`` among the call's keywords, directly or in a ``**d`` whose ``d = dict(...)`` sets it."""
    return any(k.arg == "recipes" or (k.arg is None and isinstance(k.value, ast.Name) and "recipes" in
                                      dicts.get(k.value.id, ())) for k in call.keywords)


@pytest.mark.parametrize("name", [n for n in NOTEBOOKS if "objective_args" in notebook_parameters(n)
                                  and any("make_config(" in ast.unparse(t) for t in _code_cells(n))])
def test_objective_args_reaches_every_run(name):
    """A notebook with the ``objective_args`` parameter that builds its runs with ``make_config`` turns it into
    ``recipes`` (``recipes_with``, which validates the keys) and hands them to every ``make_config`` call: a call
    without ``recipes=`` would train its run with the library's recipes, silently ignoring the parameter."""
    nodes = [node for tree in _code_cells(name) for node in ast.walk(tree)]
    calls = [n for n in nodes if isinstance(n, ast.Call) and getattr(n.func, "id", None) in ("make_config",
                                                                                           "recipes_with")]
    dicts = {n.targets[0].id: [k.arg for k in n.value.keywords] for n in nodes
             if isinstance(n, ast.Assign) and isinstance(n.targets[0], ast.Name) and isinstance(n.value, ast.Call)
             and getattr(n.value.func, "id", None) == "dict"}
    built = [c for c in calls if c.func.id == "recipes_with"]
    assert built and all(isinstance(c.args[0], ast.Name) and c.args[0].id == "objective_args" for c in built), \
        f"{name}: objective_args is not turned into recipes by recipes_with(objective_args, ...)"
    missing = [c.lineno for c in calls if c.func.id == "make_config" and not _passes_recipes(c, dicts)]
    assert not missing, f"{name}: make_config without recipes= at cell line(s) {missing}"
