"""Figure helpers of the notebooks: what each panel draws (lines, whiskers, axes scales, ticks, legends, points)."""

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


def test_history_panels_x_key_missing_keys_and_log_axes():
    full = [{"alternation": a, "loss": 1.0 / a, "res": 10.0 ** -a} for a in (1, 2, 3)]
    partial = [{"alternation": a, "loss": 2.0 / a} for a in (1, 2, 3)]
    fig = plots.history_panels({"full": full, "baseline": partial, "none": None}, {"loss": "L", "res": "R"},
                               x="alternation", logy=("res",), hline={"loss": 0.5}, width=3.0)
    ax_loss, ax_res = fig.axes
    assert [line.get_label() for line in ax_loss.get_lines()[:2]] == ["full", "baseline"]
    assert [line.get_label() for line in ax_res.get_lines()] == ["full"]  # "baseline" has no "res"
    assert list(ax_res.get_lines()[0].get_xdata()) == [1, 2, 3] and ax_res.get_yscale() == "log"
    assert ax_loss.get_yscale() == "linear" and ax_loss.get_lines()[-1].get_ydata()[0] == 0.5
    assert list(ax_loss.get_xticks()) == [1, 2, 3] and ax_loss.get_xlabel() == "alternation"
    assert fig.get_size_inches()[0] == pytest.approx(6.0)
    one = plots.history_panels({"run": [{"epoch": 1, "loss": 1.0}]}, {"loss": "L"})
    assert list(one.axes[0].get_xticks()) == [1]  # one record: one integer tick, not fractions


def test_errorbar_panels_lines_whiskers_references_and_axes():
    sweep = pd.DataFrame({"acc": [0.5, 0.6, 0.55], "acc_ci95": [0.1, np.nan, 0.0], "knn": [0.4, 0.5, 0.45]},
                         index=[2.0, 4.0, 8.0])
    fig = plots.errorbar_panels({"n_t": sweep, "λ": sweep.iloc[:2]}, {"linear": "acc", "5-NN": "knn"},
                                hlines={"linear": 0.52}, logx={"n_t": 2}, title="T")
    ax1, ax2 = fig.axes
    assert len(ax1.containers) == 2 and ax1.get_xscale() == "log" and ax2.get_xscale() == "linear"
    line = ax1.containers[0].lines[0]
    assert list(line.get_xdata()) == [2.0, 4.0, 8.0] and list(line.get_ydata()) == [0.5, 0.6, 0.55]
    segs = ax1.containers[0].lines[2][0].get_segments()
    assert [s[1][1] - s[0][1] for s in segs] == pytest.approx([0.2, 0.0, 0.0])  # NaN CI drawn as no whisker
    no_ci = ax1.containers[1].lines[2][0].get_segments()  # no _ci95 column: zero-length whiskers
    assert [s[1][1] - s[0][1] for s in no_ci] == [0.0, 0.0, 0.0]
    assert [t.get_text() for t in ax1.get_xticklabels()] == ["2", "4", "8"]
    refs = [line for line in ax1.get_lines() if line.get_linestyle() == "--"]
    assert len(refs) == 1 and refs[0].get_ydata()[0] == 0.52 and refs[0].get_color() == line.get_color()
    assert ax1.get_xlabel() == "n_t" and ax1.get_title() == "T" and len(ax2.containers[0].lines[0].get_xdata()) == 2


def test_tsne_panels_one_legend_right_of_the_last():
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1, 2], 12)
    f = rng.normal(size=(36, 5)) + 4 * y[:, None]
    fig = plots.tsne_panels({"a": (f, y), "b": (f[::-1], y[::-1])}, suptitle="S")
    ax1, ax2 = fig.axes
    assert ax1.get_legend() is None and [t.get_text() for t in ax2.get_legend().get_texts()] == ["0", "1", "2"]
    assert [ax.get_title() for ax in fig.axes] == ["a", "b"] and fig._suptitle.get_text() == "S"
    assert len(ax1.collections[0].get_offsets()) == 36

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
