import numpy as np
import pytest
import torch

from bilevel_ssl.data import ImageSet
from bilevel_ssl.evaluate import extract_features, few_shot, knn_accuracy, linear_probe, mean_ci95, raw_pixels
from bilevel_ssl.models import make_backbone


def blobs(n_per=30, classes=5, dim=8, spread=0.05, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(classes, dim)) * 3
    x = np.concatenate([c + spread * rng.normal(size=(n_per, dim)) for c in centers])
    return x.astype(np.float32), np.repeat(np.arange(classes), n_per)


def test_knn_separable_and_random_labels():
    x, y = blobs()
    xt, yt = blobs(seed=0)
    assert knn_accuracy(x, y, xt, yt) == 1.0
    assert knn_accuracy(x, y, xt, yt, weighted=True) == 1.0
    rng = np.random.default_rng(1)
    noise = rng.normal(size=(300, 8))
    acc = knn_accuracy(noise[:200], rng.integers(0, 5, 200), noise[200:], rng.integers(0, 5, 100))
    assert acc < 0.4  # chance is 0.2


def test_knn_is_cosine_not_euclidean():
    # same direction, very different norms: cosine k-NN calls them the same class
    train = np.array([[1.0, 0.0], [0.0, 1.0]] * 3)
    labels = np.array([0, 1] * 3)
    test = np.array([[100.0, 1.0], [0.01, 5.0]])
    assert knn_accuracy(train, labels, test, np.array([0, 1]), k=1) == 1.0


def test_weighted_knn_lets_close_neighbours_outvote():
    # 2 very close neighbours of class 0, 3 far ones of class 1 among the 5 nearest
    train = np.array([[1, 0.01], [1, -0.01], [0.5, 0.5], [0.5, 0.52], [0.5, 0.48]])
    labels = np.array([0, 0, 1, 1, 1])
    test = np.array([[1.0, 0.0]])
    assert knn_accuracy(train, labels, test, [1], k=5) == 1.0
    assert knn_accuracy(train, labels, test, [0], k=5, weighted=True) == 1.0


def test_linear_probe_top1_top5():
    x, y = blobs(classes=8)
    r = linear_probe(x, y, x, y)
    assert r["top1"] == 1.0 and r["top5"] == 1.0


def test_few_shot_clustered_vs_noise():
    x, y = blobs(n_per=25, classes=6)
    good = few_shot(x, y, n_way=5, k_shot=1, n_query=10, n_episodes=50)
    assert good["mean"] == 1.0 and good["ci95"] == 0.0
    noise = np.random.default_rng(0).normal(size=x.shape)
    bad = few_shot(noise, y, n_way=5, k_shot=5, n_query=10, n_episodes=200, classifier="prototype")
    assert abs(bad["mean"] - 0.2) < 0.05 and bad["ci95"] > 0


def test_few_shot_input_errors():
    x, y = blobs(n_per=10, classes=3)
    with pytest.raises(ValueError, match="n_way: 5 exceeds the 3 classes"):
        few_shot(x, y, n_way=5)
    with pytest.raises(ValueError, match="k_shot \\+ n_query = 20 exceeds"):
        few_shot(x, y, n_way=3, k_shot=5, n_query=15)
    with pytest.raises(ValueError, match="classifier: unknown 'svm'"):
        few_shot(x, y, n_way=3, k_shot=1, n_query=2, classifier="svm")


def test_mean_ci95_student_t():
    m, h = mean_ci95([1.0, 2.0, 3.0, 4.0, 5.0])
    assert m == 3.0 and h == pytest.approx(2.776445 * np.std([1, 2, 3, 4, 5], ddof=1) / np.sqrt(5), rel=1e-5)
    assert mean_ci95([0.7]) == (0.7, 0.0)


