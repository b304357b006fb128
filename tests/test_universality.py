import numpy as np
import pytest
import torch
from scipy.stats import entropy

from bilevel_ssl.data import ImageSet, make_splits
from bilevel_ssl.models import make_backbone
from bilevel_ssl.universality import (PROB_EPS, kl_to_onehot, normalise_sigma, sigma_measure, universality_ratio,
                                      universality_report)


def blobs(n_per=30, classes=5, dim=8, spread=0.05, seed=0, centers_seed=0):
    """Gaussian blobs around fixed centres (``centers_seed``), samples drawn with ``seed``."""
    centers = np.random.default_rng(centers_seed).normal(size=(classes, dim)) * 3
    rng = np.random.default_rng(seed)
    x = np.concatenate([c + spread * rng.normal(size=(n_per, dim)) for c in centers])
    return x.astype(np.float32), np.repeat(np.arange(classes), n_per)


def blob_splits(spread, n_novel=8):
    x, y = blobs(spread=spread, seed=1)
    xt, yt = blobs(spread=spread, seed=2)
    xn, yn = blobs(n_per=12, classes=n_novel, spread=spread, seed=3, centers_seed=9)
    return x, y, xt, yt, xn, yn


FAST = dict(n_tasks=8, k_shot=3, n_query=5)


def test_kl_to_onehot_paper_example_and_clipping():
    p = np.array([[0.81, 0.09, 0.03, 0.07], [0.25, 0.25, 0.25, 0.25], [1.0, 0.0, 0.0, 0.0]])
    kl = kl_to_onehot(p, [0, 2, 1])
    ref = [entropy(np.eye(4)[0], p[0]), np.log(4)]  # scipy's KL(pk || qk), an independent formula
    np.testing.assert_allclose(kl[:2], ref, rtol=1e-12)
    assert kl[0] == pytest.approx(0.2107, abs=1e-4)  # -log 0.81
    assert kl[2] == pytest.approx(-np.log(PROB_EPS))  # zero mass on the true class: clipped, finite
    with pytest.raises(ValueError, match="labels"):
        kl_to_onehot(p, [0, 4, 1])


def test_normalise_sigma_oracle_chance_and_clip():
    assert normalise_sigma(0.0, 5) == 0.0
    assert normalise_sigma(np.log(5), 5) == pytest.approx(1.0)
    assert normalise_sigma(0.5 * np.log(10), 10) == pytest.approx(0.5)
    assert normalise_sigma(30.0, 5) == 1.0
    with pytest.raises(ValueError, match="n_classes"):
        normalise_sigma(0.1, 1)


def test_sigma_disc_gen_match_hand_formula_on_sklearn_head():
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x, y, xt, yt, _, _ = blob_splits(spread=3.0)
    y, yt = y + 10, yt + 10  # labels that are not column indices
    r = sigma_measure(x, y, xt, yt)
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)).fit(x, y)
    for key, (xx, yy) in {"disc": (x, y), "gen": (xt, yt)}.items():
        proba = clf.predict_proba(xx)
        onehot = (clf.classes_[None, :] == yy[:, None]).astype(float)
        ref = np.mean([entropy(o, np.clip(p, PROB_EPS, 1)) for o, p in zip(onehot, proba)])
        assert r[f"sigma_{key}"] == pytest.approx(ref, rel=1e-6)
        assert r[f"S_{key}"] == pytest.approx(1 - min(1.0, ref / np.log(5)), rel=1e-6)
        assert r[f"acc_{key}"] == pytest.approx(clf.score(xx, yy))
    assert r["S"] == pytest.approx((r["S_disc"] + r["S_gen"]) / 2)
    assert r["S_gen_gap"] == pytest.approx(r["S_disc"] - r["S_gen"])
    assert "sigma_trans" not in r and "S_trans" not in r


def test_sigma_trans_matches_per_task_reference():
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x, y, xt, yt, xn, yn = blob_splits(spread=3.0)
    r = sigma_measure(x, y, xt, yt, xn, yn, n_way=4, seed=3, **FAST)
    # replay the documented task sampler: classes, then k_shot + n_query samples per class
    rng, classes, sig = np.random.default_rng(3), np.unique(yn), []
    for _ in range(FAST["n_tasks"]):
        chosen = rng.choice(classes, 4, replace=False)
        idx = [rng.choice(np.flatnonzero(yn == c), 8, replace=False) for c in chosen]
        s = np.concatenate([i[:3] for i in idx])
        q = np.concatenate([i[3:] for i in idx])
        clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)).fit(xn[s], np.repeat(range(4), 3))
        p = clf.predict_proba(xn[q])[np.arange(20), np.repeat(range(4), 5)]
        sig.append(-np.log(np.clip(p, PROB_EPS, 1)).mean())
    assert r["sigma_trans"] == pytest.approx(np.mean(sig), rel=1e-6)
    assert r["S_trans"] == pytest.approx(1 - min(1.0, np.mean(sig) / np.log(4)), rel=1e-6)
    assert r["S"] == pytest.approx((r["S_disc"] + r["S_gen"] + r["S_trans"]) / 3)


@pytest.mark.parametrize("head", ["logreg", "mlp"])
def test_oracle_like_blobs_score_near_one(head):
    r = sigma_measure(*blob_splits(spread=0.05), head=head, **FAST)
    assert r["acc_disc"] == r["acc_gen"] == r["acc_trans"] == 1.0
    for k in ("S_disc", "S_gen", "S_trans", "S"):
        assert r[k] > 0.9, (k, r[k])
    assert abs(r["S_gen_gap"]) < 0.02


