"""Step-time and memory benchmark of every objective and meta-method: ``python -m bilevel_ssl.bench``.

What is measured, in one process, for each case: the **median wall time of one optimisation step** (views from a
uint8 batch, the meta-method's gradients, the optimizer step, ``after_step``: exactly :func:`trainer.train_step`)
after ``--warmup`` untimed steps, over ``--steps`` timed steps, and the **peak memory** of those steps.  Every case
sees the same number of *source images per step* (``--batch``), so a ratio compares methods at equal data: GeSSL
makes three views of each image, SimCLR two.  Each figure's ``ratio`` is to the base SimCLR step measured in the
same run (``simclr``), so machines and load cancel out to first order; re-run on an idle machine for absolute
times.  ``ratio_like`` compares like with like: a ``*_channels_last`` case (the NHWC Conv-4 the default profiles
train) is divided by ``simclr_channels_last``, measured in the same run whenever such a case is; for every other
case it equals ``ratio``.  The targets are read on ``ratio_like``.

Memory: the peak bytes of live tensors during one extra (untimed) step - parameters, batch, optimizer state and
every activation and gradient - from ``torch.cuda.max_memory_allocated`` on CUDA and from :mod:`torch.profiler`'s
memory timeline on CPU (allocator overhead and the Python process itself are not counted).

Targets (issue #11, on the 2-core CPU at equal source images per step), checked in the JSON under ``targets``:
GeSSL exact second order ≤ 3.5× SimCLR, GeSSL first order ≤ 2.2× (each in both memory formats), augmentation
≤ 5% of a SimCLR step, a BiSSL upper step ≤ 1.2× the N_c Hessian-vector products it needs (:func:`bench_bissl`).

``--profile CASE`` prints the top operators of that case from :mod:`torch.profiler` (where the time goes); ``--stages
CASE`` the time of each labelled stage of its meta-method (:func:`stage_times`; TC²'s two bi-level stages).
Cases of methods not yet in the library are simply absent; new meta-methods add a line to :func:`cases`.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from .augment import make_views, preset
from .bilevel import FIRST_ORDER_ENGINES
from .config import TrainConfig
from .hypergrad import ENGINES
from .meta import make_meta
from .objectives import OBJECTIVES
from .runtime import release_memory, tune_cpu_allocator
from .trainer import build_net, build_optimizer, train_step

TARGETS = {"gessl_second_order": 3.5, "gessl_first_order": 2.2,
           "gessl_second_order_channels_last": 3.5, "gessl_first_order_channels_last": 2.2}
CHANNELS_LAST = "_channels_last"  # suffix of the NHWC cases; their like-with-like reference is simclr_channels_last
AUGMENT_TARGET = 0.05
BISSL_TARGET = 1.2  # a BiSSL upper step costs at most 1.2x the N_c Hessian-vector products it needs

# What torch.profiler's C++ side (Kineto, c10) writes straight to file descriptor 2 on a CPU-only machine, one line
# each: Kineto's trace markers ("USDT:... profiler_start" / "profiler_stop"), c10's "[W... CPUAllocator.cpp:...]
# Memory block of unknown size was allocated before the profiling started" and Kineto's CUDA probe
# ("ERROR:... gpuGetDeviceCount failed with code 35").  None of it concerns the measurement.
PROFILER_NOISE = re.compile(r"USDT:|SyncActivityProfilerHandler|CPUAllocator\.cpp|allocated before the profiling "
                            r"started|gpuGetDeviceCount|DeviceProperties\.cpp|CuptiActivityProfiler|"
                            r"ActivityProfilerController")


@contextlib.contextmanager
def quiet_profiler():
    """Run a :mod:`torch.profiler` block without its C++ console noise (:data:`PROFILER_NOISE`) between the
    progress bars: file descriptor 2 goes to a temporary file for the block, and afterwards every line that is not
    profiler noise is written back to ``sys.stderr`` (so a real error message of the block is not lost).  Where
    descriptor 2 cannot be redirected (no such descriptor), the block runs as it is."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # pragma: no cover - no descriptor 2 to redirect
        yield
        return
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            with contextlib.suppress(OSError, ValueError):
                sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            lines = tmp.read().decode(errors="replace").splitlines(keepends=True)
            kept = "".join(line for line in lines if not PROFILER_NOISE.search(line))
            if kept:
                sys.stderr.write(kept)
                sys.stderr.flush()


