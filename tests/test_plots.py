"""The figure helpers of the claim notebooks draw what they are given (lines, points, panels), not just run."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from bilevel_ssl import plots  # noqa: E402

LABELS = {"base": "simclr", "sum": "simclr+T", "pcgrad": "simclr+T pcgrad", "tc2": "simclr+TC2"}


@pytest.fixture(autouse=True)
def _close():
    yield
    plt.close("all")


def test_gain_bars_one_bar_per_seed_and_metric():
    gains = pd.DataFrame({"seed": [0, 1, 2], "linear_acc": [0.1, -0.2, 0.05], "knn_acc": [0.0, 0.3, -0.1]}
                         ).set_index("seed")
    ax = plots.gain_bars(gains, title="t").axes[0]
    heights = sorted(round(p.get_height(), 6) for p in ax.patches if p.get_width() > 0)
    assert heights == sorted(round(v, 6) for v in gains.to_numpy().ravel())
    assert ax.get_title() == "t" and ax.get_xlabel() == "seed"


def test_cosine_curves_panels_methods_and_smoothing():
    steps = np.arange(1, 11)
    curves = {("base", 0): (steps, np.linspace(-1, 1, 10)), ("sum", 0): (steps, np.ones(10)),
              ("tc2", 0): (steps, np.zeros(10)), ("base", 1): (steps, np.zeros(10))}
    fig = plots.cosine_curves(curves, {"worst (seed 0)": 0, "best (seed 1)": 1}, LABELS, smooth=4)
    left, right = fig.axes
    assert left.get_title() == "worst (seed 0)" and right.get_title() == "best (seed 1)"
    lines = {ln.get_label(): ln for ln in left.get_lines() if not ln.get_label().startswith("_")}
    assert list(lines) == ["simclr", "simclr+T", "simclr+TC2"]  # labels order; pcgrad has no curve on seed 0
    x, y = lines["simclr"].get_data()
    assert list(x) == list(range(4, 11))  # a running mean of 4 is drawn at the step that ends each window
    assert y[0] == pytest.approx(np.mean(np.linspace(-1, 1, 10)[:4]))
    assert lines["simclr"].get_linestyle() == "--" and lines["simclr+T"].get_linewidth() == 3.0
    assert [ln.get_label() for ln in right.get_lines() if not ln.get_label().startswith("_")] == ["simclr"]


def test_conflict_scatter_every_run_and_the_gain_per_seed():
    runs = pd.DataFrame({"method": ["base", "sum", "base", "sum", "pcgrad"], "seed": [0, 0, 1, 1, 1],
                         "mean_cos": [0.1, 0.2, 0.3, -0.4, 0.5], "acc": [0.5, 0.6, 0.7, 0.8, 0.9]})
    gains = pd.DataFrame({"seed": [1, 0], "acc": [0.1, 0.1]}).set_index("seed")  # any seed order
    left, right = plots.conflict_scatter(runs, gains, LABELS, metric="acc").axes
    points = {c.get_label(): c.get_offsets().data.tolist() for c in left.collections}
    assert points["simclr+T"] == [[0.2, 0.6], [-0.4, 0.8]] and points["simclr+T pcgrad"] == [[0.5, 0.9]]
    assert points["simclr+TC2"] == []  # a method without runs is an empty series, not an error
    assert right.collections[0].get_offsets().data.tolist() == [[-0.4, 0.1], [0.2, 0.1]]  # x: the sum run's cosine
    assert sorted(t.get_text() for t in right.texts) == ["0", "1"]


def test_fd_step_plot_marks_the_engines_actual_default_fd_r():
    from bilevel_ssl.hypergrad import make_engine

    sweep = pd.DataFrame({"point": ["init"] * 2, "dtype": ["float32"] * 2, "fd_r": [1e-2, 1e-4],
                          "theta_rel_err": [0.5, 2.0], "g_rel_err": [0.1, 0.2]})
    ax = plots.fd_step_plot(sweep, {"init": None}, ["float32"]).axes[0]
    default = make_engine("aid_fd").fd_r
    marks = [ln for ln in ax.get_lines() if ln.get_label().startswith("library default")]
    assert len(marks) == 1 and marks[0].get_xdata()[0] == default and f"{default:g}" in marks[0].get_label()
    theta = next(ln for ln in ax.get_lines() if ln.get_label() == "theta-gradient, float32")
    assert list(theta.get_ydata()) == [0.5, 2.0]
