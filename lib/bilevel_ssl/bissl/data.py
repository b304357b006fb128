"""BiSSL's data: the pretext set (labels unused, with a labelled held-out part) and the downstream tasks in the
pretext image format (:func:`prepare_pretext`, :func:`prepare_downstream`), and class-balanced caps of a task's
images (:func:`balanced_indices`, :func:`balanced_subset`).

Why here and not in :mod:`bilevel_ssl.experiments`: these are the pretext / downstream pairs of Fig. 1 (a
downstream task resized and re-channelled to the pretext images, the pretext dataset's held-out labelled part as a
task), used by BiSSL's notebook and tests only; :mod:`~bilevel_ssl.experiments` holds what every notebook shares
(and :func:`prepare_pretext` builds on its :func:`~bilevel_ssl.experiments.prepare`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..data import DATASETS, ImageSet, load_dataset, stratified_split, to_channels

DOWNSTREAM_TASKS = ("digits", "heldout", "cifar10", "cifar100", "stl10")


@dataclass
class Downstream:
    """A labelled downstream task in the pretext image format: ``train`` / ``test`` ImageSets with labels 0..C-1."""

    name: str
    train: ImageSet
    test: ImageSet

    @property
    def n_classes(self) -> int:
        return int(max(self.train.labels.max(), self.test.labels.max())) + 1


@dataclass
class PretextData:
    """``pretext``: the images pre-training and the lower level see (labels never read); ``heldout``: labelled
    images of the same dataset that pre-training never sees (``None`` where the pretext split has no labels)."""

    name: str
    pretext: ImageSet
    heldout: ImageSet | None


def prepare_pretext(dataset: str = "mnistm5k", *, data_root: str = "", heldout_fraction: float = 0.2,
                    max_train: int = 0) -> PretextData:
    """The pretext set: a stratified ``1 − heldout_fraction`` of ``dataset`` (split seed 0; labels unused), capped
    at ``max_train`` images (0 = all; a fixed random subset), and the held-out rest with labels.  ``stl10`` uses its
    ``unlabeled`` split (the paper's Fig. 2 pretext set) and has no held-out part."""
    if dataset not in DATASETS or dataset == "imagefolder":
        allowed = [d for d in DATASETS if d != "imagefolder"]
        raise ValueError(f"pretext_dataset: unknown {dataset!r}; allowed: {', '.join(allowed)}")
    if dataset == "stl10":
        ds = load_dataset("stl10", root=data_root or None, split="unlabeled")
        heldout = None
        pretext = ds
    else:
        from ..experiments import prepare

        data = prepare(dataset, novel_classes=0, test_fraction=heldout_fraction, max_train=max_train,
                       data_root=data_root)
        return PretextData(dataset, data.pretrain, data.splits.test)
    if max_train and len(pretext) > max_train:
        keep = torch.randperm(len(pretext), generator=torch.Generator().manual_seed(0))[:max_train]
        pretext = pretext.subset(keep)
    return PretextData(dataset, pretext, heldout)


def _format(ds: ImageSet, channels: int, size: int) -> ImageSet:
    """Resize to ``size`` and replicate / mix channels to ``channels`` (the pretext image format)."""
    images = ds.images
    if images.shape[-1] != size or images.shape[-2] != size:
        x = F.interpolate(images.float(), size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        images = x.round().clamp(0, 255).to(torch.uint8)
    return ImageSet(to_channels(images, channels), ds.labels, ds.name, ds.classes)


def _stratified(ds: ImageSet, test_fraction: float, name: str) -> Downstream:
    tr, te = stratified_split(ds.labels, test_fraction, seed=0)
    classes = torch.unique(ds.labels)
    remap = lambda s: ImageSet(s.images, torch.searchsorted(classes, s.labels), s.name, s.classes)
    return Downstream(name, remap(ds.subset(tr, f"{name}/train")), remap(ds.subset(te, f"{name}/test")))


def prepare_downstream(task: str, pretext: PretextData, *, test_fraction: float = 0.5, data_root: str = "") -> Downstream:
    """A downstream task in the pretext set's image format (size and channels):

    * ``digits`` - scikit-learn's 8x8 digits (1797, resized to the pretext size, gray replicated to RGB), a
      stratified ``test_fraction`` test split (seed 0);
    * ``heldout`` - the labelled images of the pretext dataset that pre-training never sees
      (:func:`prepare_pretext`), split the same way;
    * ``cifar10`` / ``cifar100`` / ``stl10`` - the dataset's own train / test splits (online; the paper's Table 1
      datasets, resized to the pretext size: 96 px in the paper).
    """
    if task not in DOWNSTREAM_TASKS:
        raise ValueError(f"downstream_tasks: unknown task {task!r}; allowed: {', '.join(DOWNSTREAM_TASKS)}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"downstream_test_fraction: must be in (0, 1), got {test_fraction!r}")
    c, size = pretext.pretext.channels, pretext.pretext.size
    if task == "digits":
        return _stratified(_format(load_dataset("digits"), c, size), test_fraction, "digits")
    if task == "heldout":
        if pretext.heldout is None:
            raise ValueError(f"downstream_tasks: 'heldout' needs labelled held-out images of the pretext dataset; "
                             f"{pretext.name} has none here (allowed: digits, cifar10, cifar100, stl10)")
        return _stratified(_format(pretext.heldout, c, size), test_fraction, f"{pretext.name}-heldout")
    root = data_root or None
    train = load_dataset(task, root=root, split="train", image_size=size)
    test = load_dataset(task, root=root, split="test", image_size=size)
    return Downstream(task, _format(train, c, size), _format(test, c, size))


def learning_check_task(pretext: PretextData, tasks: dict[str, Downstream], *, test_fraction: float = 0.5
                        ) -> tuple[Downstream, str]:
    """The split on which notebook 30 checks that pre-training learned (issue #25: the base's 5-NN >= the same
    network untrained + 0.10, :func:`bilevel_ssl.protocol.check_bases`), and a line saying which it is.

    It is the pretext dataset's labelled held-out images (``heldout`` of :func:`prepare_downstream`, split the same
    way, *not* capped by ``max_downstream_train``: more images, a steadier 5-NN), scored with the backbone as
    pre-trained - BatchNorm statistics from the pretext run, as the 5-NN of notebooks 10-40 - because the check asks
    whether the *pretext* task was learned, and these images come from its distribution without having been
    trained on.  Why not the first downstream task, as before: on ``digits`` (sklearn 8x8 digits resized) an
    untrained Conv-4 already reaches 5-NN 0.932 and SimCLR 0.944 (notebook 30's default run of 2026-12-06), so a
    gain of 0.10 was out of reach whatever pre-training did, and R13/R14 could never be decided.  Where the pretext
    dataset has no labelled held-out part (``stl10``'s unlabeled split) the first downstream task is used, and the
    line says so."""
    if pretext.heldout is not None:
        task = prepare_downstream("heldout", pretext, test_fraction=test_fraction)  # uncapped, unlike tasks[...]
        return task, (f"5-NN on {task.name} (pretext distribution, never pre-trained on; {len(task.train)} train / "
                      f"{len(task.test)} test images, BatchNorm as pre-trained)")
    if not tasks:
        raise ValueError("downstream_tasks: the learning check needs a task where the pretext dataset has no "
                         "labelled held-out images")
    name, task = next(iter(tasks.items()))
    return task, (f"5-NN on the downstream task {name}: {pretext.name} has no labelled held-out images here "
                  "(BatchNorm as pre-trained)")


def balanced_indices(labels, n: int, seed: int = 0) -> np.ndarray:
    """Sorted indices of at most ``n`` items with the same number per class: the first ``n // classes`` (at least
    1) of each class in a seeded permutation.  All indices when ``n`` is 0 or not below the number of items."""
    y = np.asarray(labels)
    if not n or len(y) <= n:
        return np.arange(len(y))
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed)).numpy()
    classes = np.unique(y)
    per_class = max(1, n // len(classes))
    return np.sort(np.concatenate([perm[y[perm] == c][:per_class] for c in classes]))


def balanced_subset(ds: ImageSet, n: int, seed: int = 0) -> ImageSet:
    """``ds`` capped at ``n`` images, the same number per class (:func:`balanced_indices`; 0 keeps all): e.g. 30
    labelled images per class, as Caltech-101 in BiSSL's Table 1."""
    return ds if not n or len(ds) <= n else ds.subset(balanced_indices(ds.labels.numpy(), n, seed))
