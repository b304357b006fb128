"""Run records: results tables become metrics.json entries named like the claims' runs."""

import json

import numpy as np
import pandas as pd
import pytest

from bilevel_ssl.claims import from_wide
from bilevel_ssl.report import table_results


def test_table_results_names_rows_like_the_claims_runs():
    table = pd.DataFrame({"group": ["engine", "sweep"], "label": ["aid_fd", 0.5], "linear_acc": [0.7, 0.6],
                          "seeds": [3, 3]}).set_index(["group", "label"])
    out = table_results(table)
    assert list(out) == ["engine aid_fd", "sweep 0.5"]
    assert out["engine aid_fd"] == {"linear_acc": 0.7, "seeds": 3.0}
    assert all(type(v) is float for r in out.values() for v in r.values())  # JSON numbers, not numpy scalars
    json.dumps(out)
    # the same names as claims.from_wide gives the per-seed runs of that table (numbers as :g)
    runs = pd.DataFrame({"group": ["sweep"], "label": [np.float64(0.5)], "seed": [0], "linear_acc": [0.6]})
    assert from_wide(runs, ["group", "label"], ["linear_acc"])["run"].tolist() == ["sweep 0.5"]
    single = table_results(pd.DataFrame({"m": ["base"], "x": [np.float32(1.5)]}).set_index("m"))
    assert single == {"base": {"x": pytest.approx(1.5)}}
