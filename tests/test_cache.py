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


def test_second_call_loads_the_finished_run(tiny, tmp_path, monkeypatch):
    import bilevel_ssl.cache as cache
    from bilevel_ssl.report import write_metrics

    monkeypatch.setattr(cache, "RUN_COUNTS", {"trained": 0, "from_cache": 0, "from_cache_train_s": 0.0, "runs": {}})
    first = cached_train(cfg(), tiny, root=tmp_path)
    second = cached_train(cfg(progress=True, checkpoint_every=1), tiny, root=tmp_path)  # run control: same key
    assert (first.cached, second.cached) == (False, True)
    record = json.loads(write_metrics(tmp_path / "run", params={}, results={}, seed=0).read_text())
    trained_s = sum(h["time_s"] for h in first.history)  # the loaded run's training, where it was made
    assert trained_s > 0
    rid = cache.run_id(cfg(), tiny)
    assert record["training_runs"] == {"trained": 1, "from_cache": 1,  # what the run time was spent on
                                       "from_cache_train_s": round(trained_s, 1),
                                       # the same run both times: one entry, last seen loaded
                                       "runs": {rid: {"train_s": round(trained_s, 1), "loaded": True}}}
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
    assert {"trainer", "gessl", "hypergrad", "meta", "objectives"}.isdisjoint(NEUTRAL_MODULES)


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


def test_fingerprint_ignores_docstrings_and_comments_but_not_code():
    from bilevel_ssl.cache import _code_digest

    src = b'"""Module doc."""\nimport math\n\n\ndef f(x):\n    """Doc."""\n    return math.sqrt(x)  # note\n'
    edited_doc = src.replace(b"Module doc.", b"Other words.").replace(b"# note", b"# changed")
    edited_code = src.replace(b"sqrt", b"exp")
    assert _code_digest(edited_doc) == _code_digest(src)
    assert _code_digest(edited_code) != _code_digest(src)
    assert _code_digest(b'def g():\n    """Only a docstring."""\n') == _code_digest(b"def g():\n    pass\n")


def test_fingerprint_covers_only_the_meta_method_in_use(monkeypatch):
    from bilevel_ssl import cache
    from bilevel_ssl.meta import META_METHODS

    assert cache.method_modules("gessl") == {"gessl", "bilevel"} and cache.method_modules("none") == frozenset()
    assert cache.method_modules("multitask") == {"multitask", "conflict"}  # a neutral module a method declares
    code_fingerprint.cache_clear()
    try:
        real = cache._code_digest
        before = {m: code_fingerprint(m) for m in META_METHODS}
        # pretend a module changed: runs of the methods that declare it get a new key, the others keep theirs
        for marker, changed in ((b"class GeSSL(", {"gessl"}), (b"class BiLevelMethod(", {"gessl", "tc2", "mcr"}),
                                (b"def task_gradients(", {"multitask"}), (b"class SingleLevel:", set(META_METHODS))):
            code_fingerprint.cache_clear()
            monkeypatch.setattr(cache, "_code_digest",
                                lambda b, marker=marker: real(b) + (b"x" if marker in b else b""))
            after = {m: code_fingerprint(m) for m in META_METHODS}
            assert {m for m in META_METHODS if after[m] != before[m]} == changed, marker
    finally:
        code_fingerprint.cache_clear()


def test_step_monitors_need_a_tag(tiny, tmp_path):
    from bilevel_ssl.trainer import grad_norm_monitor

    with pytest.raises(ValueError, match="tag: monitors add numbers"):
        cached_train(cfg(), tiny, root=tmp_path, step_monitors=(grad_norm_monitor,))
    run = cached_train(cfg(), tiny, root=tmp_path, step_monitors=(grad_norm_monitor,), tag="grad-norm")
    assert all("grad_norm" in r and len(r["steps"]) > 0 for r in run.history)
    assert cached_train(cfg(), tiny, root=tmp_path, tag="grad-norm").history == run.history


def test_cpu_thread_count_is_part_of_the_key(tiny, tmp_path):
    n = torch.get_num_threads()
    base = entry_dir(cfg(), tiny, root=tmp_path)
    try:
        torch.set_num_threads(1 if n > 1 else 2)
        assert entry_dir(cfg(), tiny, root=tmp_path) != base
    finally:
        torch.set_num_threads(n)
    assert entry_dir(cfg(), tiny, root=tmp_path) == base


def test_run_id_names_the_run_across_code_versions(tiny, tmp_path, monkeypatch):
    import bilevel_ssl.cache as cache

    rid, folder = cache.run_id(cfg(), tiny), cache.entry_dir(cfg(), tiny, root=tmp_path)
    assert rid.startswith("simclr-none-") and rid == cache.run_id(cfg(progress=True), tiny)  # run control: same run
    assert rid != cache.run_id(cfg(lr=0.1), tiny) and rid != cache.run_id(cfg(), tiny, tag="knn-monitor")
    monkeypatch.setattr(cache, "code_fingerprint", lambda meta="none": "other code")
    assert cache.run_id(cfg(), tiny) == rid  # what plan_estimate_s matches shared runs by
    assert cache.entry_dir(cfg(), tiny, root=tmp_path) != folder  # while the cache trains it again
