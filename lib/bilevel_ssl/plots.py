"""Figures: t-SNE of features, training curves, deterministic PNG output."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib.pyplot as plt  # no backend forced: inline in Jupyter, Agg when headless
import numpy as np


def tsne_embed(features: np.ndarray, *, seed: int = 0, perplexity: float = 30.0) -> np.ndarray:
    """2-D t-SNE (scikit-learn, PCA init, fixed seed: deterministic on one machine)."""
    from sklearn.manifold import TSNE

    perplexity = min(perplexity, (len(features) - 1) / 3)
    return TSNE(n_components=2, init="pca", random_state=seed, perplexity=perplexity).fit_transform(features)


def tsne_plot(features: np.ndarray, labels, *, ax=None, title: str = "", seed: int = 0, legend_title: str = "class",
              **scatter_kw):
    """Scatter of a t-SNE embedding coloured by label (seaborn); returns the axes."""
    import seaborn as sns

    emb = tsne_embed(features, seed=seed)
    if ax is None:
        _, ax = plt.subplots(figsize=(4, 4), dpi=100)
    labels = np.asarray(labels)
    order = [str(c) for c in np.unique(labels)]
    sns.scatterplot(x=emb[:, 0], y=emb[:, 1], hue=labels.astype(str), hue_order=order, palette="tab10", s=8,
                    linewidth=0, ax=ax, **scatter_kw)
    ax.legend(title=legend_title, fontsize=7, title_fontsize=7, markerscale=1.5, loc="best", frameon=False)
    ax.set(title=title, xticks=[], yticks=[])
    return ax


def curves_plot(histories: dict[str, list[dict]], key: str = "loss", *, ax=None):
    """One line per run of ``record[key]`` against epoch."""
    if ax is None:
        _, ax = plt.subplots(figsize=(5, 3.5), dpi=100)
    for name, hist in histories.items():
        ax.plot([r["epoch"] for r in hist], [r[key] for r in hist], marker="o", ms=3, label=name)
    ax.set(xlabel="epoch", ylabel=key)
    ax.legend()
    return ax


def savefig(fig, path: str | Path) -> Path:
    """PNG without a timestamp/version stamp: byte-identical across identical runs."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=fig.dpi, bbox_inches="tight", metadata={"Software": None})
    return path


# ------------------------------------------------------------------------------- figures of the claim notebooks

def fd_step_plot(sweep, points, dtypes):
    """Notebook 13: relative error of ``aid_fd`` against ``second_order`` over ``fd_r``, one panel per point; the
    dotted line marks the engine's default ``fd_r`` (read from :mod:`bilevel_ssl.hypergrad`, not restated here)."""
    from .hypergrad import make_engine

    default = make_engine("aid_fd").fd_r
    fig, axes = plt.subplots(1, len(points), figsize=(5 * len(points), 3.6), dpi=100, squeeze=False)
    for ax, point in zip(axes[0], points):
        for (dname, part), style in zip([(d, p) for d in dtypes for p in ("theta", "g")], ["o-", "s--", "o:", "s-."]):
            s = sweep[(sweep.point == point) & (sweep.dtype == dname)]
            ax.loglog(s.fd_r, s[f"{part}_rel_err"], style, ms=4, label=f"{part}-gradient, {dname}")
        ax.axvline(default, color="k", lw=0.7, ls=":", label=f"library default fd_r = {default:g}")
        ax.axhline(1.0, color="grey", lw=0.7)
        ax.set(xlabel="fd_r", ylabel="relative error vs second_order", title=f"aid_fd at the {point} point")
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def cosine_bars(check):
    """Notebook 13: each engine's θ- and g-gradient cosine with ``second_order``, bars per point."""
    import seaborn as sns

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4), dpi=100)
    long = check.reset_index().melt(id_vars=["point", "engine"], value_vars=["theta_cos", "g_cos"],
                                    var_name="gradient", value_name="cosine")
    for ax, part in zip(axes, ["theta_cos", "g_cos"]):
        sns.barplot(data=long[long.gradient == part], x="engine", y="cosine", hue="point", ax=ax)
        ax.set(title=f"{part.split('_')[0]}-gradient: cosine with second_order", ylim=(-1.05, 1.05), xlabel="")
        ax.tick_params(axis="x", rotation=30)
        ax.axhline(0, color="grey", lw=0.7)
    fig.tight_layout()
    return fig


