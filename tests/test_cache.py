"""Encoder cache: a finished run is reused, anything that changes the encoder changes the key, monitors are
recorded and cannot change the training numbers."""

import json

import pytest
import torch

from bilevel_ssl.cache import NEUTRAL_MODULES, cache_key, cached_train, code_fingerprint, entry_dir
from bilevel_ssl.config import TrainConfig
from bilevel_ssl.trainer import train


def cfg(**kw):
    base = dict(epochs=2, batch_size=32, backbone_args={"width": 8}, lr=0.05, progress=False,
                objective_args={"proj_hidden": 16, "proj_dim": 8})
    return TrainConfig(**{**base, **kw})


def state(net):
    return {k: v.clone() for k, v in net.state_dict().items()}


def test_second_call_loads_the_finished_run(tiny, tmp_path):
    first = cached_train(cfg(), tiny, root=tmp_path)
    second = cached_train(cfg(progress=True, checkpoint_every=1), tiny, root=tmp_path)  # run control: same key
    assert (first.cached, second.cached) == (False, True)
    assert second.out_dir == first.out_dir
    assert second.history == first.history
    a, b = state(first.net), state(second.net)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    key = json.loads((first.out_dir / "key.json").read_text())
    assert key["config"]["lr"] == 0.05 and "progress" not in key["config"]


def test_cached_run_equals_a_plain_training_run(tiny, tmp_path):
    cached = cached_train(cfg(), tiny, root=tmp_path)
    plain = train(cfg(), tiny)
    assert [r["loss"] for r in cached.history] == [r["loss"] for r in plain.history]


def test_parameters_data_and_tag_change_the_key(tiny, tmp_path):
    base = entry_dir(cfg(), tiny, root=tmp_path)
    assert entry_dir(cfg(lr=0.1), tiny, root=tmp_path) != base
    assert entry_dir(cfg(seed=1), tiny, root=tmp_path) != base
    assert entry_dir(cfg(), tiny.subset(torch.arange(64)), root=tmp_path) != base
    assert entry_dir(cfg(), tiny, tag="knn", root=tmp_path) != base
    assert entry_dir(cfg(progress=True), tiny, root=tmp_path) == base
    assert base.name.startswith("simclr-none-")


def test_key_holds_code_and_torch_version(tiny):
    key = cache_key(cfg(), tiny)
    assert key["code"] == code_fingerprint() and len(key["code"]) == 64
    assert key["torch"] == torch.__version__
    assert {"trainer.py", "gessl.py", "hypergrad.py", "meta.py"}.isdisjoint(NEUTRAL_MODULES)


def test_force_retrains(tiny, tmp_path):
    cached_train(cfg(), tiny, root=tmp_path)
    again = cached_train(cfg(), tiny, root=tmp_path, force=True)
    assert again.cached is False


def test_monitors_are_recorded_cached_and_do_not_change_training(tiny, tmp_path):
    seen = []

    def monitor(epoch, net):  # consumes torch's global RNG on purpose
        seen.append(epoch)
        return {"probe": float(torch.rand(()).item() * 0 + epoch)}

    with pytest.raises(ValueError, match="tag: monitors add numbers"):
        cached_train(cfg(), tiny, root=tmp_path, monitors=(monitor,))
    run = cached_train(cfg(), tiny, root=tmp_path, monitors=(monitor,), tag="probe")
    assert seen == [1, 2] and [r["probe"] for r in run.history] == [1.0, 2.0]
    hit = cached_train(cfg(), tiny, root=tmp_path, monitors=(monitor,), tag="probe")
    assert hit.cached and [r["probe"] for r in hit.history] == [1.0, 2.0] and seen == [1, 2]
    plain = train(cfg(), tiny)
    assert [r["loss"] for r in run.history] == [r["loss"] for r in plain.history]
