"""The σ-measure of universality (GeSSL, App. F.4) and the learning-universality ratio r (GeSSL, Table 16).

Definition 3.1 of the GeSSL paper calls a representation *universal* when it has **discriminability** (a model
trained on a training task predicts the labels of its training samples), **generalizability** (... of that
task's test samples) and **transferability** (... of the samples of class-disjoint test tasks).  App. F.4 scores
each with the σ-measure: "the performance difference is quantified using the KL divergence between the
predicted and true class probability distributions" of a light-weight classification head ("add a MLP after the
feature extractor") attached to the frozen encoder, then "For convenience, we convert the normalized σ into a
'goodness' score S = 1 − norm(σ)":

* discriminability - the head is fitted on the train features and σ is the mean KL over those same samples;
* generalizability - the same head, σ on the test split (same classes); "the train/test σ values and their
  difference" quantify the generalisation gap, here ``S_gen_gap = S_disc − S_gen``;
* transferability - "train/evaluate a light-weight head per new task, compute the task-specific σ values, and
  aggregate them (e.g., by averaging)": N-way K-shot tasks drawn from the class-disjoint novel features, a new
  head per task fitted on the support set, σ on its query set, averaged over tasks.

Like :mod:`bilevel_ssl.evaluate`, the evaluator takes *features*; :func:`universality_report` extracts them for any
encoder (``None`` = raw pixels) on a :class:`bilevel_ssl.data.Splits`.
"""

from __future__ import annotations

import warnings

import numpy as np

from .evaluate import one_blas_thread

PROB_EPS = 1e-12
"""Probabilities are clipped to ``[PROB_EPS, 1]`` before the log, so one sample's KL is at most
``-log(1e-12) ≈ 27.6`` nats (a head that puts exactly zero mass on the true class)."""

HEADS = ("logreg", "mlp")
MLP_HIDDEN = 64
RATIO_KINDS = ("accuracy", "error")


def kl_to_onehot(proba: np.ndarray, labels) -> np.ndarray:
    """Per-sample KL(one-hot(y) ‖ p) = Σ_c 1[c = y] log(1[c = y] / p_c) = −log p_y, in nats.

    ``proba``: (N, C) predicted class probabilities, columns indexed by class position; ``labels``: (N,) integer
    column indices in ``[0, C)``.  ``p_y`` is clipped to ``[PROB_EPS, 1]``.  The paper's example,
    ``p = [0.81, 0.09, 0.03, 0.07]`` against ``[1, 0, 0, 0]``, gives ``−log 0.81 ≈ 0.211``.
    """
    p = np.asarray(proba, dtype=float)
    y = np.asarray(labels)
    if p.ndim != 2 or y.shape != (len(p),):
        raise ValueError(f"proba: expected (N, C) probabilities for {y.shape} labels, got {p.shape}")
    if len(y) and (y.min() < 0 or y.max() >= p.shape[1]):
        raise ValueError(f"labels: must be column indices in [0, {p.shape[1]}), got range [{y.min()}, {y.max()}]")
    return -np.log(np.clip(p[np.arange(len(y)), y], PROB_EPS, 1.0))


def normalise_sigma(sigma: float, n_classes: int) -> float:
    """``norm(σ) = clip(σ / log C, 0, 1)`` for a C-way task (C ≥ 2).

    The paper only says the σ-scores are "normalized" (App. F.4, Fig. 5: "we normalize the results of σ-measure
    scores on different datasets").  ``log C`` is the σ of the uninformed predictor (uniform probabilities, or
    the class prior of a balanced task) and 0 is the σ of "the optimal model [...] assumed to output the ground
    truth", so this maps the oracle to 0 and chance to 1 for every number of classes - which is what makes scores
    of different datasets and tasks comparable and keeps ``S = 1 − norm(σ)`` in [0, 1], with S → 1 as σ → 0 as
    the paper requires.  Heads that are confidently wrong (σ > log C) are clipped to 1, i.e. "no better than
    chance".  (A min-max normalisation across the compared methods, which Fig. 5 might also mean, is relative
    and undefined for one encoder, so it is not used.)
    """
    if n_classes < 2:
        raise ValueError(f"n_classes: need at least 2 classes to normalise σ, got {n_classes}")
    return float(np.clip(sigma / np.log(n_classes), 0.0, 1.0))


