"""Evaluators of frozen encoders: k-NN, linear probe, few-shot episodes, confidence intervals; and the feature and
BatchNorm helpers around them (train-mode features and their normalisation for a linear head, BatchNorm statistics
re-estimated on downstream data).

All evaluators take *features* (``extract_features`` computes them once, in eval mode) so that one forward pass
serves every protocol.  Classifiers come from scikit-learn.
"""

from __future__ import annotations

import copy
import hashlib
from collections import OrderedDict

import numpy as np
import torch
import torch.nn as nn
from torch import Tensor

from .data import BatchStack, ImageSet, to_channels


#: Recent results of :func:`extract_features`, keyed by content (see there); at most this many are kept.
FEATURE_MEMO_SIZE = 16
_feature_memo: "OrderedDict[str, np.ndarray]" = OrderedDict()


def _tensor_digest(h, t: Tensor) -> None:
    t = t.detach()
    h.update(f"{t.dtype}|{tuple(t.shape)}|".encode())
    h.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def _feature_key(encoder: torch.nn.Module, images: Tensor, device, batch_size: int) -> str:
    """What eval-mode features are a function of: the architecture (its repr and class, the flags that change the
    rounding such as ``channels_last``), every parameter and buffer (bytes), the images (bytes), the device, the
    batch size and the number of torch threads (CPU kernels split reductions by thread)."""
    h = hashlib.sha256()
    h.update(f"{type(encoder).__qualname__}|{encoder!r}|{getattr(encoder, 'channels_last', None)}|{torch.device(device)}|"
             f"{batch_size}|{torch.get_num_threads()}|".encode())
    for name, t in (*encoder.named_parameters(), *encoder.named_buffers()):
        h.update(name.encode())
        _tensor_digest(h, t)
    _tensor_digest(h, images)
    return h.hexdigest()


@torch.no_grad()
def extract_features(encoder: torch.nn.Module, data: ImageSet | Tensor, *, device: str | torch.device = "cpu",
                     batch_size: int = 512) -> np.ndarray:
    """Backbone features of every image, in eval mode (BatchNorm running statistics), as float32 numpy.

    ``data``: an ImageSet (uint8) or a float tensor in [0, 1].  Gray/RGB is adapted to the encoder's input
    channels.  The encoder's train/eval mode is restored afterwards.

    Results are remembered by content: the key is a SHA-256 of the architecture, every parameter and buffer, the
    images, the device, the batch size and the thread count (:func:`_feature_key`), so a second call on the same
    encoder state and images returns a copy of the same array without a forward pass, and any change of a weight
    (an optimizer step, ``load_state_dict``, an in-place edit through ``.data``) or of an image is a miss.  Why: a
    notebook scores each encoder with several protocols (:func:`evaluate_encoder`, the σ-measure of
    :mod:`bilevel_ssl.universality`), each of which encoded the same three splits again - in the smoke notebooks
    about 40% of the evaluation time.  Hashing costs ~1% of a forward pass; the last :data:`FEATURE_MEMO_SIZE`
    results are kept.
    """
    images = data.images if isinstance(data, ImageSet) else data
    want = encoder.spec["in_channels"] if hasattr(encoder, "spec") else images.shape[1]
    if images.dtype == torch.uint8:
        images = to_channels(images, want)
    elif images.shape[1] != want:
        images = to_channels((images * 255).round().to(torch.uint8), want)
    key = _feature_key(encoder, images, device, batch_size)
    if key in _feature_memo:
        encoder.to(device)  # as a computed call would leave it
        _feature_memo.move_to_end(key)
        return _feature_memo[key].copy()
    was_training = encoder.training
    encoder.eval().to(device)
    feats = []
    for i in range(0, len(images), batch_size):
        x = images[i:i + batch_size].to(device)
        x = x.float().div(255) if x.dtype == torch.uint8 else x.float()
        feats.append(encoder(x).float().cpu())
    encoder.train(was_training)
    out = torch.cat(feats).numpy()
    _feature_memo[key] = out.copy()
    while len(_feature_memo) > FEATURE_MEMO_SIZE:
        _feature_memo.popitem(last=False)
    return out


