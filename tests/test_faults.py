"""Killed runs resume exactly (SIGTERM mid-epoch, SIGKILL between checkpoints); run directories are never
replaced silently."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bilevel_ssl.config import ConfigError, TrainConfig
from bilevel_ssl.trainer import CHECKPOINT, train

WORKER = Path(__file__).with_name("train_worker.py")
CFG = dict(epochs=3, batch_size=32, backbone_args={"width": 8}, lr=0.05, progress=False, checkpoint_every=1,
           objective_args={"proj_hidden": 16, "proj_dim": 8})


def start(cfg: dict, out: Path, pause_at: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(WORKER), json.dumps(cfg), str(out), str(torch.get_num_threads()),
                             str(pause_at)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    t0 = time.monotonic()
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"worker exited early ({proc.returncode}): {proc.stderr.read()[-2000:]}")
        if time.monotonic() - t0 > timeout:
            proc.kill()
            raise AssertionError("worker did not reach the pause step")
        time.sleep(0.05)


def same_run(a, b) -> None:
    assert [r["loss"] for r in a.history] == [r["loss"] for r in b.history]
    sa, sb = a.net.state_dict(), b.net.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("meta", [{}, {"meta": "gessl", "meta_args": {"m": 2}},
                                  # aid_neumann keeps its warm-started power vector between steps (engine state)
                                  {"meta": "gessl", "meta_args": {"m": 2}, "hypergrad": "aid_neumann",
                                   "hypergrad_args": {"power_iters": 1}}],
                         ids=["simclr", "gessl", "gessl_aid_neumann"])
def test_sigterm_mid_epoch_then_resume_equals_uninterrupted(tiny, tmp_path, meta):
    cfg = {**CFG, **meta}
    proc = start(cfg, tmp_path, pause_at=5)  # 3 steps per epoch: step 5 = epoch 2, step 2
    wait_for(tmp_path / "PAUSED", proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "SIGTERM: stopped at epoch 2 step 2" in err
    ckpt = torch.load(tmp_path / CHECKPOINT, weights_only=False)
    assert ckpt["epoch"] == 1 and ckpt["partial"]["step"] == 2
    resumed = train(TrainConfig(**cfg), tiny, tmp_path)
    same_run(resumed, train(TrainConfig(**cfg), tiny))


def test_sigkill_then_resume_from_last_checkpoint_equals_uninterrupted(tiny, tmp_path):
    proc = start(CFG, tmp_path, pause_at=5)
    wait_for(tmp_path / "PAUSED", proc)
    proc.kill()
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    ckpt = torch.load(tmp_path / CHECKPOINT, weights_only=False)
    assert ckpt["epoch"] == 1 and ckpt["partial"] is None  # the epoch-1 checkpoint; epoch 2 was lost
    resumed = train(TrainConfig(**CFG), tiny, tmp_path)
    same_run(resumed, train(TrainConfig(**CFG), tiny))


def test_existing_run_directory_is_not_replaced_silently(tiny, tmp_path):
    cfg = TrainConfig(**{**CFG, "epochs": 1})
    train(cfg, tiny, tmp_path)
    before = (tmp_path / CHECKPOINT).read_bytes()
    with pytest.raises(ConfigError, match="out_dir: .* holds the checkpoint of an earlier run; resume=True"):
        train(cfg, tiny, tmp_path, resume=False)
    assert (tmp_path / CHECKPOINT).read_bytes() == before
    train(cfg, tiny, tmp_path, resume=False, overwrite=True)  # explicit


def test_sigterm_handler_is_restored_after_training(tiny):
    before = signal.getsignal(signal.SIGTERM)
    train(TrainConfig(**{**CFG, "epochs": 1}), tiny)
    assert signal.getsignal(signal.SIGTERM) is before


def test_reproduce_archives_the_previous_run(tmp_path):
    from bilevel_ssl.reproduce import archive_previous

    run = tmp_path / "10_x" / "smoke"
    assert archive_previous(run) is None  # nothing there yet
    run.mkdir(parents=True)
    (run / "metrics.json").write_text("{}")
    first = archive_previous(run)
    assert not run.exists() and (first / "metrics.json").read_text() == "{}"
    assert first.parent == tmp_path / "10_x" / "archive" and first.name.startswith("smoke-")
    run.mkdir()
    (run / "metrics.json").write_text("{}")
    os.utime(run / "metrics.json", (first.stat().st_mtime, (first / "metrics.json").stat().st_mtime))
    second = archive_previous(run)
    assert second != first and second.exists() and first.exists()  # same timestamp: a new name, nothing lost


def test_command_line_trains_resumes_and_writes_metrics(tmp_path):
    from bilevel_ssl.trainer import main

    (tmp_path / "run.yaml").write_text("epochs: 1\nbatch_size: 256\nlr: 0.05\nprogress: false\n"
                                       "backbone_args: {width: 8}\nobjective_args: {proj_hidden: 16, proj_dim: 8}\n")
    assert main([str(tmp_path / "run.yaml"), "--out", str(tmp_path / "run"), "--dataset", "mnist5k"]) == 0
    record = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert record["params"]["dataset"] == "mnist5k" and record["params"]["world_size"] == 1
    assert len(record["history"]) == 1 and record["results"]["final"]["loss"] > 0
    assert (tmp_path / "run" / "encoder.pt").exists()
    (tmp_path / "bad.yaml").write_text("lr: 1e-3\n")
    with pytest.raises(ConfigError, match="lr: must be a finite number > 0, got str '1e-3' .YAML 1.1"):
        main([str(tmp_path / "bad.yaml"), "--out", str(tmp_path / "bad")])
