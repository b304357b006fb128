"""Online datasets read from disk with the network off: CIFAR-10 in torchvision's on-disk format, an ImageFolder,
and the quickstart notebook's paper profile run on that CIFAR-10 folder; and the one clear message offline when the
files are missing.

The CIFAR-10 folder is fake (a few images per class, written here): torchvision's ``CIFAR10`` checks the md5 sum of
every batch file and of ``batches.meta`` even with ``download=False`` (``CIFAR10._check_integrity`` and ``_load_meta``
call ``torchvision.datasets.cifar.check_integrity``), so no fake folder can pass.  The tests replace that one name,
``torchvision.datasets.cifar.check_integrity``, by "the file exists" - in this process with ``monkeypatch``, in the
notebook kernel with an IPython startup file (``$IPYTHONDIR/profile_default/startup/``) - and nothing else of
torchvision.  The network is off the same way in both: ``urllib.request.urlopen`` and every socket connection or name
lookup that is not to the loopback interface raise ``OSError`` (the kernel talks to papermill over loopback) and are
recorded, so a swallowed attempt fails the test too.
"""

from __future__ import annotations

import json
import os
import pickle
import socket
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import bilevel_ssl
from bilevel_ssl.data import DatasetUnavailable, load_dataset
from bilevel_ssl.paths import repo_root
from bilevel_ssl.reproduce import load_params, notebooks_dir, params_path

LIB = Path(bilevel_ssl.__file__).resolve().parents[1]  # the package the kernel must import too
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
PER_CLASS_PER_BATCH = 4  # 5 training batches: 20 images per class (5-shot episodes need 5 + 15 per novel class)
TEST_PER_CLASS = 2

# What the notebook kernel runs before the notebook (an IPython startup file; the in-process fixture ``offline``
# does the same with monkeypatch): network off, each refused attempt appended to $BILEVEL_SSL_TEST_NETWORK_LOG, and
# the md5 check of torchvision's CIFAR module replaced by an existence check.
OFFLINE_CODE = r'''
import os as _os, socket as _socket, urllib.request as _ur

_LOCAL = ("localhost", "127.0.0.1", "::1", "0.0.0.0", "")


def _host(address):
    return address[0] if isinstance(address, tuple) else address


class _NetworkOff(OSError):
    pass


def _refuse(what):
    log = _os.environ.get("BILEVEL_SSL_TEST_NETWORK_LOG")
    if log:
        with open(log, "a") as f:
            f.write(what + "\n")
    raise _NetworkOff(f"network disabled by the test: {what}")


def _urlopen(url, *args, **kwargs):
    _refuse(f"urlopen {getattr(url, 'full_url', url)}")


_connect = _socket.socket.connect


def _socket_connect(self, address):
    if self.family == getattr(_socket, "AF_UNIX", None) or _host(address) in _LOCAL:
        return _connect(self, address)
    _refuse(f"connect {address}")


_getaddrinfo = _socket.getaddrinfo


def _lookup(host, *args, **kwargs):
    if host in _LOCAL or host is None:
        return _getaddrinfo(host, *args, **kwargs)
    _refuse(f"getaddrinfo {host}")


_ur.urlopen = _urlopen
_socket.socket.connect = _socket_connect
_socket.getaddrinfo = _lookup

import torchvision.datasets.cifar as _cifar

_cifar.check_integrity = lambda fpath, md5=None: _os.path.isfile(fpath)
if _os.environ.get("BILEVEL_SSL_TEST_OFFLINE_MARKER"):  # IPython only warns when a startup file fails: say it ran
    with open(_os.environ["BILEVEL_SSL_TEST_OFFLINE_MARKER"], "w") as _f:
        _f.write("offline\n")
'''