def batch_features(backbone: nn.Module, images: Tensor, idx_batches, device) -> Tensor:
    """Features of ``images[b]`` (uint8) for each index batch ``b``, concatenated, without gradient and in the
    backbone's current mode (train mode: batch statistics)."""
    with torch.no_grad():
        return torch.cat([backbone(images[b].to(device).float().div_(255)) for b in idx_batches])


def feature_normalizer(feats: Tensor) -> tuple[Tensor, Tensor]:
    """Per-feature mean and one scale, the root mean square of the centred features (mean over dimensions of the
    per-dimension variance): features then have unit average variance, whatever the encoder's feature scale.

    Why one scale and not a per-dimension std (the StandardScaler of :mod:`bilevel_ssl.semisup`): a backbone with
    nearly dead feature dimensions has tiny per-dimension stds, and dividing by them amplifies those dimensions by
    orders of magnitude as soon as the backbone moves - measured on a BiSSL θ_P (:mod:`bilevel_ssl.bissl`; mnistm5k
    SimCLR, digits): fine-tuning behind a per-dimension standardisation diverged (training loss 1e14, top-1 0.29),
    with raw features it reached 0.97.  A single scale keeps the features' relative geometry.  Used by BiSSL's
    downstream head (:class:`bilevel_ssl.bissl.DownstreamHead`, ``head_standardize``)."""
    mean = feats.mean(0)
    scale = ((feats - mean) ** 2).mean().sqrt().clamp_min(1e-12)
    return mean, scale