def group_accuracy_bars(runs, metrics, panels: dict, *, ref: float | None = None, ref_label: str = "",
                        suffix: str = ""):
    """Bars of ``metrics`` per ``label`` (mean, 95% CI whiskers), one panel per ``group`` of ``panels``
    ({group: title}); diverged runs left out; ``ref`` a dashed reference line."""
    import seaborn as sns

    ok = runs[runs.diverged == 0] if "diverged" in runs else runs
    long = ok.melt(id_vars=["group", "label", "seed"], value_vars=metrics, var_name="protocol", value_name="accuracy")
    widths = [max(1, ok[ok.group == g]["label"].nunique() / 2) for g in panels]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 + 4 * sum(widths), 3.6), dpi=100, squeeze=False,
                             gridspec_kw={"width_ratios": widths})
    for ax, (group, title) in zip(axes[0], panels.items()):
        sns.barplot(data=long[long.group == group], x="label", y="accuracy", hue="protocol", errorbar=("ci", 95),
                    ax=ax)
        if ref is not None:
            ax.axhline(ref, color="k", ls="--", lw=0.8, label=ref_label)
        ax.set(title=f"{title}{suffix}", xlabel="", ylim=(0, 1.12))
        ax.legend(fontsize=7, loc="upper center", ncol=2)
        ax.tick_params(axis="x", rotation=20)
    fig.tight_layout()
    return fig


def accuracy_vs_time(points: dict, *, ref: tuple | None = None, ref_label: str = "", xlabel="seconds per epoch",
                     ylabel="linear accuracy", title=""):
    """One errorbar point per name: ``points = {name: (x, y, yerr)}``; ``ref = (x, y)`` dashed lines."""
    fig, ax = plt.subplots(figsize=(5.5, 3.8), dpi=100)
    for name, (x, y, yerr) in points.items():
        ax.errorbar(x, y, yerr=yerr, fmt="o", capsize=3, label=name)
    if ref is not None:
        ax.axhline(ref[1], color="k", ls="--", lw=0.8)
        ax.axvline(ref[0], color="k", ls="--", lw=0.8, label=ref_label)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def mean_curves(panels: dict, *, ylabel: str = "5-NN (monitor subset)", xlabel: str = "epoch", reference: str = ""):
    """One panel per title of ``panels = {title: {label: [curve of each seed]}}``, the mean over seeds per label;
    the label ``reference`` is drawn as a dashed black line."""
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 3.4), dpi=100, squeeze=False)
    for ax, (title, curves) in zip(axes[0], panels.items()):
        for label, per_seed in curves.items():
            if not per_seed:
                continue
            mean = np.mean(per_seed, axis=0)
            ax.plot(range(1, len(mean) + 1), mean, "k--" if label == reference else ".-", label=label)
        ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def sweep_plot(runs, sweeps: dict, metrics, *, base_line=None, claimed: dict | None = None, xlabels: dict | None = None,
               log2=("n", "m"), base_label: str = "base", title: str = ""):
    """Notebook 11: one column per non-empty sweep of ``sweeps = {sweep: values}``, one row per metric; a line per
    ``method`` (mean, seaborn 95% CI), the base line's mean ± 95% CI as a grey band (not for ``n``, whose base
    changes with the batch) and the paper's value of ``claimed`` as a dotted red line."""
    import seaborn as sns

    from bilevel_ssl.evaluate import mean_ci95

    present = [s for s, vals in sweeps.items() if vals]
    if not present:
        return None
    claimed, xlabels = claimed or {}, xlabels or {}
    fig, axes = plt.subplots(len(metrics), len(present), figsize=(3.6 * len(present), 3.0 * len(metrics)), dpi=100,
                             squeeze=False)
    for j, sweep in enumerate(present):
        sub = runs[runs.sweep == sweep].assign(value=lambda d: d.value.astype(float))
        for i, metric in enumerate(metrics):
            ax = axes[i, j]
            sns.lineplot(data=sub, x="value", y=metric, hue="method", palette={"+GeSSL": "tab:blue", "base": "tab:grey"},
                         marker="o", errorbar=("ci", 95), seed=0, ax=ax)
            if sweep != "n" and base_line is not None:
                mean, ci = mean_ci95(base_line[metric])
                ax.axhline(mean, color="tab:grey", ls="--", lw=1, label=base_label)
                ax.axhspan(mean - ci, mean + ci, color="tab:grey", alpha=0.15, lw=0)
            if sweep in claimed:
                ax.axvline(claimed[sweep], color="tab:red", ls=":", lw=1, label="paper")
            if sweep in log2:
                ax.set_xscale("log", base=2)
                ax.set_xticks(sweeps[sweep], [str(v) for v in sweeps[sweep]])
            ax.set(xlabel=xlabels.get(sweep, sweep), ylabel=metric if j == 0 else "")
            ax.legend(fontsize=7)
    fig.suptitle(title, y=1.02)
    fig.tight_layout()
    return fig


