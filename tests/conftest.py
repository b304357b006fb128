"""Shared fixtures; nbval: compare only text/plain outputs of checked cells (stderr carries tqdm bars)."""

import pytest
import torch

from bilevel_ssl.data import ImageSet, load_dataset


def pytest_collectstart(collector):
    if collector.fspath and collector.fspath.ext == ".ipynb":
        collector.skip_compare += ("text/html", "application/javascript", "stderr")


@pytest.fixture(scope="session")
def mnistm():
    return load_dataset("mnistm5k")


@pytest.fixture(scope="session")
def tiny(mnistm) -> ImageSet:
    """96 MNIST-M images, stratified (every 50th image: the set is sorted by label)."""
    return mnistm.subset(torch.arange(0, 5000, 52)[:96], "tiny")