def cases() -> dict[str, dict]:
    """name -> TrainConfig overrides.  Base objectives on Conv-4 (MAE on the tiny ViT it needs), GeSSL (SimCLR base)
    with every hypergradient engine."""
    out: dict[str, dict] = {}
    for name in OBJECTIVES:
        out[name] = {"objective": name, **({"backbone": "vit_tiny"} if name == "mae" else {})}
    for engine in ENGINES:
        out[f"gessl_{engine}"] = {"objective": "simclr", "meta": "gessl", "hypergrad": engine}
        if engine in FIRST_ORDER_ENGINES:  # timed as the paper's cheaper variants, knowing g gets no gradient
            out[f"gessl_{engine}"]["meta_args"] = {"allow_untrained_meta": True}
    # the multi-task baselines of TC²'s Fig. 1 and TC² itself (both stages, exact second order), MCR (Algorithm 1)
    for combine in ("sum", "pcgrad", "gradvac"):
        out[f"multitask_{combine}"] = {"objective": "simclr", "meta": "multitask", "meta_args": {"combine": combine}}
    out["tc2_second_order"] = {"objective": "simclr", "meta": "tc2", "hypergrad": "second_order"}
    out["tc2_first_order"] = {"objective": "simclr", "meta": "tc2", "hypergrad": "first_order"}
    out["mcr_second_order"] = {"objective": "simclr", "meta": "mcr", "hypergrad": "second_order"}
    # the NHWC memory format (conv4 option, on in the default profiles) for the base step and each method that
    # trains on it: the README's channels_last speed-ups come from these cases
    for name in ("simclr", "gessl_second_order", "gessl_first_order", "multitask_pcgrad", "tc2_second_order",
                 "mcr_second_order"):
        out[name + CHANNELS_LAST] = {**out[name], "backbone_args": {"width": 64, "channels_last": True}}
    return out


def reference_of(name: str) -> str:
    """The SimCLR case a case's ``ratio_like`` divides by: the one in the same memory format."""
    return "simclr" + CHANNELS_LAST if name.endswith(CHANNELS_LAST) else "simclr"


def _cpu_peak_mb(step) -> float:
    """Peak bytes of live tensors during ``step()`` (parameters, inputs and optimizer state included), from
    :mod:`torch.profiler`'s memory timeline - the CPU counterpart of ``torch.cuda.max_memory_allocated``.  Uses
    the profiler's memory model (``_memory_profile``, a private API of torch 2.x); NaN if it is unavailable."""
    from torch.profiler import ProfilerActivity, profile

    try:
        from torch.profiler._memory_profiler import Action

        with quiet_profiler(), profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True,
                                       with_stack=True) as prof:
            step()
        live = peak = 0
        for _, action, _, size in prof._memory_profile().timeline:
            if action in (Action.PREEXISTING, Action.CREATE):
                live += size
            elif action == Action.DESTROY:
                live -= size
            peak = max(peak, live)
        return peak / 2**20
    except (ImportError, AttributeError, RuntimeError):  # pragma: no cover - depends on the torch version
        return float("nan")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(step, n: int, device: torch.device) -> list[float]:
    """Wall time (s) of each of ``n`` calls of ``step``, the device synchronised around each."""
    times = []
    for _ in range(n):
        _sync(device)
        t0 = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times


def _device(device: str) -> torch.device:
    """``device`` as TrainConfig resolves it (``auto``: CUDA if present; ``cuda`` without a GPU is an error)."""
    return torch.device(TrainConfig(device=device).resolved_device())