# ------------------------------------------------------------------------------------------------- fixtures
def _cifar_images(n: int, label_of, offset: int) -> tuple[np.ndarray, list[int]]:
    """``n`` images in CIFAR's row layout (n, 3072: R, G, B planes of 32x32), each a distinct pattern."""
    rng = np.random.default_rng(offset)
    data = rng.integers(0, 256, (n, 3 * 32 * 32), dtype=np.uint8)
    data[:, 0] = 0  # every image spans the whole 0..255 range
    data[:, 1] = 255
    return data, [label_of(i) for i in range(n)]


def write_fake_cifar10(root: Path) -> dict:
    """``root/cifar-10-batches-py/`` as torchvision expects it: ``data_batch_1..5``, ``test_batch`` (pickled dicts
    with ``data`` uint8 (N, 3072) and ``labels``) and ``batches.meta`` (``label_names``).  Returns what was written."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    written = {"train_data": [], "train_labels": []}
    n = PER_CLASS_PER_BATCH * len(CLASSES)
    for b in range(1, 6):
        data, labels = _cifar_images(n, lambda i: i % len(CLASSES), offset=b)
        with open(folder / f"data_batch_{b}", "wb") as f:
            pickle.dump({"batch_label": f"training batch {b} of 5", "data": data, "labels": labels,
                         "filenames": [f"img{b}_{i}.png" for i in range(n)]}, f)
        written["train_data"].append(data)
        written["train_labels"] += labels
    data, labels = _cifar_images(TEST_PER_CLASS * len(CLASSES), lambda i: (i * 3) % len(CLASSES), offset=99)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({"batch_label": "testing batch 1 of 1", "data": data, "labels": labels}, f)
    written.update(test_data=data, test_labels=labels)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": CLASSES, "num_cases_per_batch": n, "num_vis": 3072}, f)
    return written


COLOURS = {"apple": (200, 30, 40), "banana": (240, 220, 60), "cherry": (120, 0, 30)}


def write_image_folder(root: Path, per_class: int = 3) -> None:
    """``root/<class>/<i>.png``: solid-colour 40x50 PNGs, one colour per class."""
    for cls, colour in COLOURS.items():
        (root / cls).mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (50, 40), colour).save(root / cls / f"{i}.png")


@pytest.fixture
def offline(monkeypatch):
    """This process without network and with the CIFAR md5 check replaced (see the module docstring); yields the
    list of refused network attempts."""
    attempts: list[str] = []

    def refuse(what):
        attempts.append(what)
        raise OSError(f"network disabled by the test: {what}")

    local = ("localhost", "127.0.0.1", "::1", "0.0.0.0", "", None)
    connect, lookup = socket.socket.connect, socket.getaddrinfo
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, *a, **k: refuse(f"urlopen {getattr(url, 'full_url', url)}"))
    monkeypatch.setattr(socket.socket, "connect", lambda self, address: connect(self, address)
                        if self.family == getattr(socket, "AF_UNIX", None) or
                        (address[0] if isinstance(address, tuple) else address) in local
                        else refuse(f"connect {address}"))
    monkeypatch.setattr(socket, "getaddrinfo", lambda host, *a, **k: lookup(host, *a, **k) if host in local
                        else refuse(f"getaddrinfo {host}"))
    import torchvision.datasets.cifar as cifar

    monkeypatch.setattr(cifar, "check_integrity", lambda fpath, md5=None: os.path.isfile(fpath))
    yield attempts


# ------------------------------------------------------------------------------------- 1: loaders from disk
def test_offline_fixture_blocks_the_network(offline):
    with pytest.raises(OSError, match="network disabled"):
        urllib.request.urlopen("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz")
    with pytest.raises(OSError, match="network disabled"):
        socket.create_connection(("example.org", 443), timeout=1)
    assert len(offline) == 2


def test_cifar10_loads_from_disk_without_network(tmp_path, offline):
    written = write_fake_cifar10(tmp_path)
    train = load_dataset("cifar10", root=tmp_path)  # download=True by default: the files are there, so no download
    n = 5 * PER_CLASS_PER_BATCH * len(CLASSES)
    assert train.images.shape == (n, 3, 32, 32) and train.images.dtype == torch.uint8
    assert train.name == "cifar10" and train.classes == CLASSES
    assert train.labels.dtype == torch.int64 and train.labels.tolist() == written["train_labels"]
    assert sorted(np.bincount(train.labels.numpy()).tolist()) == [5 * PER_CLASS_PER_BATCH] * len(CLASSES)
    # CIFAR's rows are R, G, B planes of 32x32, batches in file order
    expected = torch.from_numpy(np.concatenate(written["train_data"])).view(n, 3, 32, 32)
    assert torch.equal(train.images, expected)
    assert int(train.images.min()) == 0 and int(train.images.max()) == 255

    test = load_dataset("cifar10", root=tmp_path, split="test", download=False)
    assert test.images.shape == (TEST_PER_CLASS * len(CLASSES), 3, 32, 32)
    assert test.labels.tolist() == written["test_labels"]
    assert torch.equal(test.images, torch.from_numpy(written["test_data"]).view(-1, 3, 32, 32))

    resized = load_dataset("cifar10", root=tmp_path, split="test", image_size=16)
    assert resized.images.shape == (TEST_PER_CLASS * len(CLASSES), 3, 16, 16) and resized.images.dtype == torch.uint8
    assert offline == [], f"the loader tried the network although the files are there: {offline}"


def test_image_folder_loads_from_disk_without_network(tmp_path, offline):
    write_image_folder(tmp_path)
    ds = load_dataset("imagefolder", root=tmp_path)
    assert ds.images.shape == (9, 3, 64, 64) and ds.images.dtype == torch.uint8  # ImageFolder default: 64 px
    assert ds.classes == sorted(COLOURS) and ds.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    for label, cls in enumerate(ds.classes):  # a solid colour stays exactly that colour after resize and crop
        want = torch.tensor(COLOURS[cls], dtype=torch.uint8).view(3, 1, 1).expand(3, 64, 64)
        assert all(torch.equal(img, want) for img in ds.images[ds.labels == label])
    assert int(ds.images.min()) == min(min(c) for c in COLOURS.values())
    assert int(ds.images.max()) == max(max(c) for c in COLOURS.values())
    # the split sub-folder layout: root/<split>/<class>/...
    write_image_folder(tmp_path / "nested" / "val", per_class=2)
    val = load_dataset("imagefolder", root=tmp_path / "nested", split="val", image_size=8)
    assert val.images.shape == (6, 3, 8, 8) and val.labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert offline == [], f"the loader tried the network: {offline}"


# ------------------------------------------------------------------------------ 3: missing files, offline
@pytest.mark.parametrize("download", [True, False])
def test_missing_cifar10_offline_says_where_to_put_the_files(tmp_path, offline, download):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetUnavailable) as e:
        load_dataset("cifar10", root=empty, download=download)
    msg = str(e.value)
    assert "'cifar10'" in msg and f"{empty}/cifar-10-batches-py" in msg and "cifar-10-python.tar.gz" in msg
    assert len(e.value.args) == 1 and msg.count("dataset 'cifar10'") == 1  # one message, not a chain of them
    assert not (empty / "cifar-10-batches-py").exists()
    if download:
        assert offline, "download=True should have tried (and been refused) the network"


def test_image_folder_with_split_folders_but_not_the_asked_one_is_refused(tmp_path, offline):
    """root/train/<class>/... without root/test: split 'test' used to fall back to root itself, so 'train' became a
    class label (a silent wrong dataset); now the message names the missing folder and the splits that are there."""
    write_image_folder(tmp_path / "train")
    assert load_dataset("imagefolder", root=tmp_path, split="train", image_size=8).classes == sorted(COLOURS)
    with pytest.raises(DatasetUnavailable) as e:
        load_dataset("imagefolder", root=tmp_path, split="test", image_size=8)
    msg = str(e.value)
    assert f"no folder {tmp_path / 'test'}" in msg and "has the splits train" in msg and "'imagefolder'" in msg
    flat = tmp_path / "flat"  # without split folders, root itself is the (only) split, as before
    write_image_folder(flat)
    assert load_dataset("imagefolder", root=flat, split="test", image_size=8).classes == sorted(COLOURS)


def test_missing_image_folder_says_where_to_put_the_files(tmp_path, offline):
    empty = tmp_path / "empty"
    empty.mkdir()
    for root in (empty, tmp_path / "absent"):
        with pytest.raises(DatasetUnavailable) as e:
            load_dataset("imagefolder", root=root)
        msg = str(e.value)
        assert "'imagefolder'" in msg and str(root) in msg and f"{root}/<class>/<image>.png" in msg
    assert offline == []


# --------------------------------------------------------------- 2: a paper profile's data path, offline
def test_quickstart_paper_profile_runs_offline_on_a_cifar10_folder(tmp_path, monkeypatch):
    """``notebooks/00_quickstart.ipynb`` with ``params/paper/00_quickstart.yaml``, changed only where the run must
    be tiny and CPU-only, on the fake CIFAR-10 folder, in a kernel without network; outputs under ``tmp_path``."""
    import papermill

    repo, notebook = repo_root(), notebooks_dir() / "00_quickstart.ipynb"
    params = load_params(params_path("00_quickstart", "paper"))
    data_root, root, network_log = tmp_path / "data", tmp_path / "root", tmp_path / "network.log"
    write_fake_cifar10(data_root)
    root.mkdir()
    startup = tmp_path / "ipython" / "profile_default" / "startup"
    startup.mkdir(parents=True)
    (startup / "00_offline.py").write_text(OFFLINE_CODE + "\ndel _cifar\n")
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
    monkeypatch.setenv("BILEVEL_SSL_ROOT", str(root))  # outputs -> root/outputs/00_quickstart/paper/
    monkeypatch.setenv("BILEVEL_SSL_DATA", str(tmp_path / "nowhere"))  # data_root must be what is used
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(LIB), os.environ.get("PYTHONPATH")) if p))
    monkeypatch.setenv("BILEVEL_SSL_TEST_NETWORK_LOG", str(network_log))
    monkeypatch.setenv("BILEVEL_SSL_TEST_OFFLINE_MARKER", str(tmp_path / "kernel-offline"))

    assert params["dataset"] == "cifar10" and params["data_root"] == ""
    tiny = {"data_root": str(data_root), "max_train": 64, "epochs": 1, "warmup_epochs": 0, "batch_size": 32,
            "backbone": "conv4", "width": 16, "n_episodes": 3, "tsne_samples": 20, "device": "cpu"}
    params = {**params, **tiny, "profile": "paper"}
    out = tmp_path / "executed.ipynb"
    papermill.execute_notebook(str(notebook), str(out), parameters=params, kernel_name="python3", cwd=str(repo),
                               progress_bar=False)

    assert (tmp_path / "kernel-offline").exists(), "the kernel's startup file did not run to its end"
    metrics = json.loads((root / "outputs" / "00_quickstart" / "paper" / "metrics.json").read_text())
    assert metrics["params"]["dataset"] == "cifar10" and metrics["params"]["data_root"] == str(data_root)
    assert metrics["params"]["profile"] == "paper"
    assert metrics["train_config"]["augment"] == "cifar"
    assert set(metrics["results"]) == {"raw_pixels", "random_init", "simclr"}
    assert all(np.isfinite(v["knn_acc"]) for v in metrics["results"].values())
    text = out.read_text()
    assert "cifar10: base classes" in text and "pre-training images 64" in text
    assert not network_log.exists(), f"the kernel tried the network: {network_log.read_text()}"