def time_sweep_plot(runs, values, *, base_time: float, base_label: str = "base", xlabel: str = "m",
                    acc: str = "linear_acc"):
    """Notebook 11: training time per epoch over the m sweep (log2 axis) and accuracy against that time."""
    import seaborn as sns

    tm = runs.assign(value=lambda d: d.value.astype(float))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(8, 3.2), dpi=100)
    sns.lineplot(data=tm, x="value", y="train_s_per_epoch", marker="o", errorbar=("ci", 95), seed=0, ax=ax1)
    ax1.axhline(base_time, color="tab:grey", ls="--", lw=1, label=base_label)
    ax1.set(xlabel=xlabel, ylabel="training time per epoch, s", title="cost of the m sweep*")
    ax1.legend(fontsize=7)
    ax1.set_xscale("log", base=2)
    ax1.set_xticks(values, [str(v) for v in values])
    agg = tm.groupby("value")[["train_s_per_epoch", acc]].mean()
    ax2.plot(agg.train_s_per_epoch, agg[acc], marker="o")
    for v, r in agg.iterrows():
        ax2.annotate(f"m {v:g}", (r.train_s_per_epoch, r[acc]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax2.set(xlabel="training time per epoch, s", ylabel=acc, title="accuracy vs time, Fig. 10")
    fig.text(0.01, -0.02, "* as measured when each run was trained: a cached run keeps the time of the run that "
             "trained it, on whatever load the machine had then", fontsize=7)
    fig.tight_layout()
    return fig


def loss_gradnorm_plot(histories: dict, methods, seeds, *, base: str = "base"):
    """Notebook 14 (Fig. 7 analog): training loss and probe loss per seed, and the per-epoch mean ± std of the
    update-gradient norm averaged over seeds; ``histories[(method, seed)]`` = the trainer's history."""
    import seaborn as sns
    from matplotlib.ticker import MaxNLocator

    palette = dict(zip(methods, sns.color_palette("tab10", len(methods))))
    fig, axes = plt.subplots(1, 3, figsize=(15, 3.6), dpi=100)
    for method in methods:
        c = palette[method]
        for i, seed in enumerate(seeds):
            h = histories[(method, seed)]
            ep = np.arange(1, len(h) + 1)
            kw = {"color": c, "alpha": 0.7, "lw": 1, "marker": "." if len(h) == 1 else None,
                  "label": method if i == 0 else None}
            axes[0].plot(ep, [r["loss"] for r in h], **kw)
            axes[1].plot(ep, [r["probe_loss"] for r in h], **kw)
        gn = np.array([[r["grad_norm"] for r in histories[(method, s)]] for s in seeds])
        sq = np.array([[r["grad_norm_sq"] for r in histories[(method, s)]] for s in seeds])
        gsd = np.sqrt(np.clip(sq - gn ** 2, 0, None))
        ep = np.arange(1, gn.shape[1] + 1)
        axes[2].plot(ep, gn.mean(0), color=c, marker=".", label=method)
        axes[2].fill_between(ep, gn.mean(0) - gsd.mean(0), gn.mean(0) + gsd.mean(0), color=c, alpha=0.2)
    axes[0].set(xlabel="epoch", ylabel="training loss (as logged)", title=f"training loss, {len(seeds)} seed(s)")
    axes[1].set(xlabel="epoch", ylabel=f"{base} loss on the probe batch", title="probe loss (comparable)")
    axes[2].set(xlabel="epoch", ylabel="‖update gradient‖", yscale="log",
                title="gradient norm: mean ± std within epoch")
    for ax in axes:
        ax.legend(fontsize=7)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    return fig


def cost_plot(bench, table, methods, *, base: str = "base", batch_size: int = 0):
    """Notebook 14 (Tables 28-29 / Fig. 2 analog): step time, peak memory and parameters relative to the base, and
    linear accuracy (mean ± 95% CI) against the benchmarked seconds per epoch."""
    import seaborn as sns

    palette = dict(zip(methods, sns.color_palette("tab10", len(methods))))
    fig, axes = plt.subplots(1, 2, figsize=(12, 3.6), dpi=100)
    rel = bench[["x_base_time", "x_base_memory", "x_base_params"]].rename(
        columns={"x_base_time": "step time", "x_base_memory": "peak memory", "x_base_params": "parameters"})
    rel.plot.bar(ax=axes[0], rot=25)
    axes[0].axhline(1.0, color="k", lw=0.8, ls="--")
    axes[0].set(ylabel=f"relative to {base} alone", title=f"cost per step at batch {batch_size} (benchmark)",
                xlabel="")
    for method in methods:
        axes[1].errorbar([bench.loc[method, "epoch_s_bench"]], [table.loc[method, "linear_acc"]],
                         yerr=[table.loc[method, "linear_acc_ci95"]], fmt="o", capsize=3, color=palette[method],
                         label=method)
    axes[1].set(xlabel="seconds per epoch (benchmark)", ylabel="linear accuracy", title="accuracy vs time")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    return fig


def heatmaps(frames: dict, *, xlabel: str = "", ylabel: str = "", fmt: str = ".3f"):
    """One annotated heatmap per ``{title: DataFrame}`` side by side (notebook 40's λ grid)."""
    import seaborn as sns

    fig, axes = plt.subplots(1, len(frames), figsize=(5 * len(frames), 3.6), dpi=100, squeeze=False)
    for ax, (title, frame) in zip(axes[0], frames.items()):
        sns.heatmap(frame, annot=True, fmt=fmt, cmap="viridis", ax=ax, cbar=False)
        ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    fig.tight_layout()
    return fig


def history_panels(histories: dict, keys: dict, *, hline: dict | None = None, title_suffix: str = "",
                   x: str = "epoch", logy: Sequence[str] = (), width: float = 4.4):
    """One panel per ``keys = {history key: title}``, a line per ``histories = {label: history}`` against the
    records' ``x`` (a history without that key is left out of its panel); ``hline = {history key: y}`` draws a
    dashed reference (notebook 40: L_mcr, L_comp and the series bound), ``logy`` the keys on a log axis."""
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, len(keys), figsize=(width * len(keys), 3.3), dpi=100, squeeze=False)
    xs = sorted({r[x] for h in histories.values() if h for r in h})
    for ax, (key, what) in zip(axes[0], keys.items()):
        for label, h in histories.items():
            if h and key in h[0]:
                ax.plot([r[x] for r in h], [r[key] for r in h], marker=".", label=label)
        if hline and key in hline:
            ax.axhline(hline[key], color="k", lw=0.8, ls="--")
        if key in logy:
            ax.set_yscale("log")
        ax.set(xlabel=x, title=f"{what}{title_suffix}")
        if len(xs) <= 12:  # a tick at every record (MaxNLocator falls back to fractions for one or two values)
            ax.set_xticks(xs)
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def errorbar_panels(panels: dict, series: dict, *, ylabel: str = "accuracy", hlines: dict | None = None,
                    logx: dict | None = None, title: str = ""):
    """One panel per ``panels = {x-axis label: frame}``, each frame indexed by numeric x values (e.g. a sweep's
    values) with a mean column and its ``<column>_ci95``: an errorbar line per ``series = {label: column}``
    (whiskers: the 95% CI; 0 where it is NaN), ``hlines = {label: y}`` a dashed line in that series' colour (a
    reference run), ``logx = {x-axis label: base}`` a log x axis.  The x ticks are the frame's values."""
    from matplotlib.ticker import NullFormatter

    fig, axes = plt.subplots(1, len(panels), figsize=(4.4 * len(panels), 3.4), dpi=100, squeeze=False)
    for ax, (xlabel, frame) in zip(axes[0], panels.items()):
        xs = [float(v) for v in frame.index]
        for i, (label, col) in enumerate(series.items()):
            ci = frame[f"{col}_ci95"] if f"{col}_ci95" in frame else np.zeros(len(frame))
            ax.errorbar(xs, frame[col], yerr=np.nan_to_num(np.asarray(ci, dtype=float)), marker="o", capsize=3,
                        color=f"C{i}", label=label)
            if hlines and label in hlines:
                ax.axhline(hlines[label], color=f"C{i}", ls="--", lw=0.8)
        if logx and xlabel in logx:
            ax.set_xscale("log", base=logx[xlabel])
            ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xticks(xs, [f"{v:g}" for v in xs])
        ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def tsne_panels(panels: dict, *, suptitle: str = "", seed: int = 0):
    """t-SNE scatters side by side, ``panels = {title: (features, labels)}``, one class legend right of the last."""
    fig, axes = plt.subplots(1, len(panels), figsize=(3.4 * len(panels), 3.5), dpi=100, squeeze=False)
    for ax, (title, (features, labels)) in zip(axes[0], panels.items()):
        tsne_plot(features, labels, ax=ax, seed=seed, title=title)
        ax.get_legend().remove()
    axes[0, -1].legend(*axes[0, 0].get_legend_handles_labels(), title="class", fontsize=7, title_fontsize=7,
                       markerscale=1.5, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    fig.suptitle(suptitle, y=1.02)
    fig.tight_layout()
    return fig


def smoothed(y, w: int):
    """Running mean of window ``w`` ("valid" part only); ``y`` itself when ``w <= 1`` or ``y`` is shorter."""
    y = np.asarray(y)
    if w <= 1 or len(y) < w:
        return y
    return np.convolve(y, np.ones(w) / w, mode="valid")


# ------------------------------------------------------------------------------- TC² Fig. 1 (notebook 20)

def gain_bars(gains, *, title: str = "", ylabel: str = "accuracy gain (same seed)"):
    """Bars of paired per-seed gains, one colour per metric (``gains``: index ``seed``, one column per metric), and
    the zero line: how often and by how much a method beats its base seed by seed (TC² Fig. 1a)."""
    import seaborn as sns

    fig, ax = plt.subplots(figsize=(max(5.0, 1.2 * len(gains) + 2), 3.4), dpi=100)
    long = gains.reset_index().melt(id_vars="seed", var_name="metric", value_name="gain")
    sns.barplot(data=long, x="seed", y="gain", hue="metric", ax=ax)
    ax.axhline(0, color="k", lw=0.8)
    ax.set(title=title, ylabel=ylabel, xlabel="seed")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return fig


def _method_style(method: str, others: list[str]) -> tuple[dict, str]:
    """Line style and marker of a notebook-20 method id: ``base`` grey dashed, ``sum`` (base+T) wide and pale - under
    the others, so that a baseline that never fires (PCGrad without conflicts) is seen lying on top of it -, ``tc2``
    red, any other (a gradient-surgery baseline) dotted in its own colour."""
    fixed = {"base": (dict(color="0.45", ls="--", lw=1.0), "s"), "sum": (dict(color="C1", lw=3.0, alpha=0.45), "o"),
             "tc2": (dict(color="C3", lw=1.3), "D")}
    return fixed.get(method) or (dict(color=f"C{others.index(method) + 4}", ls=":", lw=1.6), "x")


def cosine_curves(curves: dict, panels: dict, labels: dict, *, smooth: int = 1,
                  ylabel: str = "cosine of the task gradients (encoder)"):
    """TC² Fig. 1b-c: one panel per ``panels = {title: seed}``, a line per method of ``labels = {method id: name}``
    (drawing order) whose run of that seed has a curve ``curves[(method, seed)] = (steps, cosines)`` - the per-step
    cosine of the task gradients, as a running mean over ``smooth`` measurements (:func:`smoothed`, plotted at the
    steps that end each window) - and the zero line (below it the tasks conflict)."""
    others = [m for m in labels if m not in ("base", "sum", "tc2")]
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 3.6), dpi=100, squeeze=False, sharey=True)
    for ax, (title, seed) in zip(axes[0], panels.items()):
        for method, name in labels.items():
            if (method, seed) not in curves:
                continue
            steps, cos = curves[(method, seed)]
            ys = smoothed(cos, smooth)
            ax.plot(steps[len(steps) - len(ys):], ys, label=name, **_method_style(method, others)[0])
        ax.axhline(0, color="k", lw=0.7)
        ax.set(title=title, xlabel="training step", ylabel=ylabel)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def conflict_scatter(runs, gains, labels: dict, *, metric: str, split: str = "sum"):
    """TC² Fig. 1 (ii), "less conflict, better transfer?": ``metric`` against the mean task-gradient cosine of every
    run (left; ``runs``: one row per run with ``method``, ``seed``, ``mean_cos`` and ``metric``), and the per-seed
    gain of the ``split`` runs over their base (``gains[metric]``, index seed) against that run's mean cosine, seeds
    annotated (right)."""
    others = [m for m in labels if m not in ("base", "sum", "tc2")]
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6), dpi=100)
    for method, name in labels.items():
        r = runs[runs.method == method]
        style, marker = _method_style(method, others)
        axes[0].scatter(r["mean_cos"], r[metric], label=name, s=28, marker=marker, color=style["color"])
    axes[0].set(xlabel="mean gradient cosine over training", ylabel=metric, title="accuracy vs conflict, every run")
    axes[0].legend(fontsize=7)
    cos = runs[runs.method == split].set_index("seed")["mean_cos"].reindex(gains.index)
    axes[1].scatter(cos, gains[metric], color="C1")
    for s in gains.index:
        axes[1].annotate(str(s), (cos[s], gains.loc[s, metric]), fontsize=7)
    axes[1].axhline(0, color="k", lw=0.7)
    axes[1].set(xlabel=f"mean gradient cosine of the {labels[split]} run", ylabel=f"gain in {metric}",
                title="Fig. 1 (ii): less conflict, better transfer?")
    fig.tight_layout()
    return fig