def _setup(overrides: dict, batch: int, device: str, channels: int, size: int):
    # a small lr: the step's cost does not depend on it, and random images must not make a loss diverge
    cfg = TrainConfig(**{"batch_size": batch, "device": device, "progress": False, "lr": 1e-3, **overrides})
    dev = torch.device(cfg.resolved_device())
    net, objective = build_net(cfg, channels, size)
    net.to(dev).train()
    meta = make_meta(cfg.meta, objective, net, cfg).to(dev)
    opt = build_optimizer(cfg, [*net.parameters(), *meta.parameters()])
    return cfg, dev, net, meta, opt


def bench_case(overrides: dict, *, batch: int = 256, steps: int = 10, warmup: int = 3, device: str = "cpu",
               channels: int = 3, size: int = 28, seed: int = 0, memory: bool = True) -> dict:
    """Median step time (s), its inter-quartile range, peak memory (MB) and parameter count of one case."""
    cfg, dev, net, meta, opt = _setup(overrides, batch, device, channels, size)
    gen = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (batch, channels, size, size), generator=gen, dtype=torch.uint8).to(dev)
    aug = cfg.augmentation()
    def one_step():
        train_step(net, meta, opt, images, aug, gen)
        meta.after_step(net, 0.5)

    for _ in range(warmup):
        one_step()
    gc.collect()
    times = _timed(one_step, steps, dev)

    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
        one_step()
        _sync(dev)
        mem = torch.cuda.max_memory_allocated(dev) / 2**20
    else:
        mem = _cpu_peak_mb(one_step) if memory else float("nan")
    q = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
    n_params = sum(p.numel() for p in net.parameters()) + sum(p.numel() for p in meta.parameters())
    return {"median_s": statistics.median(times), "iqr_s": q[2] - q[0], "peak_mem_mb": mem, "params": n_params,
            "views": meta.n_views}


def bench_configs(configs: dict, data, *, batch: int, steps: int = 10, warmup: int = 3, device: str = "cpu",
                  memory: bool = True, names: list[str] | None = None):
    """:func:`bench_case` of every distinct ``TrainConfig`` of ``configs = {key: cfg}``, back to back in this process
    (machine load then changes all of them alike, to first order), at ``batch`` source images per step, on random
    images shaped like those of ``data`` (the :class:`~bilevel_ssl.data.ImageSet` the runs pre-train on).

    Returns ``(table, load)``: a DataFrame indexed by the keys (a MultiIndex for tuple keys; level ``names``, so
    that it joins the results table of the same runs) with ``step_s`` (median step time), ``step_iqr_s``,
    ``epoch_s`` = step_s × the trainer's steps per epoch on ``data`` (``len(data) // batch``), ``peak_mem_mb`` (NaN
    on CPU without ``memory``) and ``params`` (network + meta-networks); and :func:`machine_load` over the
    benchmark.  A configuration whose step overflows on the random images is a row of NaN, with a printed note, not
    an error: it is still a result.  The CPU allocator is tuned as the trainer tunes it
    (:func:`bilevel_ssl.runtime.tune_cpu_allocator`), so the benchmark times what training runs."""
    import pandas as pd

    from .experiments import config_key

    tune_cpu_allocator()
    before = os.getloadavg()[0]
    done, rows = {}, {}
    for key, cfg in configs.items():
        ck = config_key(cfg)
        if ck not in done:
            overrides = {k: v for k, v in cfg.to_dict().items() if k not in ("batch_size", "device", "progress")}
            try:
                done[ck] = bench_case(overrides, batch=batch, steps=steps, warmup=warmup, device=device,
                                      channels=data.channels, size=data.size, memory=memory)
            except FloatingPointError as err:
                print(f"{key}: the benchmark step overflowed on random images ({err})")
                done[ck] = {"median_s": math.nan, "iqr_s": math.nan, "peak_mem_mb": math.nan, "params": math.nan}
        b = done[ck]
        rows[key] = {"step_s": b["median_s"], "step_iqr_s": b["iqr_s"], "epoch_s": b["median_s"] * (len(data) // batch),
                     "peak_mem_mb": b["peak_mem_mb"], "params": b["params"]}
    table = pd.DataFrame.from_dict(rows, orient="index")
    if names is not None:
        table = table.rename_axis(names)
    return table, machine_load(before)


def machine_load(before: float | None = None) -> dict:
    """The 1-minute load average (the larger of ``before`` and now: other jobs competing for the cores during a
    measurement), whether it exceeds the cores by more than this process's own share (``shared``: timings are then
    unreliable) and a one-line ``note`` saying so."""
    load = max(before if before is not None else 0.0, os.getloadavg()[0])
    cores = os.cpu_count()
    shared = load > cores + 0.5
    note = f"load average {load:.1f} on {cores} cores" + (": the machine was shared, these timings are unreliable"
                                                           if shared else "")
    return {"load_average": load, "shared": shared, "note": note}


def bench_augment(*, batch: int = 256, steps: int = 10, warmup: int = 3, device: str = "cpu", channels: int = 3,
                  size: int = 28, augment: str = "mnistm", n_views: int = 2, seed: int = 0) -> float:
    """Median time (s) of making ``n_views`` augmented views of a batch (SimCLR's share of a step)."""
    dev = _device(device)
    gen = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (batch, channels, size, size), generator=gen, dtype=torch.uint8).to(dev)
    aug = preset(augment)
    step = lambda: make_views(images.float().div_(255), n_views, aug, gen)
    _timed(step, warmup, dev)
    return statistics.median(_timed(step, steps, dev))