@pytest.mark.parametrize("head", ["logreg", "mlp"])
def test_random_features_score_near_zero_off_train(head):
    rng = np.random.default_rng(0)
    x, xt, xn = rng.normal(size=(150, 16)), rng.normal(size=(150, 16)), rng.normal(size=(96, 16))
    y, yt, yn = rng.integers(0, 5, 150), rng.integers(0, 5, 150), np.repeat(np.arange(8), 12)
    r = sigma_measure(x, y, xt, yt, xn, yn, head=head, **FAST)
    assert r["sigma_gen_norm"] > 0.9 and r["S_gen"] < 0.1
    assert r["sigma_trans_norm"] > 0.9 and r["S_trans"] < 0.1
    assert r["S_gen_gap"] > 0  # whatever the head memorised on train does not carry over


def test_more_separable_features_score_higher():
    scores = [sigma_measure(*blob_splits(spread=s), **FAST) for s in (0.5, 3.0, 6.0)]
    for k in ("S_disc", "S_gen", "S_trans", "S"):
        values = [sc[k] for sc in scores]
        assert values[0] > values[1] > values[2], (k, values)


def test_transfer_tasks_deterministic_under_seed():
    data = blob_splits(spread=3.0)
    a = sigma_measure(*data, seed=5, **FAST)
    b = sigma_measure(*data, seed=5, **FAST)
    c = sigma_measure(*data, seed=6, **FAST)
    assert a == b
    assert a["sigma_trans"] != c["sigma_trans"]


def test_ratio_reproduces_table16():
    simclr = [20.1, 43.6, 51.2, 60.2, 70.3, 77.2, 82.3, 86.1, 88.7, 88.6]
    gessl = [42.4, 67.1, 83.0, 92.9, 93.0, 94.4, 94.1, 93.2, 94.1, 94.2]
    table_r = [0.474, 0.650, 0.617, 0.648, 0.756, 0.818, 0.875, 0.924, 0.943, 0.941]
    r = universality_ratio(np.array(simclr), np.array(gessl))
    assert isinstance(r, np.ndarray) and r.shape == (10,)
    np.testing.assert_allclose(np.round(r, 3), table_r, atol=1e-9)
    assert np.all(r < 1)


def test_ratio_error_kind_hand_computed_and_validation():
    r = universality_ratio([0.4, 0.2], [0.1, 0.3], kind="error")  # lower is better: method / base
    np.testing.assert_allclose(r, [0.25, 1.5])
    np.testing.assert_allclose(universality_ratio([50.0], [80.0]), [0.625])
    with pytest.raises(ValueError, match="method_values"):
        universality_ratio([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="kind"):
        universality_ratio([1.0], [2.0], kind="sigma")
    with pytest.raises(ValueError, match="method_values"):
        universality_ratio([1.0], [0.0])
    with pytest.raises(ValueError, match="base_values"):
        universality_ratio([[1.0]], [[2.0]])


@pytest.mark.parametrize("kw, key", [
    (dict(head="svm"), "head"), (dict(n_way=1), "n_way"), (dict(k_shot=0), "k_shot"), (dict(n_query=0), "n_query"),
    (dict(n_tasks=0), "n_tasks"), (dict(n_way=9), "n_way"), (dict(k_shot=10, n_query=5), "k_shot"),
])
def test_bad_args_name_the_key(kw, key):
    with pytest.raises(ValueError, match=key):
        sigma_measure(*blob_splits(spread=1.0), **kw)


def test_bad_data_name_the_key():
    x, y, xt, yt, xn, yn = blob_splits(spread=1.0)
    with pytest.raises(ValueError, match="novel_y"):
        sigma_measure(x, y, xt, yt, xn)
    with pytest.raises(ValueError, match="test_y"):
        sigma_measure(x, y, xt, yt + 100)
    with pytest.raises(ValueError, match="train_y"):
        sigma_measure(x, y[:-1], xt, yt)
    with pytest.raises(ValueError, match="train_y"):
        sigma_measure(x, np.zeros_like(y), xt, np.zeros_like(yt))


def synthetic_splits():
    """120 tiny 3x8x8 images of 8 classes (a class-dependent brightness pattern + noise); 3 novel classes."""
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(8).repeat_interleave(15)
    patterns = torch.rand(8, 3, 8, 8, generator=g)
    images = (patterns[labels] * 200 + torch.rand(120, 3, 8, 8, generator=g) * 55).to(torch.uint8)
    return make_splits(ImageSet(images, labels, "synthetic"), novel_classes=3, test_fraction=0.3, seed=0)


def test_universality_report_raw_pixels_and_encoder():
    splits = synthetic_splits()
    r = universality_report(None, splits, k_shot=2, n_query=5, n_tasks=4)
    assert r["n_classes"] == 5 and r["n_tasks"] == 4 and 0 <= r["S"] <= 1
    assert r["S_gen"] > 0.5  # the pattern is in the pixels
    feats = splits.train.images.flatten(1).float().div(255).numpy()
    direct = sigma_measure(feats, splits.train.labels.numpy(), splits.test.images.flatten(1).float().div(255).numpy(),
                           splits.test.labels.numpy(), splits.novel.images.flatten(1).float().div(255).numpy(),
                           splits.novel.labels.numpy(), n_way=3, k_shot=2, n_query=5, n_tasks=4)
    assert r == direct  # n_way defaults to min(5, novel classes) = 3
    torch.manual_seed(0)
    enc = make_backbone("conv4", 3, width=8)
    re = universality_report(enc, splits, k_shot=2, n_query=5, n_tasks=4)
    assert {"S_disc", "S_gen", "S_trans", "S", "S_gen_gap"} <= set(re)
    with pytest.raises(ValueError, match="head"):
        universality_report(enc, splits, head="knn")
    with pytest.raises(ValueError, match="bogus"):
        universality_report(enc, splits, bogus=1)
