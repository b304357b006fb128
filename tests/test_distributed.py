"""torchrun with 2 CPU processes (gloo): SimCLR with gathered negatives and synchronised BatchNorm equals one
process with the same global batch; bi-level GeSSL runs and its ranks stay in sync; per-rank batch checks."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bilevel_ssl.config import ConfigError, TrainConfig
from bilevel_ssl.trainer import train

WORKER = Path(__file__).with_name("train_worker.py")
CFG = dict(epochs=2, batch_size=32, backbone_args={"width": 8}, lr=0.05, progress=False,
           objective_args={"proj_hidden": 16, "proj_dim": 8})
# SimCLR: 2 ranks vs 1 process differ only by float32 summation order (all-reduced BatchNorm sums and gradients).
# Measured after 6 steps: losses agree to 1e-7 (relative), weights to 2e-6, BatchNorm running variances to 1.1e-5
# (values ~1).  The tolerance below is about 10x that.
RTOL, ATOL = 1e-4, 1e-5


def torchrun(cfg: dict, out: Path) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(WORKER), json.dumps(cfg), str(out), "1"], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [torch.load(out / f"result_rank{r}.pt", weights_only=False) for r in (0, 1)]


@pytest.fixture(scope="module")
def simclr_runs(tmp_path_factory, tiny):
    cfg = {**CFG, "sync_bn": True}
    ranks = torchrun(cfg, tmp_path_factory.mktemp("ddp_simclr"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = train(TrainConfig(**cfg), tiny)
    finally:
        torch.set_num_threads(threads)
    return ranks, single


def test_simclr_two_ranks_match_one_process_with_the_same_global_batch(simclr_runs):
    ranks, single = simclr_runs
    losses = [r["loss"] for r in single.history]
    assert [r["loss"] for r in ranks[0]["history"]] == pytest.approx(losses, rel=RTOL)
    state = single.net.state_dict()
    for name, t in ranks[0]["state"].items():
        if t.is_floating_point():
            torch.testing.assert_close(t, state[name], rtol=RTOL, atol=ATOL, msg=name)
        else:  # BatchNorm's num_batches_tracked
            assert torch.equal(t, state[name]), name


def test_ranks_hold_identical_weights(simclr_runs):
    ranks, _ = simclr_runs
    a, b = ranks[0]["state"], ranks[1]["state"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_gessl_runs_under_torchrun_and_ranks_stay_in_sync(tmp_path):
    cfg = {**CFG, "epochs": 1, "meta": "gessl", "meta_args": {"m": 2}}
    ranks = torchrun(cfg, tmp_path)
    a, b = ranks[0]["state"], ranks[1]["state"]
    assert all(torch.equal(a[k], b[k]) for k in a)  # averaged outer gradients, broadcast BatchNorm buffers
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in ranks[0]["history"])
    assert (tmp_path / "encoder.pt").exists()  # rank 0 wrote the run


def test_per_rank_batch_is_checked_before_compute(tiny, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ConfigError, match="batch_size: the global batch 32 must split into 3 equal shards"):
        train(TrainConfig(**CFG), tiny)
    monkeypatch.setenv("WORLD_SIZE", "4")  # 8 images per rank: GeSSL m = 8 needs >= 2 pairs per task
    with pytest.raises(ConfigError, match=r"batch_size / WORLD_SIZE: the per-rank batch of 8"):
        train(TrainConfig(**{**CFG, "meta": "gessl", "meta_args": {"m": 8}}), tiny)


def test_sync_bn_and_amp_are_refused_where_unsafe():
    with pytest.raises(ConfigError, match="sync_bn: only for meta 'none'"):
        TrainConfig(**{**CFG, "meta": "gessl", "meta_args": {"m": 2}, "sync_bn": True})
    with pytest.raises(ConfigError, match="amp: mixed precision is not numerically safe for hypergradient engine "
                                          "'second_order'"):
        TrainConfig(**{**CFG, "meta": "gessl", "meta_args": {"m": 2}, "amp": True, "device": "auto"})
    with pytest.raises(ConfigError, match="amp: mixed precision is for device cuda"):
        TrainConfig(**{**CFG, "amp": True})


def test_sync_batchnorm_cpu_is_plain_batchnorm_in_one_process():
    from bilevel_ssl.distributed import convert_sync_batchnorm

    torch.manual_seed(0)
    ref = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                              torch.nn.LazyLinear(5), torch.nn.BatchNorm1d(5))
    x = torch.randn(6, 3, 8, 8)
    ref(x)
    import copy

    conv = convert_sync_batchnorm(copy.deepcopy(ref), torch.device("cpu"))
    assert type(conv[1]).__name__ == "SyncBatchNormCPU" and type(conv[4]).__name__ == "SyncBatchNormCPU"
    torch.testing.assert_close(conv(x), ref(x))
    for a, b in zip(conv.state_dict().values(), ref.state_dict().values()):
        torch.testing.assert_close(a, b)