def bench_bissl(*, batch: int = 256, steps: int = 10, warmup: int = 3, device: str = "cpu", channels: int = 3,
                size: int = 28, seed: int = 0, n_classes: int = 10) -> dict:
    """BiSSL's two steps (:class:`bilevel_ssl.bissl.BiSSLStage`, paper defaults: N_c = 5 layer-wise CG iterations)
    on random images, SimCLR pretext, Conv-4: median time of a lower step (pretext loss + proximal term), of
    building the Hessian operator on one pretext batch (``hvp_setup``: the forward and the gradient kept for
    differentiation, once per alternation), of one upper step (downstream gradients + CG solve + update), and of
    the N_c HVPs alone; ``upper_over_hvps`` = upper step / N_c HVPs (issue #11 target ≤ 1.2).  ``upper_checked_s``:
    the upper step as :meth:`~bilevel_ssl.bissl.BiSSLStage.alternation` runs it, with the residual check of issue #24
    (layer-wise CG: one more HVP; ``check_over_upper`` = its share of the step).  A bad residual's warning is not
    printed here (random data; the bench measures time)."""
    import warnings

    from .bissl import BiSSLConfig, BiSSLStage, CGResidualWarning, DownstreamHead, PretextModel
    from .data import ImageSet
    from .meta import SingleLevel

    cfg = TrainConfig(batch_size=batch, device=device, progress=False, lr=1e-3)
    dev = torch.device(cfg.resolved_device())
    net, objective = build_net(cfg, channels, size)
    pretext = PretextModel(net, objective, SingleLevel(objective, net).teacher, cfg)
    gen = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (batch, channels, size, size), generator=gen, dtype=torch.uint8)
    labels = torch.randint(0, n_classes, (batch,), generator=gen)
    down = ImageSet(images, labels, "random")
    bcfg = BiSSLConfig(alternations=10 ** 6, downstream_batch_size=batch, device=device, progress=False, seed=seed)
    stage = BiSSLStage(pretext, DownstreamHead(net.backbone.feature_dim, n_classes).to(dev), down, down, bcfg)
    idx = torch.arange(batch)
    views = stage.views(idx, gen)
    x, y = stage.downstream_batch(idx)
    v = [torch.randn_like(p) for p in stage.theta_P]

    def timed(fn) -> float:
        for _ in range(warmup):
            fn()
        return statistics.median(_timed(fn, steps, dev))

    out = {"lower_s": timed(lambda: stage.lower_step(views))}  # moves θ_P: the Hessian is built after it
    setup_and_one = timed(lambda: stage.pretext_hessian(views).hvp(v))
    H = stage.pretext_hessian(views)
    out["upper_s"] = timed(lambda: stage.upper_step(x, y, H))  # moves θ_D and the head only
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CGResidualWarning)
        out["upper_checked_s"] = timed(lambda: stage.upper_step(x, y, H, residual=True))
    out["check_over_upper"] = out["upper_checked_s"] / out["upper_s"] - 1.0
    out["hvps_s"] = timed(lambda: [H.hvp(v) for _ in range(bcfg.cg_iters)])
    out["hvp_setup_s"] = setup_and_one - out["hvps_s"] / bcfg.cg_iters
    out["cg_iters"] = bcfg.cg_iters
    out["upper_over_hvps"] = out["upper_s"] / out["hvps_s"]
    release_memory()
    return out


