import numpy as np
import pytest
import torch
from PIL import Image

from bilevel_ssl.data import (DATASETS, DatasetUnavailable, class_disjoint_split, load_dataset, make_splits,
                              stratified_split, to_channels)


def test_mnist5k_is_sorted_by_label_so_splits_must_stratify():
    ds = load_dataset("mnist5k")
    assert ds.images.shape == (5000, 1, 28, 28) and ds.images.dtype == torch.uint8
    assert torch.all(ds.labels[1:] >= ds.labels[:-1])  # the fact that makes naive splits wrong
    tr, te = stratified_split(ds.labels, 0.2, seed=0)
    assert len(np.intersect1d(tr, te)) == 0 and len(tr) + len(te) == 5000
    counts_tr = np.bincount(ds.labels[tr], minlength=10) / len(tr)
    counts_te = np.bincount(ds.labels[te], minlength=10) / len(te)
    np.testing.assert_allclose(counts_tr, counts_te, atol=0.005)


def test_stratified_split_is_seeded():
    y = np.repeat(np.arange(5), 40)
    a, b, c = (stratified_split(y, 0.25, s)[1] for s in (1, 1, 2))
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    with pytest.raises(ValueError, match="test_fraction"):
        stratified_split(y, 1.5, 0)


def test_class_disjoint_split_has_no_leakage():
    y = np.repeat(np.arange(10), 7)
    base, novel, bc, nc = class_disjoint_split(y, 4, seed=3)
    assert len(nc) == 4 and len(bc) == 6 and not set(bc) & set(nc)
    assert not set(y[base]) & set(y[novel])
    assert set(y[novel]) == set(nc) and len(base) + len(novel) == len(y)
    assert class_disjoint_split(y, 4, seed=3)[3] == nc
    _, _, _, explicit = class_disjoint_split(y, [9, 0], seed=0)
    assert explicit == [0, 9]
    with pytest.raises(ValueError, match=r"novel_classes: \[42\]"):
        class_disjoint_split(y, [42], 0)


def test_make_splits_protocol(mnistm):
    sp = make_splits(mnistm, novel_classes=5, test_fraction=0.2, seed=0)
    assert len(sp.train) == 2000 and len(sp.test) == 500 and len(sp.novel) == 2500
    assert set(sp.train.labels.tolist()) == set(sp.test.labels.tolist()) == set(sp.base_classes)
    assert set(sp.novel.labels.tolist()) == set(sp.novel_classes)


def test_mnistm5k_is_deterministic_rgb_and_harder_than_mnist(mnistm):
    from sklearn.neighbors import KNeighborsClassifier

    assert mnistm.images.shape == (5000, 3, 28, 28)
    assert torch.equal(mnistm.labels, load_dataset("mnist5k").labels)
    assert torch.equal(load_dataset("mnistm5k", seed=0).images, mnistm.images)
    assert not torch.equal(load_dataset("mnistm5k", seed=1).images, mnistm.images)

    def knn(ds):
        x = ds.images.flatten(1).float().numpy() / 255
        tr, te = stratified_split(ds.labels, 0.2, 0)
        return KNeighborsClassifier(5).fit(x[tr], ds.labels[tr]).score(x[te], ds.labels[te])

    acc_m, acc_plain = knn(mnistm), knn(load_dataset("mnist5k"))
    assert acc_plain > 0.9 and 0.3 < acc_m < 0.5, (acc_plain, acc_m)  # measured: 0.923 and 0.408


def test_digits_resized():
    ds = load_dataset("digits")
    assert ds.images.shape == (1797, 1, 28, 28) and ds.images.max() > 200
    assert load_dataset("digits", image_size=32).images.shape[-1] == 32


def test_to_channels_roundtrip():
    g = torch.randint(0, 256, (2, 1, 4, 4), dtype=torch.uint8)
    rgb = to_channels(g, 3)
    assert rgb.shape == (2, 3, 4, 4) and torch.equal(to_channels(rgb, 1), g)
    with pytest.raises(ValueError, match="allowed: 1 or 3"):
        to_channels(g, 2)


def test_unknown_dataset_lists_names():
    with pytest.raises(ValueError, match="allowed: " + ", ".join(DATASETS)):
        load_dataset("imagenet21k")


@pytest.mark.parametrize("name,what", [("cifar10", "cifar-10-python.tar.gz"), ("cifar100", "cifar-100-python"),
                                       ("stl10", "stl10_binary"), ("omniglot", "omniglot-py")])
def test_missing_online_set_says_where_to_put_files(tmp_path, name, what):
    with pytest.raises(DatasetUnavailable) as e:
        load_dataset(name, root=tmp_path, download=False)
    msg = str(e.value)
    assert str(tmp_path) in msg and what in msg and "download=True" in msg


def test_bad_split_named():
    with pytest.raises(ValueError, match="split: 'val' .* allowed: train, test"):
        load_dataset("cifar10", split="val")


def test_imagefolder_loads_and_resizes(tmp_path):
    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(tmp_path / cls / f"{i}.png")
    ds = load_dataset("imagefolder", root=tmp_path, image_size=16)
    assert ds.images.shape == (6, 3, 16, 16) and ds.classes == ["cat", "dog"]
    assert ds.labels.tolist() == [0, 0, 0, 1, 1, 1]
    with pytest.raises(DatasetUnavailable, match="one sub-folder per class"):
        load_dataset("imagefolder", root=tmp_path / "nope")