def test_extract_features_eval_mode_channels_and_restore():
    torch.manual_seed(0)
    enc = make_backbone("conv4", 3, width=8)
    enc.train()
    gray = ImageSet(torch.randint(0, 256, (10, 1, 28, 28), dtype=torch.uint8), torch.zeros(10), "g")
    f = extract_features(enc, gray, batch_size=4)
    assert f.shape == (10, 32) and enc.training  # mode restored
    with torch.no_grad():
        expected = enc.eval()(gray.images.expand(-1, 3, -1, -1).float() / 255).numpy()
    np.testing.assert_allclose(f, expected, rtol=1e-5, atol=1e-6)
    assert raw_pixels(gray).shape == (10, 784) and raw_pixels(gray).max() <= 1.0


def test_protocol_fits_run_with_one_blas_thread_and_restore_it():
    from threadpoolctl import threadpool_info

    from bilevel_ssl.evaluate import one_blas_thread

    def blas_threads():
        return [lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"]

    before = blas_threads()
    inside = one_blas_thread(blas_threads)()
    assert inside and all(n == 1 for n in inside)
    assert blas_threads() == before
    # the protocol's functions carry it (their numbers must not depend on the machine's core count)
    from bilevel_ssl import evaluate, universality

    for fn in (evaluate.knn_accuracy, evaluate.linear_probe, evaluate.few_shot, universality.sigma_measure):
        assert hasattr(fn, "__wrapped__"), fn.__name__

def test_evaluate_encoder_without_shots_skips_the_novel_classes(monkeypatch):
    """shots=() (notebook 40 scores only the base classes): no few-shot number, and the novel images are never
    encoded - a full split's worth of forward passes saved per run."""
    from types import SimpleNamespace

    import bilevel_ssl.evaluate as ev

    rng = np.random.default_rng(0)
    part = lambda n: ImageSet(torch.from_numpy(rng.integers(0, 256, (n, 3, 4, 4), dtype=np.uint8)),  # noqa: E731
                              torch.arange(n) % 2, "p")
    splits = SimpleNamespace(train=part(20), test=part(10), novel=part(40), novel_classes=[2, 3])
    seen = []
    real = ev.raw_pixels
    monkeypatch.setattr(ev, "raw_pixels", lambda d: seen.append(len(d)) or real(d))
    out = ev.evaluate_encoder(None, splits, shots=())
    assert set(out) == {"knn_acc", "knn_weighted_acc", "linear_acc"} and seen == [20, 10]
    seen.clear()
    out = ev.evaluate_encoder(None, splits, shots=(1,), n_episodes=3)
    assert "fewshot_5w1s_acc" in out and "fewshot_5w5s_acc" not in out and seen == [20, 10, 40]


def test_extract_features_remembers_by_content_and_misses_on_any_change():
    from bilevel_ssl.evaluate import extract_features
    from bilevel_ssl.models import make_backbone

    torch.manual_seed(0)
    net = make_backbone("conv4", 3, width=4)
    calls = []
    net.register_forward_hook(lambda m, i, o: calls.append(len(i[0])))
    x = torch.randint(0, 256, (10, 3, 28, 28), dtype=torch.uint8)
    f1 = extract_features(net, x)
    f2 = extract_features(net, x)
    assert calls == [10] and np.array_equal(f1, f2)  # the second call: no forward pass
    f2[:] = 0  # a caller's edit of its copy does not reach the memo
    assert np.array_equal(extract_features(net, x), f1) and calls == [10]
    extract_features(net, x, batch_size=4)  # another batching: recomputed (rounding may differ)
    assert calls == [10, 4, 4, 2]
    calls.clear()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    net(torch.rand(4, 3, 28, 28)).pow(2).sum().backward()
    opt.step()  # a weight change (and, in train mode, BatchNorm statistics)
    calls.clear()
    f3 = extract_features(net, x)
    assert calls == [10] and not np.array_equal(f3, f1)
    with torch.no_grad():
        next(net.parameters()).data.mul_(1.5)  # an edit through .data (no version bump): still a miss
    f4 = extract_features(net, x)
    assert calls == [10, 10] and not np.array_equal(f4, f3)
    y = x.clone()
    y[0, 0, 0, 0] ^= 1  # one bit of one image
    extract_features(net, y)
    assert calls == [10, 10, 10]