def _check_args(head: str, n_way: int, k_shot: int, n_query: int, n_tasks: int) -> None:
    if head not in HEADS:
        raise ValueError(f"head: unknown {head!r}; allowed: {', '.join(HEADS)}")
    for key, value, low in (("n_way", n_way, 2), ("k_shot", k_shot, 1), ("n_query", n_query, 1),
                            ("n_tasks", n_tasks, 1)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise ValueError(f"{key}: must be an integer >= {low}, got {value!r}")


def _check_xy(x: np.ndarray, y: np.ndarray, xname: str, yname: str) -> None:
    if x.ndim != 2:
        raise ValueError(f"{xname}: expected (N, D) features, got shape {x.shape}")
    if y.shape != (len(x),):
        raise ValueError(f"{yname}: expected {len(x)} labels (one per row of {xname}), got shape {y.shape}")


def _make_head(head: str, seed: int):
    """A light head on standardised features: logistic regression, or an MLP with one hidden layer."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if head == "logreg":
        clf = LogisticRegression(C=1.0, max_iter=2000, random_state=seed)
    else:
        clf = MLPClassifier(hidden_layer_sizes=(MLP_HIDDEN,), max_iter=500, random_state=seed)
    return make_pipeline(StandardScaler(), clf)


def _fit(head: str, seed: int, x: np.ndarray, y: np.ndarray):
    from sklearn.exceptions import ConvergenceWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return _make_head(head, seed).fit(x, y)


def _sigma(clf, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(mean KL to the one-hot labels, accuracy) of a fitted head; every label must be one of its classes."""
    proba = clf.predict_proba(x)
    idx = np.searchsorted(clf.classes_, y)
    return float(kl_to_onehot(proba, idx).mean()), float((clf.classes_[proba.argmax(1)] == y).mean())


@one_blas_thread
def sigma_measure(train_x: np.ndarray, train_y, test_x: np.ndarray, test_y, novel_x: np.ndarray | None = None,
                  novel_y=None, *, head: str = "logreg", n_way: int = 5, k_shot: int = 5, n_query: int = 15,
                  n_tasks: int = 100, seed: int = 0) -> dict[str, float]:
    """The σ-measure of universality (GeSSL App. F.4) from frozen features: raw σ (nats) and S = 1 − norm(σ).

    * ``sigma_disc``: a head fitted on ``train_x`` and scored on ``train_x`` (discriminability);
    * ``sigma_gen``: the same head scored on ``test_x``, whose labels must be among the train classes
      (generalizability); ``S_gen_gap = S_disc − S_gen``;
    * ``sigma_trans`` (only with ``novel_x, novel_y``): ``n_tasks`` seeded ``n_way``-way tasks on the novel
      (class-disjoint) features, ``k_shot`` support and ``n_query`` query samples per class, a new head per task
      fitted on the support and scored on the query; the mean σ over tasks, ``sigma_trans_ci95`` its 95% CI.

    σ = mean over samples of KL(one-hot ‖ p) = −log p_y (:func:`kl_to_onehot`, p clipped at :data:`PROB_EPS`).
    ``sigma_*_norm`` = σ / log C clipped to [0, 1] (:func:`normalise_sigma`; C = number of train classes for
    disc/gen, ``n_way`` for trans): 0 for the oracle, 1 for chance.  ``S_*`` = 1 − ``sigma_*_norm``;
    ``S`` = mean of the available ``S_disc``, ``S_gen``, ``S_trans``.  ``acc_*`` are the heads' top-1 accuracies.

    ``head``: ``logreg`` - logistic regression (L-BFGS, C = 1) on standardised features; ``mlp`` - the paper's
    "MLP after the feature extractor": scikit-learn's MLPClassifier with one hidden layer of 64 ReLU units
    (Adam, ≤ 500 epochs), on standardised features.  Arguments are validated before anything is fitted.
    """
    _check_args(head, n_way, k_shot, n_query, n_tasks)
    train_x, test_x = np.asarray(train_x), np.asarray(test_x)
    train_y, test_y = np.asarray(train_y), np.asarray(test_y)
    _check_xy(train_x, train_y, "train_x", "train_y")
    _check_xy(test_x, test_y, "test_x", "test_y")
    if test_x.shape[1] != train_x.shape[1]:
        raise ValueError(f"test_x: {test_x.shape[1]} features but train_x has {train_x.shape[1]}")
    classes = np.unique(train_y)
    if len(classes) < 2:
        raise ValueError(f"train_y: need at least 2 classes, got {classes.tolist()}")
    unseen = sorted(set(np.unique(test_y).tolist()) - set(classes.tolist()))
    if unseen:
        raise ValueError(f"test_y: classes {unseen} are not in train_y (the test split must share the train classes)")
    if (novel_x is None) != (novel_y is None):
        raise ValueError("novel_x, novel_y: give both or neither")
    if novel_x is not None:
        novel_x, novel_y = np.asarray(novel_x), np.asarray(novel_y)
        _check_xy(novel_x, novel_y, "novel_x", "novel_y")
        from .evaluate import episodes

        tasks = episodes(novel_y, n_way=n_way, k_shot=k_shot, n_query=n_query, n_episodes=n_tasks, seed=seed)

    clf = _fit(head, seed, train_x, train_y)
    sigma_disc, acc_disc = _sigma(clf, train_x, train_y)
    sigma_gen, acc_gen = _sigma(clf, test_x, test_y)
    out = {"sigma_disc": sigma_disc, "sigma_gen": sigma_gen,
           "sigma_disc_norm": normalise_sigma(sigma_disc, len(classes)),
           "sigma_gen_norm": normalise_sigma(sigma_gen, len(classes)),
           "acc_disc": acc_disc, "acc_gen": acc_gen, "n_classes": len(classes)}

    if novel_x is not None:
        from .evaluate import mean_ci95

        sigmas, accs = np.empty(n_tasks), np.empty(n_tasks)
        s_y, q_y = np.repeat(np.arange(n_way), k_shot), np.repeat(np.arange(n_way), n_query)
        for t, (s_idx, q_idx) in enumerate(tasks):  # the same episodes as evaluate.few_shot with this seed
            task_clf = _fit(head, seed, novel_x[s_idx], s_y)
            sigmas[t], accs[t] = _sigma(task_clf, novel_x[q_idx], q_y)
        out["sigma_trans"], out["sigma_trans_ci95"] = mean_ci95(sigmas)
        out["sigma_trans_norm"] = normalise_sigma(out["sigma_trans"], n_way)
        out["acc_trans"] = float(accs.mean())
        out["n_tasks"] = n_tasks

    parts = [p for p in ("disc", "gen", "trans") if f"sigma_{p}_norm" in out]
    for p in parts:
        out[f"S_{p}"] = 1.0 - out[f"sigma_{p}_norm"]
    out["S"] = float(np.mean([out[f"S_{p}"] for p in parts]))
    out["S_gen_gap"] = out["S_disc"] - out["S_gen"]
    return out


def universality_report(encoder, splits, *, device="cpu", **kw) -> dict[str, float]:
    """:func:`sigma_measure` of an encoder (``None`` = raw pixels) on a :class:`bilevel_ssl.data.Splits`.

    Features come from :func:`bilevel_ssl.evaluate.extract_features` (eval mode) or
    :func:`bilevel_ssl.evaluate.raw_pixels`.  Transferability is scored on ``splits.novel`` when the split has
    one; ``n_way`` then defaults to ``min(5, number of novel classes)``.  ``kw`` go to :func:`sigma_measure`.
    """
    from .evaluate import extract_features, raw_pixels

    allowed = {"head", "n_way", "k_shot", "n_query", "n_tasks", "seed"}
    unknown = sorted(set(kw) - allowed)
    if unknown:
        raise ValueError(f"universality_report: unknown option(s) {unknown}; allowed: {', '.join(sorted(allowed))}")
    if splits.novel is not None:
        kw.setdefault("n_way", min(5, len(splits.novel_classes)))
    _check_args(kw.get("head", "logreg"), kw.get("n_way", 5), kw.get("k_shot", 5), kw.get("n_query", 15),
                kw.get("n_tasks", 100))
    feat = raw_pixels if encoder is None else (lambda d: extract_features(encoder, d, device=device))
    novel = (feat(splits.novel), splits.novel.labels.numpy()) if splits.novel is not None else (None, None)
    return sigma_measure(feat(splits.train), splits.train.labels.numpy(), feat(splits.test),
                         splits.test.labels.numpy(), *novel, **kw)


def universality_ratio(base_values, method_values, kind: str = "accuracy") -> np.ndarray:
    """The learning-universality ratio r of GeSSL Table 16, per epoch; r < 1 means the method (GeSSL) is better.

    The paper: "We calculate the accuracy of SimCLR before and after the introduction of GeSSL and the ratio r
    of their effects [...]. If r < 1, it means that the representation effect learned by the model in each epoch
    of training is better when introducing GeSSL."  Table 16's rows are the two accuracies and r equals
    **accuracy_base / accuracy_method** to the printed three decimals in all ten columns (20.1 / 42.4 = 0.474,
    ..., 88.6 / 94.2 = 0.941); an error ratio would not match ((100 − 42.4) / (100 − 20.1) = 0.721 ≠ 0.474).

    ``kind``: ``accuracy`` (higher is better; the paper's r) - ``base / method``; ``error`` (lower is better: an
    error rate, a loss or a σ-measure) - ``method / base``.  Either way r < 1 iff the method is better.
    Inputs are 1-D sequences of equal length (one value per epoch); a zero or non-finite denominator raises.
    """
    if kind not in RATIO_KINDS:
        raise ValueError(f"kind: unknown {kind!r}; allowed: {', '.join(RATIO_KINDS)}")
    base, method = np.asarray(base_values, dtype=float), np.asarray(method_values, dtype=float)
    if base.ndim != 1:
        raise ValueError(f"base_values: expected a 1-D sequence (one value per epoch), got shape {base.shape}")
    if method.shape != base.shape:
        raise ValueError(f"method_values: length {method.shape} differs from base_values {base.shape}")
    num, den, den_name = (base, method, "method_values") if kind == "accuracy" else (method, base, "base_values")
    if not np.all(np.isfinite(num)) or not np.all(np.isfinite(den)) or np.any(den == 0):
        raise ValueError(f"{den_name}: the denominator of r must be finite and non-zero, and the numerator finite")
    return num / den