@torch.no_grad()
def reestimate_bn(backbone: nn.Module, data: ImageSet | Tensor, *, batch_size: int = 256, n_batches: int = 100,
                  seed: int = 0, device: str | torch.device = "cpu") -> nn.Module:
    """A copy of ``backbone`` whose BatchNorm running statistics are re-estimated on ``data`` (BiSSL App. C.2: the
    downstream training set in batches of 256, about 100 batches forward-passed), returned in eval mode.

    The statistics are reset and accumulated as a *cumulative* average over the ``n_batches`` batches (BatchNorm
    momentum None), i.e. the mean of the per-batch statistics; batches are successive full batches of shuffled
    permutations (a new permutation when one is used up; all images in one batch if there are fewer than
    ``batch_size``).  Learned parameters are not touched; ``backbone`` itself is not modified."""
    images = data.images if isinstance(data, ImageSet) else data
    if n_batches < 1 or batch_size < 2:
        raise ValueError(f"n_batches / batch_size: must be >= 1 / >= 2, got {n_batches} / {batch_size}")
    bb = copy.deepcopy(backbone).to(device)
    want = backbone.spec["in_channels"] if hasattr(backbone, "spec") else images.shape[1]
    if images.dtype == torch.uint8:
        images = to_channels(images, want)
    bns = [m for m in bb.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    bb.train()
    bs = min(batch_size, len(images))
    stack = BatchStack(len(images), bs, torch.Generator().manual_seed(seed))
    for idx in stack.phase(n_batches):
        x = images[idx].to(device)
        bb(x.float().div_(255) if x.dtype == torch.uint8 else x.float())
    for m, mom in zip(bns, saved):
        m.momentum = mom
    return bb.eval()


def one_blas_thread(fn):
    """Run ``fn`` with one BLAS thread (numpy/scipy's OpenBLAS, via threadpoolctl; torch's own kernels are not
    affected).  The scikit-learn fits of the protocol are small (hundreds to a few thousand samples), where a
    multi-threaded BLAS spends 10-60x the arithmetic handing work between threads: measured on the 2-core CI
    machine, the linear probe on 2000 x 256 Conv-4 features took 11.4 s with the default threads and 0.18 s with
    one; 300 five-way five-shot episodes 16 s and 0.9 s, with identical results.  One thread also makes the
    numbers independent of the machine's core count."""
    import functools

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        from threadpoolctl import threadpool_limits

        with threadpool_limits(limits=1, user_api="blas"):
            return fn(*args, **kwargs)

    return wrapped


def raw_pixels(data: ImageSet) -> np.ndarray:
    """The raw-pixel baseline: flattened images in [0, 1]."""
    return data.images.flatten(1).float().div(255).numpy()


@one_blas_thread
def knn_accuracy(train_x: np.ndarray, train_y, test_x: np.ndarray, test_y, *, k: int = 5, weighted: bool = False,
                 temperature: float = 0.07) -> float:
    """k-NN top-1 accuracy with cosine similarity.

    Plain: majority vote of the k nearest.  ``weighted``: votes weighted by ``exp(sim / temperature)`` as in
    Wu et al. (2018) and the DINO / solo-learn k-NN monitor (τ = 0.07).
    """
    from sklearn.neighbors import KNeighborsClassifier

    weights = (lambda d: np.exp((1.0 - d) / temperature)) if weighted else "uniform"
    clf = KNeighborsClassifier(n_neighbors=k, metric="cosine", weights=weights, algorithm="brute")
    return float(clf.fit(train_x, np.asarray(train_y)).score(test_x, np.asarray(test_y)))


@one_blas_thread
def linear_probe(train_x: np.ndarray, train_y, test_x: np.ndarray, test_y, *, C: float = 1.0,
                 max_iter: int = 2000, seed: int = 0) -> dict[str, float]:
    """Logistic regression on standardised frozen features (the linear-evaluation protocol at small scale:
    a convex L-BFGS fit instead of 500 SGD epochs).  Returns top-1 and top-5 accuracy."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import top_k_accuracy_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clf = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=max_iter, random_state=seed))
    clf.fit(train_x, np.asarray(train_y))
    proba = clf.predict_proba(test_x)
    labels = clf.classes_
    top5 = top_k_accuracy_score(test_y, proba, k=min(5, len(labels) - 1), labels=labels) if len(labels) > 2 else float("nan")
    return {"top1": float(clf.score(test_x, np.asarray(test_y))), "top5": float(top5)}


def mean_ci95(values) -> tuple[float, float]:
    """Mean and half-width of the 95% confidence interval (Student t; 0 for a single value)."""
    from scipy import stats

    v = np.asarray(values, dtype=float)
    if len(v) < 2:
        return float(v.mean()), 0.0
    return float(v.mean()), float(stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v)))


def episodes(labels, *, n_way: int, k_shot: int, n_query: int, n_episodes: int, seed: int):
    """Indices of ``n_episodes`` N-way K-shot episodes: a generator of (support, query) index arrays, class-major
    (support = ``k_shot`` per chosen class, query = ``n_query`` per chosen class, disjoint), the episode's label
    of position i being i // k_shot (support) and i // n_query (query).  Validated before the first episode;
    numpy ``default_rng(seed)``: per episode the classes, then each class's images, in that order."""
    y = np.asarray(labels)
    classes = np.unique(y)
    if n_way > len(classes):
        raise ValueError(f"n_way: {n_way} exceeds the {len(classes)} classes available; allowed: 2..{len(classes)}")
    by_class = {c: np.flatnonzero(y == c) for c in classes}
    short = [c.item() for c in classes if len(by_class[c]) < k_shot + n_query]
    if short:
        raise ValueError(f"k_shot, n_query: k_shot + n_query = {k_shot + n_query} exceeds the images of classes "
                         f"{short}")

    def generate():
        rng = np.random.default_rng(seed)
        for _ in range(n_episodes):
            chosen = rng.choice(classes, n_way, replace=False)
            s_idx, q_idx = [], []
            for c in chosen:
                idx = rng.choice(by_class[c], k_shot + n_query, replace=False)
                s_idx.append(idx[:k_shot])
                q_idx.append(idx[k_shot:])
            yield np.concatenate(s_idx), np.concatenate(q_idx)

    return generate()


@one_blas_thread
def few_shot(features: np.ndarray, labels, *, n_way: int = 5, k_shot: int = 5, n_query: int = 15,
             n_episodes: int = 600, seed: int = 0, classifier: str = "logreg") -> dict[str, float]:
    """N-way K-shot episodes on (novel-class) features: mean accuracy ± 95% CI over episodes.

    Each episode draws ``n_way`` classes, ``k_shot`` support and ``n_query`` query images per class (disjoint).
    ``classifier``: ``logreg`` - logistic regression on L2-normalised features (Tian et al. 2020, "Rethinking
    few-shot"); ``prototype`` - nearest class mean by cosine similarity (Snell et al. 2017).
    """
    from sklearn.linear_model import LogisticRegression

    if classifier not in ("logreg", "prototype"):
        raise ValueError(f"classifier: unknown {classifier!r}; allowed: logreg, prototype")
    x = features / np.linalg.norm(features, axis=1, keepdims=True).clip(1e-12)
    accs = np.empty(n_episodes)
    for e, (s_idx, q_idx) in enumerate(episodes(labels, n_way=n_way, k_shot=k_shot, n_query=n_query,
                                                 n_episodes=n_episodes, seed=seed)):
        s_y, q_y = np.repeat(np.arange(n_way), k_shot), np.repeat(np.arange(n_way), n_query)
        if classifier == "prototype":
            protos = x[s_idx].reshape(n_way, k_shot, -1).mean(1)
            pred = (x[q_idx] @ protos.T).argmax(1)
        else:
            pred = LogisticRegression(max_iter=1000).fit(x[s_idx], s_y).predict(x[q_idx])
        accs[e] = (pred == q_y).mean()
    mean, ci = mean_ci95(accs)
    return {"mean": mean, "ci95": ci, "episodes": n_episodes}


PROTOCOL = {
    "knn_acc": "5-NN (cosine, majority vote), base-class train split -> held-out base-class test split",
    "knn_weighted_acc": "5-NN with exp(sim/0.07) vote weights, same splits",
    "linear_acc": "logistic regression (L-BFGS, standardised features), same splits",
    "fewshot_5w1s_acc": "5-way 1-shot episodes on the novel classes (15 queries/class, logistic regression), mean",
    "fewshot_5w5s_acc": "5-way 5-shot episodes on the novel classes, mean (±95% CI over episodes in *_ci95)",
}


def evaluate_encoder(encoder, splits, *, n_episodes: int = 300, seed: int = 0, device="cpu",
                     shots: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """The notebooks' standard protocol (:data:`PROTOCOL`) for one encoder (``None`` = raw pixels) on a
    :class:`bilevel_ssl.data.Splits`: k-NN, weighted k-NN and linear on the base classes, few-shot on the novel
    classes, ``k``-shot for each ``k`` of ``shots`` (skipped when the split has no novel class or ``shots`` is
    empty: then the novel images are not even encoded)."""
    feat = raw_pixels if encoder is None else (lambda d: extract_features(encoder, d, device=device))
    f_tr, f_te = feat(splits.train), feat(splits.test)
    y_tr, y_te = splits.train.labels, splits.test.labels
    r = {"knn_acc": knn_accuracy(f_tr, y_tr, f_te, y_te, k=5),
         "knn_weighted_acc": knn_accuracy(f_tr, y_tr, f_te, y_te, k=5, weighted=True),
         "linear_acc": linear_probe(f_tr, y_tr, f_te, y_te, seed=seed)["top1"]}
    if splits.novel is not None and shots:
        f_nov = feat(splits.novel)
        for k in shots:
            fs = few_shot(f_nov, splits.novel.labels, n_way=min(5, len(splits.novel_classes)), k_shot=k,
                          n_query=15, n_episodes=n_episodes, seed=seed)
            r[f"fewshot_5w{k}s_acc"], r[f"fewshot_5w{k}s_ci95"] = fs["mean"], fs["ci95"]
    return r
