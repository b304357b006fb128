"""Figures: t-SNE of features, training curves, deterministic PNG output."""

from __future__ import annotations

from pathlib import Path

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