def _named_case(name: str, flag: str, batch: int, device: str):
    """Case ``name`` set up for one of the single-case commands (``--profile``, ``--stages``; ``flag`` names it in
    the error): its config, device, network, meta-method, optimizer, ``batch`` random 3×28×28 images, augmentation
    and generator (seed 0)."""
    all_cases = cases()
    if name not in all_cases:
        raise ValueError(f"--{flag}: unknown case {name!r}; allowed: {', '.join(all_cases)}")
    cfg, dev, net, meta, opt = _setup(all_cases[name], batch, device, 3, 28)
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (batch, 3, 28, 28), generator=gen, dtype=torch.uint8).to(dev)
    return cfg, dev, net, meta, opt, images, cfg.augmentation(), gen


def profile_case(name: str, *, batch: int = 256, steps: int = 3, device: str = "cpu", row_limit: int = 25) -> str:
    """torch.profiler table (self CPU/CUDA time) of ``steps`` steps of case ``name`` after one warm-up step."""
    from torch.profiler import ProfilerActivity, profile

    cfg, dev, net, meta, opt, images, aug, gen = _named_case(name, "profile", batch, device)
    train_step(net, meta, opt, images, aug, gen)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with quiet_profiler(), profile(activities=activities) as prof:
        for _ in range(steps):
            train_step(net, meta, opt, images, aug, gen)
    key = "self_cuda_time_total" if dev.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=row_limit)


def stage_times(name: str, *, batch: int = 256, steps: int = 5, warmup: int = 2, device: str = "cpu") -> dict:
    """Where one step of case ``name`` spends its time, by the ``torch.profiler.record_function`` labels its
    meta-method puts around its stages (TC²: ``tc2.stage0_forward``, ``tc2.stage1_psi`` - the f_v/f_w bi-level
    update, Eq. 4-5 - and ``tc2.stage2_encoder`` - the per-task encoder hypergradients, Eq. 6-7).

    Returns ``{"step_s": median wall time of a step, "stages": {label: {"s": seconds per step, "share": of the
    step}}}``; the steps are profiled (CPU activity only), so times include the profiler's small overhead.
    A case whose meta-method has no labels returns an empty ``stages``."""
    from torch.profiler import ProfilerActivity, profile

    cfg, dev, net, meta, opt, images, aug, gen = _named_case(name, "stages", batch, device)
    def one_step():
        train_step(net, meta, opt, images, aug, gen)
        meta.after_step(net, 0.5)

    for _ in range(warmup):
        one_step()
    prefix = f"{cfg.meta}."
    with quiet_profiler(), profile(activities=[ProfilerActivity.CPU]) as prof:
        times = _timed(one_step, steps, dev)
    step_s = statistics.median(times)
    stages = {}
    for ev in prof.key_averages():
        if ev.key.startswith(prefix):
            s = ev.cpu_time_total / 1e6 / steps
            stages[ev.key] = {"s": s, "share": s / step_s}
    return {"case": name, "batch": batch, "steps": steps, "step_s": step_s, "stages": dict(sorted(stages.items()))}


