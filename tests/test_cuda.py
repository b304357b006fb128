"""The CUDA path: every benchmark case (base objectives, GeSSL with each hypergradient engine, the multi-task
baselines, TC², MCR) computes on the GPU the same gradients as on the CPU, and the trainer runs, checkpoints,
resumes and uses bf16 autocast there.

Skipped without a GPU (CI has none).  They ran on a lent H200 (README, "Scaling out, the GPU path": **GPU
path**); run them with ``pytest tests/test_cuda.py`` on a machine with CUDA.

The CPU/GPU comparison is in float64, where cuDNN/cuBLAS and the CPU kernels differ only by summation order
(~1e-13 relative); a device bug (a tensor created on the CPU inside an engine, a buffer left behind by ``.to``, a
random draw taken from the CUDA generator instead of the CPU one) shows up as an error or a relative difference
of order 1.  The library draws every random number of a step (GeSSL's task split, MAE's masks, PCGrad's order,
MCR's mixing weights) from torch's global *CPU* RNG, so re-seeding it before each device's step gives both the
same draws.
"""

from __future__ import annotations

import pytest
import torch

from bilevel_ssl.bench import cases
from bilevel_ssl.config import TrainConfig
from bilevel_ssl.data import ImageSet
from bilevel_ssl.evaluate import extract_features
from bilevel_ssl.trainer import train
from float64_step import build64, grads, step64, views64

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

BATCH = 128  # GeSSL: 8 tasks of 16 images; TC²/multi-task: their default task counts divide it


@pytest.mark.parametrize("name", sorted(cases()))
def test_cuda_gradients_match_cpu_in_float64(name):
    overrides = cases()[name]
    cfg, _, net_c, meta_c = build64(overrides, BATCH, "cpu")
    _, dev, net_g, meta_g = build64(overrides, BATCH, "cuda")
    assert dev.type == "cuda"
    assert all(p.device.type == "cuda" for p in [*net_g.parameters(), *meta_g.parameters()])
    # the same initial weights on both devices (build_net seeds torch)
    torch.testing.assert_close(torch.cat([p.detach().flatten().cpu() for p in net_g.parameters()]),
                               torch.cat([p.detach().flatten() for p in net_c.parameters()]), rtol=0, atol=0)
    views = views64(cfg, meta_c, BATCH)
    logs_c = step64(net_c, meta_c, [v.clone() for v in views], "cpu")
    logs_g = step64(net_g, meta_g, views, dev)
    g_c, g_g = grads(net_c, meta_c), grads(net_g, meta_g)
    assert torch.isfinite(g_g).all(), f"{name}: non-finite gradient on CUDA"
    assert g_c.norm() > 0, f"{name}: zero gradient - the comparison would be vacuous"
    rel = float((g_g - g_c).norm() / g_c.norm())
    assert rel < 1e-8, f"{name}: CUDA gradients differ from CPU by {rel:.2e} (relative)"
    for k, v in logs_c.items():
        assert logs_g[k] == pytest.approx(v, rel=1e-8, abs=1e-10), f"{name}: log {k}"


def _random_set(n: int = 128, seed: int = 0) -> ImageSet:
    g = torch.Generator().manual_seed(seed)
    return ImageSet(torch.randint(0, 256, (n, 3, 28, 28), generator=g, dtype=torch.uint8),
                    torch.randint(0, 10, (n,), generator=g), "random")


def _cfg(**kw) -> TrainConfig:
    base = {"objective": "simclr", "meta": "gessl", "hypergrad": "momentum_proxy", "epochs": 2, "batch_size": 64,
            "lr": 1e-3, "device": "cuda", "progress": False, "seed": 0}
    cfg = {**base, **kw}
    if cfg["meta"] == "gessl" and cfg["hypergrad"] in ("first_order", "momentum_proxy"):
        cfg["meta_args"] = {**cfg.get("meta_args", {}), "allow_untrained_meta": True}  # g untrained: deliberate
    return TrainConfig(**cfg)


class _Interrupt(Exception):
    pass


def test_cuda_train_checkpoint_resume(tmp_path):
    """Two epochs in one go vs one epoch, an interruption, a resume: the same history length and (up to cuDNN's
    non-deterministic backward) the same weights; the checkpoint loads onto the GPU with the engine's state."""
    data = _random_set()
    full = train(_cfg(checkpoint_every=1), data, tmp_path / "full")
    assert len(full.history) == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in full.history)
    assert next(full.net.parameters()).device.type == "cuda"

    def stop_after_one(epoch, record):
        if epoch == 1:
            raise _Interrupt

    with pytest.raises(_Interrupt):
        train(_cfg(checkpoint_every=1), data, tmp_path / "split", callbacks=(stop_after_one,))
    resumed = train(_cfg(checkpoint_every=1), data, tmp_path / "split")
    assert len(resumed.history) == 2
    a = torch.cat([p.detach().flatten() for p in full.net.parameters()])
    b = torch.cat([p.detach().flatten() for p in resumed.net.parameters()])
    assert float((a - b).norm() / a.norm()) < 1e-3
    feats = extract_features(resumed.backbone, data, device="cuda")
    assert feats.shape[0] == len(data) and feats.dtype.name == "float32"


@pytest.mark.parametrize("meta,engine", [("none", "second_order"), ("gessl", "first_order"),
                                         ("gessl", "momentum_proxy"), ("tc2", "first_order"), ("mcr", "first_order")])
def test_cuda_bf16_autocast_trains(meta, engine):
    """``amp: true`` (bf16 autocast) with every method whose engine allows it (no second derivatives in bf16)."""
    run = train(_cfg(meta=meta, hypergrad=engine, epochs=1, amp=True), _random_set())
    assert all(torch.isfinite(torch.tensor(float(v))) for k, v in run.history[-1].items()
               if isinstance(v, (int, float)) and k != "epoch")

