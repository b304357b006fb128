"""Golden numbers of BiSSL and of the trainer, recorded from the code *before* the refactoring of issue #23
(bissl.py split into a package, trainer.train split, shared optimiser builder): any change of a number fails here.

* float64, tiny Conv-4, on fixed float64 inputs: one lower step (its clipped gradients and update), the Hessian
  operator, the CG implicit gradient (layer-wise and global) on a fixed v, one upper step (updates of θ_D, ϕ_D),
  then more steps of both levels (momentum, weight decay, warm-up then cosine, clipping) for SimCLR with SGD and
  BYOL (EMA teacher) with AdamW: logs, final parameters and buffers.  Asserted to 1e-10 absolute + 1e-9 relative
  (measured across CPUs: 9.4e-12 absolute with ATEN_CPU_CAPABILITY=avx2, on a layer-wise CG component; on a second
  AVX-512 machine (AVX512-FP16/AMX, 2026-12-05) 4.8e-9 absolute = 5.9e-11 relative on an implicit-gradient norm of
  83, the largest relative difference of a number not ~0 in exact arithmetic).
* float32 (the stage draws float32 views and batches from uint8 images): run_bissl with head warm-up and
  downstream augmentation (whole alternations: batch stacks, views, HVP batch), continue_pretext, cg_diagnostics,
  reestimate_bn, the downstream formatting, and two short trainer runs (SimCLR, BYOL; warm-up then cosine).
  Asserted to 1e-5 relative on the CPU that recorded them only (its capability and ISA flags, ``cpu_fingerprint``):
  on another kernel set (avx2) the CG solve on BiSSL's indefinite operator amplifies float32 rounding to 1-2% of
  the logged norms and 0.015 of a cosine, and on a second AVX-512 CPU with other ISA extensions (AVX512-FP16, AMX)
  the logged CG residual moved by 177%, so these pins are same-machine checks (promise 1 of the README) and skip
  elsewhere, saying so (re-record them there with ``--write-float32``);
  across CPUs, BiSSL's float32 numbers are compared within measured tolerances by tests/test_smoke_metrics.py.

All of it runs with one CPU thread (restored afterwards).  Regenerate (only for an intended change of numbers):
``PYTHONPATH=lib python tests/test_bissl_golden.py --write``.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

from bilevel_ssl.bissl import (
    BiSSLConfig,
    BiSSLStage,
    DownstreamHead,
    PretextData,
    PretextModel,
    cg_diagnostics,
    continue_pretext,
    implicit_gradient,
    prepare_downstream,
    reestimate_bn,
    run_bissl,
)
from bilevel_ssl.config import TrainConfig
from bilevel_ssl.data import ImageSet
from bilevel_ssl.meta import SingleLevel
from bilevel_ssl.trainer import build_net, train

GOLDEN = Path(__file__).parent / "golden" / "bissl_golden.pt"
DT = torch.float64


def _images(n, size=16, seed=0, classes=4):
    g = torch.Generator().manual_seed(seed)
    return ImageSet(torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8),
                    torch.arange(n) % classes, "tiny")


def _pretext(objective="simclr", optimizer="sgd", dtype=DT, seed=0):
    args = {"temperature": 0.5, "proj_hidden": 4, "proj_dim": 3} if objective == "simclr" else \
        {"proj_hidden": 4, "proj_dim": 3, "pred_hidden": 4}
    cfg = TrainConfig(objective=objective, objective_args=args, backbone="conv4", backbone_args={"width": 2},
                      batch_size=8, lr=0.05 if optimizer == "sgd" else 1e-3, momentum=0.9, weight_decay=1e-3,
                      optimizer=optimizer, seed=seed, progress=False)
    net, obj = build_net(cfg, 3, 16)
    net.to(dtype)
    return PretextModel(net, obj, SingleLevel(obj, net).teacher, cfg)


def _head(pm, dtype=DT):
    head = DownstreamHead(pm.net.backbone.feature_dim, 4, torch.linspace(-0.1, 0.2, pm.net.backbone.feature_dim),
                          1.7).to(dtype)
    with torch.no_grad():
        head.linear.weight.copy_(torch.randn(head.linear.weight.shape, generator=torch.Generator().manual_seed(7),
                                             dtype=dtype))
    return head


def _cfg(**kw):
    return BiSSLConfig(**{"alternations": 3, "lower_steps": 2, "upper_steps": 2, "lower_warmup": 1, "lam": 0.5,
                          "cg_iters": 3, "cg_damping": 2.0, "direct_weight": 0.5, "clip_norm": 2.0,
                          "hvp_batch_size": 6, "downstream_batch_size": 6, "downstream_lr": 0.1,
                          "downstream_augment": "mnistm", "warmup_epochs": 0, "progress": False, **kw})


def _state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _strip(history):
    return [{k: v for k, v in r.items() if k != "time_s"} for r in history]


def _stage_case(objective, optimizer):
    """One lower step (gradients, update), one Hessian, the implicit gradient on a fixed v, one upper step
    (updates), then more steps of both levels on fixed float64 inputs (momentum, schedules, clipping, teacher)."""
    pm = _pretext(objective, optimizer)
    stage = BiSSLStage(pm, _head(pm), _images(20, seed=2), _images(14, seed=1), _cfg(seed=3))
    out = {}
    g = torch.Generator().manual_seed(4)
    views = lambda: [torch.rand(8, 3, 16, 16, generator=g, dtype=DT) for _ in range(2)]
    batch = lambda: (torch.rand(6, 3, 16, 16, generator=g, dtype=DT), torch.randint(0, 4, (6,), generator=g))
    before = _state(stage.net)
    out["lower_logs"] = stage.lower_step(views())
    out["lower_grads"] = {k: p.grad.detach().clone() for k, p in stage.net.named_parameters() if p.grad is not None}
    out["lower_delta"] = {k: v - before[k] for k, v in _state(stage.net).items() if v.is_floating_point()}
    H = stage.pretext_hessian([v[:6] for v in views()])
    out["hvp_loss"] = H.loss
    v = [torch.randn(p.shape, generator=g, dtype=DT) for p in stage.theta_P]
    for layerwise in (True, False):
        v_ig, res = implicit_gradient(H.hvp, v, lam=0.5, damping=2.0, iters=3, layerwise=layerwise, residual=True)
        out[f"v_ig_layerwise{layerwise}"], out[f"v_ig_res_layerwise{layerwise}"] = v_ig, res
    before_D, before_h = _state(stage.backbone_D), _state(stage.head)
    out["upper_logs"] = stage.upper_step(*batch(), H, residual=True)
    out["upper_delta_D"] = {k: v - before_D[k] for k, v in _state(stage.backbone_D).items() if v.is_floating_point()}
    out["upper_delta_head"] = {k: v - before_h[k] for k, v in _state(stage.head).items()}
    out["more"] = []
    for _ in range(2):
        logs = [stage.lower_step(views()) for _ in range(2)]
        H = stage.pretext_hessian(views())
        logs += [stage.upper_step(*batch(), H, residual=i == 1) for i in range(2)]
        out["more"].append(logs + [{"distance": stage.distance(), "lr_lower": stage.opt_P.param_groups[0]["lr"],
                                    "lr_upper": stage.opt_D.param_groups[0]["lr"]}])
    out["net"], out["backbone_D"], out["head"] = _state(stage.net), _state(stage.backbone_D), _state(stage.head)
    if stage.teacher is not None:
        out["teacher"] = _state(stage.teacher.net)
    return out


def _float32_case():
    out = {}
    pm = _pretext("simclr", "sgd", dtype=torch.float32)
    down, pretext_images = _images(16, seed=1), _images(24, seed=2)
    cfg = _cfg(warmup_epochs=2, seed=1, alternations=2)
    res = run_bissl(pm, down, pretext_images, cfg)
    out["run_history"], out["run_warmup"] = _strip(res.history), res.warmup_history
    out["run_net"], out["run_head"] = _state(res.net), _state(res.head)
    base = continue_pretext(pm, pretext_images, cfg)
    out["continue_history"], out["continue_net"] = _strip(base.history), _state(base.net)
    out["diagnostics"] = cg_diagnostics(pm, down, pretext_images, cfg, iters=(1, 3), dampings=[2.0, 50.0],
                                        power_iters=4)
    out["bn"] = _state(reestimate_bn(res.backbone, down, batch_size=6, n_batches=3, seed=2))
    pdata = PretextData("tiny", _images(8, size=12, seed=5), _images(24, size=20, seed=6, classes=3))
    d = prepare_downstream("heldout", pdata, test_fraction=0.5)
    out["downstream"] = {"train_images": d.train.images, "train_labels": d.train.labels,
                         "test_images": d.test.images, "test_labels": d.test.labels, "n_classes": d.n_classes}
    return out


def _trainer_case():
    data = _images(40, size=16, seed=8, classes=4)
    out = {}
    for objective in ("simclr", "byol"):
        args = {"proj_hidden": 8, "proj_dim": 4} | ({"pred_hidden": 8} if objective == "byol" else {})
        cfg = TrainConfig(objective=objective, objective_args=args, backbone_args={"width": 4}, epochs=3,
                          warmup_epochs=1, batch_size=16, lr=0.05, augment="mnistm", progress=False, seed=2)
        res = train(cfg, data)
        out[objective] = {"history": _strip(res.history), "net": _state(res.net)}
    return out


def compute() -> dict:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return {"simclr_sgd": _stage_case("simclr", "sgd"), "byol_adamw": _stage_case("byol", "adamw"),
                "float32": _float32_case(), "trainer": _trainer_case()}
    finally:
        torch.set_num_threads(threads)


def assert_same(got, want, path, tol):
    if isinstance(want, dict):
        assert isinstance(got, dict) and sorted(got) == sorted(want), f"{path}: keys {sorted(got)} != {sorted(want)}"
        for k in want:
            assert_same(got[k], want[k], f"{path}.{k}", tol)
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want), f"{path}: length {len(got)} != {len(want)}"
        for i, (a, b) in enumerate(zip(got, want)):
            assert_same(a, b, f"{path}[{i}]", tol)
    elif isinstance(want, torch.Tensor):
        assert got.dtype == want.dtype and got.shape == want.shape, path
        if want.is_floating_point():
            torch.testing.assert_close(got, want, **tol, msg=path)
        else:
            assert torch.equal(got, want), path
    elif isinstance(want, float):
        if math.isnan(want):
            assert math.isnan(got), f"{path}: {got} != nan"
        else:
            assert got == pytest.approx(want, rel=tol["rtol"], abs=tol["atol"]), path
    else:
        assert got == want, path


@pytest.fixture(scope="module")
def numbers():
    return compute()


@pytest.fixture(scope="module")
def golden():
    return torch.load(GOLDEN, weights_only=False)


FLOAT64_TOL = {"atol": 1e-10, "rtol": 1e-9}  # measured across CPUs: see the module docstring


@pytest.mark.parametrize("case", ["simclr_sgd", "byol_adamw"])
def test_bissl_steps_float64_match_golden(numbers, golden, case):
    assert_same(numbers[case], golden[case], case, FLOAT64_TOL)


def cpu_fingerprint() -> str:
    """What decides float32 kernels on this machine: torch's CPU capability, torch's version and the CPU's vector
    ISA flags (``/proc/cpuinfo``; empty elsewhere).  Two machines with the same fingerprint run the same kernels."""
    flags = ""
    try:
        line = next(ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags"))
        flags = " ".join(sorted(f for f in line.split(":", 1)[1].split() if f.startswith(("avx", "amx", "fma", "f16c"))))
    except (OSError, StopIteration):
        pass
    return f"{torch.backends.cpu.get_cpu_capability()} torch {torch.__version__} {flags}".strip()


@pytest.mark.parametrize("case", ["float32", "trainer"])
def test_float32_pipeline_and_trainer_match_golden(numbers, golden, case):
    recorded = golden.get("float32_recorded_on", "")
    here = cpu_fingerprint()
    if here != recorded:
        pytest.skip(f"float32 numbers are pinned on the CPU that recorded them ({recorded}); this one is {here} "
                    "(cross-CPU checks: tests/test_smoke_metrics.py; re-record here with "
                    "PYTHONPATH=lib python tests/test_bissl_golden.py --write-float32)")
    assert_same(numbers[case], golden[case], case, {"atol": 1e-6, "rtol": 1e-5})


def test_float64_tolerance_catches_a_change(golden):
    """FLOAT64_TOL is far below a real change: one logged number moved by 1e-8 relative fails."""
    want = golden["simclr_sgd"]
    key = next(k for k, v in want.items() if isinstance(v, float) and abs(v) > 1.0)
    moved = {**want, key: want[key] * (1 + 1e-8)}
    with pytest.raises(AssertionError):
        assert_same(moved, want, "simclr_sgd", FLOAT64_TOL)
    assert_same(dict(want), want, "simclr_sgd", FLOAT64_TOL)


if __name__ == "__main__":
    if "--write-float32" in sys.argv:  # same-machine pins only: keep the float64 numbers, re-record float32 here
        old, new = torch.load(GOLDEN, weights_only=False), compute()
        torch.save({**old, "float32": new["float32"], "trainer": new["trainer"],
                    "float32_recorded_on": cpu_fingerprint()}, GOLDEN)
    elif "--write" in sys.argv:
        GOLDEN.parent.mkdir(exist_ok=True)
        torch.save({**compute(), "float32_recorded_on": cpu_fingerprint()}, GOLDEN)
    else:
        sys.exit("usage: PYTHONPATH=lib python tests/test_bissl_golden.py --write | --write-float32")
    print(f"wrote {GOLDEN} ({GOLDEN.stat().st_size} bytes)")