def run(names: list[str] | None = None, *, batch: int = 256, steps: int = 10, warmup: int = 3, device: str = "cpu",
        progress: bool = True, memory: bool = True, bissl: bool = True, hypergrad_args: dict | None = None) -> dict:
    """Benchmark ``names`` (default: every case; ``simclr`` is always included as the reference).  ``memory``:
    also measure each case's peak memory (on CPU one extra profiled step per case).  ``bissl``: also time BiSSL's
    lower and upper steps (:func:`bench_bissl`, under ``record["bissl"]``).  ``hypergrad_args``: engine options
    given to every case with a hypergradient engine (e.g. ``{"power_iters_warm": None}`` times ``aid_neumann``
    with a cold power iteration every step), validated against each engine before anything is timed."""
    from tqdm import tqdm

    from .hypergrad import make_engine
    from .report import machine, versions

    all_cases = cases()
    names = list(all_cases) if not names else list(names)
    unknown = [n for n in names if n not in all_cases]
    if unknown:
        raise ValueError(f"cases: unknown {unknown}; allowed: {', '.join(all_cases)}")
    if hypergrad_args:
        engines = {all_cases[n]["hypergrad"] for n in names if "hypergrad" in all_cases[n]}
        if not engines:
            raise ValueError(f"hypergrad_args: none of the cases {names} has a hypergradient engine; allowed with "
                             f"the gessl_*, tc2_* and mcr_* cases")
        for engine in sorted(engines):
            make_engine(engine, **hypergrad_args)  # unknown options / bad values: an error naming the key
        all_cases = {n: {**c, "hypergrad_args": {**c.get("hypergrad_args", {}), **hypergrad_args}}
                     if "hypergrad" in c else c for n, c in all_cases.items()}
    for ref in sorted({reference_of(n) for n in names} | {"simclr"}, reverse=True):  # simclr first
        if ref not in names:
            names.insert(0, ref)
    results = {}
    for name in tqdm(names, desc="bench", disable=not progress, unit="case"):
        try:
            results[name] = bench_case(all_cases[name], batch=batch, steps=steps, warmup=warmup, device=device,
                                       memory=memory)
            release_memory()
        except FloatingPointError as err:  # report it and go on with the other cases
            results[name] = {"median_s": float("nan"), "iqr_s": float("nan"), "peak_mem_mb": float("nan"),
                             "params": 0, "views": 0, "error": f"diverged: {err}"}
    ref = results["simclr"]["median_s"]
    for name, r in results.items():
        r["ratio"] = r["median_s"] / ref
        r["ratio_like"] = r["median_s"] / results[reference_of(name)]["median_s"]
    aug_s = bench_augment(batch=batch, steps=steps, warmup=warmup, device=device)
    targets = {name: {"ratio": results[name]["ratio_like"], "target": t, "met": results[name]["ratio_like"] <= t}
               for name, t in TARGETS.items() if name in results}
    targets["augment_share"] = {"ratio": aug_s / ref, "target": AUGMENT_TARGET, "met": aug_s / ref <= AUGMENT_TARGET}
    record = {"batch": batch, "steps": steps, "warmup": warmup, "device": device, "reference": "simclr",
              "augment_s": aug_s, "cases": results, "targets": targets, "machine": machine(), "versions": versions(),
              "hypergrad_args": dict(hypergrad_args or {})}
    if bissl:
        b = bench_bissl(batch=batch, steps=steps, warmup=warmup, device=device)
        b["lower_ratio"], b["upper_ratio"] = b["lower_s"] / ref, b["upper_s"] / ref
        record["bissl"] = b
        targets["bissl_upper_over_hvps"] = {"ratio": b["upper_over_hvps"], "target": BISSL_TARGET,
                                            "met": b["upper_over_hvps"] <= BISSL_TARGET}
    return record


