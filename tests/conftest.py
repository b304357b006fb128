"""Shared fixtures; nbval: compare only text/plain outputs of checked cells (stderr carries tqdm bars).

Threads are pinned here, at import, before nbval starts any kernel (they inherit ``OMP_NUM_THREADS``): float32
results depend on the thread count, so the suite's numbers must not depend on the machine's core count.
The smoke-metrics comparison (``tests/test_smoke_metrics.py``) runs last, after the notebooks have written
their ``metrics.json``.
"""

import time

import pytest
import torch

from bilevel_ssl.data import ImageSet, load_dataset
from bilevel_ssl.runtime import pin_threads

THREADS = pin_threads()
SESSION_START = time.time()
LAST = "test_smoke_metrics.py"


def pytest_collection_modifyitems(session, config, items):
    """Move the smoke-metrics checks behind the notebooks that produce what they check (stable order otherwise)."""
    items[:] = [i for i in items if i.path.name != LAST] + [i for i in items if i.path.name == LAST]


@pytest.fixture(scope="session")
def session_start() -> float:
    """When this pytest session started (files older than this were not written by it)."""
    return SESSION_START


def pytest_report_header(config):
    return (f"torch {torch.__version__}, {THREADS} threads (BILEVEL_SSL_THREADS), "
            f"CPU kernels {torch.backends.cpu.get_cpu_capability()}")


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
