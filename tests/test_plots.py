"""Figure helpers of the notebooks: what each panel draws (lines, whiskers, axes scales, ticks, legends)."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from bilevel_ssl import plots  # noqa: E402


@pytest.fixture(autouse=True)
def close_figures():
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