def table(record: dict) -> str:
    """The results as a Markdown table."""
    lines = ["| case | views | step (s) | × SimCLR | × SimCLR, same memory format | peak memory (MB) | parameters |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, r in record["cases"].items():
        lines.append(f"| {name} | {r['views']} | {r['median_s']:.3f} | {r['ratio']:.2f} | {r['ratio_like']:.2f} | "
                     f"{r['peak_mem_mb']:.0f} | {r['params']:,} |")
    lines.append(f"| augmentation (2 views) | | {record['augment_s']:.4f} | "
                 f"{record['targets']['augment_share']['ratio']:.3f} | | | |")
    if "bissl" in record:
        b = record["bissl"]
        lines.append(f"| BiSSL lower step | 2 | {b['lower_s']:.3f} | {b['lower_ratio']:.2f} | | | |")
        lines.append(f"| BiSSL upper step ({b['cg_iters']} CG iterations; {b['upper_over_hvps']:.2f}x its HVPs) | | "
                     f"{b['upper_s']:.3f} | {b['upper_ratio']:.2f} | | | |")
        lines.append(f"| BiSSL upper step + CG residual check (+{100 * b['check_over_upper']:.0f}%) | | "
                     f"{b['upper_checked_s']:.3f} | {b['upper_checked_s'] / record['cases']['simclr']['median_s']:.2f} "
                     f"| | | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bilevel_ssl.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", default="", help="comma-separated case names (default: all)")
    p.add_argument("--batch", type=int, default=256, help="source images per step")
    p.add_argument("--steps", type=int, default=10, help="timed steps per case")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per case")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"))
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--out", default="", help="also write the JSON here")
    p.add_argument("--profile", default="", help="print the torch.profiler table of this case instead")
    p.add_argument("--stages", default="", help="print the time per labelled stage of this case instead (TC²)")
    p.add_argument("--list", action="store_true", help="list the cases and exit")
    p.add_argument("--no-bissl", action="store_true", help="skip BiSSL's lower/upper step timing")
    p.add_argument("--hypergrad-args", default="", metavar="JSON",
                   help='engine options for every case with an engine, e.g. \'{"power_iters_warm": null}\'')
    a = p.parse_args(argv)
    try:
        hg_args = json.loads(a.hypergrad_args) if a.hypergrad_args else {}
    except json.JSONDecodeError as err:
        p.error(f"--hypergrad-args: not JSON ({err}): {a.hypergrad_args!r}")
    if not isinstance(hg_args, dict):
        p.error(f"--hypergrad-args: must be a JSON object of engine options, got {a.hypergrad_args!r}")
    if a.threads:
        torch.set_num_threads(a.threads)
    allocator = tune_cpu_allocator() if a.device != "cuda" else False
    if a.list:
        print("\n".join(cases()))
        return 0
    if a.profile:
        print(profile_case(a.profile, batch=a.batch, device=a.device))
        return 0
    if a.stages:
        rec = stage_times(a.stages, batch=a.batch, steps=a.steps, warmup=a.warmup, device=a.device)
        print(json.dumps(rec, indent=2))
        for k, v in rec["stages"].items():
            print(f"{k}: {v['s']:.3f} s per step ({100 * v['share']:.0f}% of {rec['step_s']:.3f} s)", file=sys.stderr)
        return 0
    names = [n.strip() for n in a.cases.split(",") if n.strip()]
    record = run(names, batch=a.batch, steps=a.steps, warmup=a.warmup, device=a.device, bissl=not a.no_bissl,
                 hypergrad_args=hg_args)
    record["cpu_allocator_tuned"] = allocator
    text = json.dumps(record, indent=2)
    print(text)
    print(table(record), file=sys.stderr)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
