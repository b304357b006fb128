"""The one trainer: every objective and meta-method trains through :func:`train`.

Determinism: the network is initialised under ``torch.manual_seed(seed)``; shuffling and augmentation draw from
one CPU ``torch.Generator`` seeded with ``seed + 1``; its state and torch's global RNG state (MAE's masks) are
saved in every checkpoint, so the same seed
gives the same numbers on CPU, and a resumed run continues exactly where an uninterrupted one would be.

Checkpoints (``<out_dir>/checkpoint.pt``, written atomically) hold network, optimizer, schedule, generator and
history; they are written every ``checkpoint_every`` epochs and at the end.  The trained backbone alone is saved
to ``<out_dir>/encoder.pt`` (:func:`bilevel_ssl.models.load_encoder`).
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from . import distributed
from .augment import make_views, preset, with_overrides
from .config import ConfigError, TrainConfig
from .data import ImageSet
from .meta import SSLNet, make_meta
from .models import make_backbone, save_encoder
from .objectives import Objective, make_objective
from .runtime import release_memory, tune_cpu_allocator

CHECKPOINT = "checkpoint.pt"
ENCODER = "encoder.pt"


@dataclass
class TrainResult:
    net: SSLNet
    history: list[dict]
    out_dir: Path | None

    @property
    def backbone(self) -> torch.nn.Module:
        return self.net.backbone


def build_net(cfg: TrainConfig, in_channels: int, image_size: int) -> tuple[SSLNet, Objective]:
    """The objective and the network it trains, initialised under ``cfg.seed``."""
    objective = make_objective(cfg.objective, **cfg.objective_args)
    torch.manual_seed(cfg.seed)
    kwargs = dict(cfg.backbone_args)
    if cfg.backbone == "vit_tiny":
        kwargs.setdefault("image_size", image_size)
    backbone = make_backbone(cfg.backbone, in_channels, **kwargs)
    return SSLNet(backbone, objective.heads(backbone.feature_dim)), objective


def make_optimizer(name: str, params, *, lr: float, momentum: float = 0.0,
                   weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """The library's optimizers by name (:data:`bilevel_ssl.config.OPTIMIZERS`): ``sgd`` (with ``momentum``),
    ``adam``, ``adamw`` (``momentum`` unused), each with coupled (SGD, Adam) or decoupled (AdamW) ``weight_decay``."""
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"optimizer: unknown {name!r}; allowed: sgd, adam, adamw")


def build_optimizer(cfg: TrainConfig, params) -> torch.optim.Optimizer:
    """The optimizer of a run: ``cfg.optimizer`` with ``cfg.lr``, ``cfg.momentum`` and ``cfg.weight_decay``."""
    return make_optimizer(cfg.optimizer, params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to 0 at ``total`` (or constant)."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def build_schedule(opt: torch.optim.Optimizer, total: int, warmup: int,
                   schedule: str) -> torch.optim.lr_scheduler.LambdaLR:
    """The learning-rate schedule stepped once per optimizer step: :func:`lr_factor` times the initial lr."""
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total, warmup, schedule))


def _save_atomic(obj: dict, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


StepMonitor = Callable[[int, SSLNet, object, list], dict]


def _named(meta) -> list[tuple[str, torch.nn.Parameter]]:
    """The meta-method's own parameters (GeSSL's g...), named ``meta.<i>`` for error messages."""
    return [(f"meta-method parameter {i}", p) for i, p in enumerate(meta.parameters())]


def train_step(net: SSLNet, meta, opt: torch.optim.Optimizer, batch: torch.Tensor, aug, gen: torch.Generator,
               step_monitors: tuple[StepMonitor, ...] = (), step: int = 0, *, dist: distributed.Dist | None = None,
               amp: bool = False, sync_buffers: bool = False) -> dict[str, float]:
    """One optimisation step on a uint8 batch: views, the meta-method's gradients, the optimizer step.

    The trainer's loop body and what :mod:`bilevel_ssl.bench` times (``meta.after_step`` - EMA teacher, queues -
    follows it, with the schedule's progress).  Returns the meta-method's logs, then the numbers of the
    ``step_monitors`` (see :func:`train`).  Under torchrun (``dist``): ``batch`` is the global batch; its views
    are drawn whole and this rank keeps its shard; gradients are all-reduced as the meta-method requires and the
    logs averaged (:mod:`bilevel_ssl.distributed`).  ``amp``: bf16 autocast around the forward/backward (CUDA)."""
    x = batch.float().div_(255)
    views = make_views(x, meta.n_views, aug, gen)
    if dist is not None:
        rows = distributed.shard(x.shape[0], dist)
        views = [v[rows] for v in views]
    opt.zero_grad(set_to_none=True)
    with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16, enabled=amp):
        logs = meta.compute_grads(net, views)
    if dist is not None:
        distributed.reduce_grads([p for g in opt.param_groups for p in g["params"]], dist,
                                 meta.distributed_reduction())
        logs = distributed.average_logs(logs, dist)
    bad = [f"{k} = {v}" for k, v in logs.items() if not math.isfinite(v)]
    if not bad:  # one reduction over all gradients; names only when something is wrong
        grads = [p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None]
        if grads and not torch.isfinite(torch.nn.utils.get_total_norm(grads)):
            bad = [f"gradient of {name}" for name, p in [*net.named_parameters(), *_named(meta)]
                   if p.grad is not None and not torch.isfinite(p.grad).all()]
            bad = [f"non-finite {', '.join(bad[:5])}" + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")]
    if bad:  # before the optimizer step: the parameters stay those of the last good step
        raise FloatingPointError(", ".join(bad))
    for monitor in step_monitors:
        with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
            logs.update(monitor(step, net, meta, views))
    opt.step()
    if sync_buffers:
        distributed.broadcast_buffers(net, dist)
    return logs


def grad_norm_monitor(step: int, net: SSLNet, meta, views: list) -> dict[str, float]:
    """Step monitor: ``grad_norm`` and ``grad_norm_sq``, the norm (and its square) of the network's ``.grad`` - the
    gradient the optimizer is about to apply (weight decay and momentum are not in ``.grad``).  The epoch means of
    both give the mean and variance of the per-step norm over a run."""
    sq = float(sum((p.grad.detach().double() ** 2).sum() for p in net.parameters() if p.grad is not None))
    return {"grad_norm": sq ** 0.5, "grad_norm_sq": sq}


class _Sigterm:
    """While active (main thread only), SIGTERM sets a flag instead of killing the process; the trainer checks it
    after every step, writes a mid-epoch checkpoint and exits with status 143 (128 + SIGTERM)."""

    def __init__(self):
        self.requested, self._previous = False, None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
        return False

    def check(self, dist: distributed.Dist | None) -> bool:
        """Whether to stop now; under torchrun, when any rank was asked (all ranks stop at the same step)."""
        if dist is None:
            return self.requested
        flag = torch.tensor([float(self.requested)], device=dist.device)
        torch.distributed.all_reduce(flag)
        return bool(flag.item() > 0)


def check_run(cfg: TrainConfig, n: int, out: Path | None, *, resume: bool, overwrite: bool) -> None:
    """What :func:`train` checks before any compute: the config type, the batch against the ``n`` images, an
    existing run directory (replaced only with ``overwrite``), and under torchrun the per-rank shard of the batch
    (divisible, and valid for the meta-method).  Raises :class:`~bilevel_ssl.config.ConfigError` naming the key."""
    if not isinstance(cfg, TrainConfig):
        raise TypeError(f"cfg: expected TrainConfig, got {type(cfg).__name__}")
    if cfg.batch_size > n:
        raise ConfigError(f"batch_size: {cfg.batch_size} is larger than the {n} training images; allowed: 2..{n}")
    if out is not None and not resume and not overwrite and (out / CHECKPOINT).exists():
        raise ConfigError(f"out_dir: {out} holds the checkpoint of an earlier run; resume=True continues it, "
                          f"overwrite=True replaces it, or choose another out_dir")
    world = distributed.world_size_from_env()
    if world > 1 and cfg.batch_size % world:
        raise ConfigError(f"batch_size: the global batch {cfg.batch_size} must split into {world} equal shards "
                          f"(WORLD_SIZE={world}); allowed: multiples of {world}")
    if world > 1:  # the meta-method's batch checks (tasks of >= 2 pairs, ...) apply to each rank's shard
        from .meta import meta_class

        local = cfg.batch_size // world
        try:
            meta_class(cfg.meta).check_config(dataclasses.replace(cfg, batch_size=local))
        except ValueError as err:
            raise ConfigError(f"batch_size / WORLD_SIZE: the per-rank batch of {local} "
                              f"({cfg.batch_size} / {world}) is not valid: {err}") from None


@dataclass
class _Run:
    """The state of one :func:`train` call: what a checkpoint holds (network, meta-method, optimizer, schedule,
    generator, history) and what every step needs (images on the device, augmentation, torchrun group)."""

    cfg: TrainConfig
    net: SSLNet
    meta: object
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    gen: torch.Generator
    aug: object
    device: torch.device
    dist: distributed.Dist | None
    out: Path | None
    steps_per_epoch: int
    total: int
    images: torch.Tensor | None = None
    history: list[dict] = dataclasses.field(default_factory=list)

    @property
    def main(self) -> bool:
        return self.dist is None or self.dist.is_main

    def checkpoint(self, epoch_done: int, part: dict | None = None) -> None:
        """Write ``out/checkpoint.pt`` atomically (main rank only); ``part``: where a SIGTERM stopped the epoch."""
        if self.main:
            _save_atomic({"config": self.cfg.to_dict(), "net": self.net.state_dict(),
                          "optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(),
                          "meta": self.meta.state_dict(), "generator": self.gen.get_state(),
                          "torch_rng": torch.get_rng_state(), "history": self.history, "epoch": epoch_done,
                          "partial": part}, self.out / CHECKPOINT)

    def resume(self, ckpt_path: Path) -> tuple[int, dict | None]:
        """Load a checkpoint of the same run (other parameters than :data:`TrainConfig.RUN_CONTROL` are an error):
        everything it holds, RNG states included.  Returns the epochs done and the mid-epoch (SIGTERM) state, if
        any."""
        cfg = self.cfg
        ckpt = torch.load(ckpt_path, map_location=self.device, weights_only=False)
        differing = sorted(k for k in set(ckpt["config"]) | set(cfg.to_dict())
                           if k not in TrainConfig.RUN_CONTROL and ckpt["config"].get(k) != cfg.to_dict().get(k))
        if differing:
            raise ConfigError(f"resume: {ckpt_path} was written with other parameters; use another out_dir "
                              f"or overwrite=True with resume=False (differing keys: {differing})")
        self.net.load_state_dict(ckpt["net"])
        self.opt.load_state_dict(ckpt["optimizer"])
        self.sched.load_state_dict(ckpt["scheduler"])
        self.meta.load_state_dict(ckpt["meta"])
        # RNG states are CPU byte tensors; map_location=device moved them to the GPU with everything else
        self.gen.set_state(ckpt["generator"].cpu())
        torch.set_rng_state(ckpt["torch_rng"].cpu())
        self.history = ckpt["history"]
        return ckpt["epoch"], ckpt.get("partial")  # partial: a mid-epoch (SIGTERM) checkpoint, where the epoch stopped

    def epoch(self, epoch: int, partial: dict | None, sigterm: "_Sigterm", step_monitors: tuple[StepMonitor, ...],
              monitors: tuple[Callable[[int, SSLNet], dict], ...]) -> dict:
        """One epoch (or the rest of the one ``partial`` describes): its steps, then the monitors; returns the
        epoch's record (not yet in the history).  A SIGTERM after a step that does not end the epoch writes a
        mid-epoch checkpoint and exits with status 143."""
        cfg, n, device = self.cfg, len(self.images), self.device
        t0 = time.perf_counter()
        if partial is not None:  # finish the epoch a SIGTERM interrupted, exactly as it would have gone
            perm, first, logs, per_step = partial["perm"], partial["step"], partial["logs"], partial["per_step"]
            t0 -= partial["time_s"]
        else:
            perm, first, logs, per_step = torch.randperm(n, generator=self.gen), 0, {}, []
        for step in range(first, self.steps_per_epoch):
            idx = perm[step * cfg.batch_size:(step + 1) * cfg.batch_size].to(device)
            global_step = epoch * self.steps_per_epoch + step + 1
            try:
                step_logs = train_step(self.net, self.meta, self.opt, self.images[idx], self.aug, self.gen,
                                       step_monitors, global_step, dist=self.dist, amp=cfg.amp,
                                       sync_buffers=self.dist is not None and not cfg.sync_bn)
            except FloatingPointError as err:
                raise FloatingPointError(f"epoch {epoch + 1} step {step + 1}: {err}; last good checkpoint: "
                                         f"{self.out / CHECKPOINT if self.out else 'none'}") from None
            for k, v in step_logs.items():
                logs[k] = logs.get(k, 0.0) + v / self.steps_per_epoch
            if step_monitors:
                per_step.append({"step": global_step, **step_logs})
            self.meta.after_step(self.net, global_step / self.total)
            self.sched.step()
            if sigterm.check(self.dist) and step + 1 < self.steps_per_epoch:
                where = "nowhere (no out_dir)"
                if self.out is not None:
                    self.checkpoint(epoch, {"perm": perm, "step": step + 1, "logs": logs, "per_step": per_step,
                                            "time_s": time.perf_counter() - t0})
                    where = str(self.out / CHECKPOINT)
                print(f"SIGTERM: stopped at epoch {epoch + 1} step {step + 1}; checkpoint: {where}; the same "
                      f"call with resume=True continues exactly", file=sys.stderr, flush=True)
                raise SystemExit(128 + signal.SIGTERM)
        record = {"epoch": epoch + 1, **logs, "lr": self.opt.param_groups[0]["lr"],
                  "time_s": time.perf_counter() - t0}
        if step_monitors:
            record["steps"] = per_step
        if self.main:
            for monitor in monitors:
                with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad():
                    record.update(monitor(epoch + 1, self.net))
        return record


def train(cfg: TrainConfig, data: ImageSet, out_dir: str | Path | None = None, *, resume: bool = True,
          overwrite: bool = False, callbacks: tuple[Callable[[int, dict], None], ...] = (),
          monitors: tuple[Callable[[int, SSLNet], dict], ...] = (),
          step_monitors: tuple[StepMonitor, ...] = ()) -> TrainResult:
    """Self-supervised training on ``data.images`` (labels are never read).

    ``out_dir``: where checkpoints and the encoder go (None: keep nothing on disk).  ``resume``: continue from
    ``out_dir/checkpoint.pt`` if it exists (also from the mid-epoch checkpoint a SIGTERM leaves: the run then ends
    with exactly the numbers of an uninterrupted one); with ``resume=False`` an existing checkpoint is an error
    unless ``overwrite=True`` - a run directory is never replaced silently.  ``monitors``: ``f(epoch, net) -> dict`` at the end of each epoch
    (e.g. a quick k-NN of the backbone); the numbers join the epoch's history record and its checkpoint.  They
    run under ``torch.no_grad`` with torch's global RNG forked, so they cannot change the training numbers;
    they must leave the network's weights and train/eval mode as they found them.  ``callbacks``:
    ``f(epoch, record)`` after each epoch's checkpoint.  ``step_monitors``: ``f(step, net, meta, views) -> dict``
    after every step's gradients are computed and before the optimizer applies them (``.grad`` holds the step's
    update direction; ``step`` counts from 1 over the whole run), with torch's RNG forked; they must not change
    ``.grad``, the weights or the mode (e.g. :func:`bilevel_ssl.conflict.conflict_monitor`, per-task gradient
    cosines).  Their numbers are averaged into the epoch's record like the step logs, and kept per step in
    ``record["steps"]`` (a list of dicts with ``"step"``).
    """
    out = Path(out_dir) if out_dir is not None else None
    check_run(cfg, len(data), out, resume=resume, overwrite=overwrite)
    dist = distributed.init(cfg.resolved_device())
    device = dist.device if dist is not None else torch.device(cfg.resolved_device())
    aug = with_overrides(preset(cfg.augment), cfg.augment_args)
    if device.type == "cpu":
        tune_cpu_allocator()  # only with BILEVEL_SSL_MALLOC=reuse: ~1.7x faster CPU steps (bilevel_ssl.runtime)

    net, objective = build_net(cfg, data.channels, data.size)
    if dist is not None and cfg.sync_bn:
        net = distributed.convert_sync_batchnorm(net, device)
    net.to(device)
    meta = make_meta(cfg.meta, objective, net, cfg).to(device)
    meta.dist = dist
    opt = build_optimizer(cfg, [*net.parameters(), *meta.parameters()])
    steps_per_epoch = len(data) // cfg.batch_size  # drop_last: every step sees a full batch (BatchNorm, negatives)
    total = steps_per_epoch * cfg.epochs
    sched = build_schedule(opt, total, cfg.warmup_epochs * steps_per_epoch, cfg.schedule)
    run = _Run(cfg, net, meta, opt, sched, torch.Generator().manual_seed(cfg.seed + 1), aug, device, dist, out,
               steps_per_epoch, total)
    start_epoch, partial = 0, None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        if resume and (out / CHECKPOINT).exists():
            start_epoch, partial = run.resume(out / CHECKPOINT)

    if device.type == "cuda":  # the dataset lives on the GPU; pinned pages make the one copy asynchronous
        run.images = data.images.pin_memory().to(device, non_blocking=True)
    else:
        run.images = data.images.to(device)
    net.train()
    bar = tqdm(range(start_epoch, cfg.epochs), desc=f"{cfg.objective}/{cfg.meta}",
               disable=not (cfg.progress and run.main), initial=start_epoch, total=cfg.epochs, unit="epoch")
    sigterm = _Sigterm()
    with sigterm:
        for epoch in bar:
            record = run.epoch(epoch, partial, sigterm, step_monitors, monitors)
            partial = None
            run.history.append(record)
            bar.set_postfix(loss=f"{record.get('loss', float('nan')):.4f}")
            if out is not None and ((cfg.checkpoint_every and (epoch + 1) % cfg.checkpoint_every == 0)
                                    or epoch + 1 == cfg.epochs):
                run.checkpoint(epoch + 1)
            for cb in callbacks:
                cb(epoch + 1, record)
    bar.close()
    release_memory()  # the allocator keeps freed blocks during training (bilevel_ssl.runtime); give them back
    if out is not None and run.main:
        save_encoder(net.backbone, out / ENCODER, objective=cfg.objective, meta=cfg.meta, epochs=cfg.epochs)
    return TrainResult(net, run.history, out)


def main(argv: list[str] | None = None) -> int:
    """``python -m bilevel_ssl.trainer RUN.yaml --out DIR [--dataset mnistm5k] [--data-root PATH]`` (also under
    ``torchrun``): train the TrainConfig of RUN.yaml (its keys, validated) on a dataset, write checkpoints, the
    encoder and ``metrics.json`` (the history) to DIR.  Resumes DIR if it holds a checkpoint of the same run."""
    import argparse

    import yaml

    from .data import load_dataset
    from .report import write_metrics

    ap = argparse.ArgumentParser(prog="python -m bilevel_ssl.trainer", description=main.__doc__.split("\n")[0])
    ap.add_argument("config", help="YAML file with TrainConfig keys")
    ap.add_argument("--out", required=True, help="run directory (checkpoint.pt, encoder.pt, metrics.json)")
    ap.add_argument("--dataset", default="mnistm5k")
    ap.add_argument("--data-root", default=None)
    args = ap.parse_args(argv)
    cfg = TrainConfig.from_dict(yaml.safe_load(Path(args.config).read_text()) or {})
    data = load_dataset(args.dataset, root=args.data_root)
    result = train(cfg, data, args.out)
    if distributed.world_size_from_env() <= 1 or torch.distributed.get_rank() == 0:
        write_metrics(args.out, params={**cfg.to_dict(), "dataset": args.dataset,
                                        "world_size": distributed.world_size_from_env()},
                      seed=cfg.seed, results={"final": {k: v for k, v in result.history[-1].items()
                                                        if isinstance(v, float)}}, history=result.history)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
