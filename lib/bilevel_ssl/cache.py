"""Pre-trained encoders cached under ``outputs/cache/``, keyed by everything that determines them.

Notebooks call :func:`cached_train` instead of :func:`bilevel_ssl.trainer.train`: a sweep, a later notebook or a
re-run with the same parameters reuses the finished run instead of training it again, and a run that was killed
resumes from its last checkpoint.  The key is a SHA-256 of

* the training configuration (:class:`~bilevel_ssl.config.TrainConfig`, without ``progress`` and
  ``checkpoint_every``, which do not change the numbers; ``device: auto`` resolved, since CPU and CUDA results
  differ in the last bits; on CPU the number of torch threads, which changes them too);
* the training images themselves (bytes and shape: a different split, subset or dataset is a different key);
* the training code: the syntax tree of every module of the package (comments and docstrings do not count)
  except those that cannot change a trained encoder (:data:`NEUTRAL_MODULES`: evaluators, plots, reports...) and
  those that only *other* meta-methods declare (each meta-method class names the modules its results depend on
  beyond the shared training code in ``code_modules``, read along its class hierarchy: a TC² edit does not
  invalidate GeSSL's encoders, an edit of the bi-level base invalidates all three bi-level methods'), and the
  torch version;
* ``tag``: what the caller adds, e.g. the name of per-epoch ``monitors`` whose numbers the cached history must hold.

So a changed parameter, dataset or line of training code invalidates the entry (it is simply not found; old
entries stay until ``make clean-outputs``).  Each entry is a folder ``<objective>-<meta>-<key[:12]>/`` with the
trainer's ``checkpoint.pt`` and ``encoder.pt`` and a readable ``key.json``.  Two processes training the same
entry at once are not guarded against.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .config import TrainConfig
from .data import ImageSet
from .distributed import world_size_from_env
from .paths import repo_root
from .trainer import CHECKPOINT, ENCODER, TrainResult, build_net, train

# modules (dotted names below the package; a package's name covers its submodules) whose code cannot change what
# training produces - unless a meta-method declares one in its ``code_modules``
NEUTRAL_MODULES = frozenset({"__init__", "bench", "cache", "data", "evaluate", "paths", "plots", "report",
                             "reproduce", "semisup", "universality", "index", "experiments", "conflict", "bissl",
                             "claims", "rule", "runtime", "protocol", "options"})


def cache_root() -> Path:
    """``<repo>/outputs/cache`` (``$BILEVEL_SSL_ROOT`` moves the repo root, see :mod:`bilevel_ssl.paths`)."""
    return repo_root() / "outputs" / "cache"


def method_modules(meta: str) -> frozenset[str]:
    """The modules meta-method ``meta`` declares (``code_modules`` of its class and of the classes it derives
    from)."""
    from .meta import meta_class

    return frozenset(m for cls in meta_class(meta).__mro__ for m in vars(cls).get("code_modules", ()))


def _covers(names, module: str) -> bool:
    return any(module == n or module.startswith(n + ".") for n in names)


def _code_digest(source: bytes) -> bytes:
    """The module's syntax tree without docstrings: editing a comment or a docstring keeps cached encoders."""
    tree = ast.parse(source)
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (isinstance(body, list) and body and isinstance(body[0], ast.Expr)
                and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str)):
            node.body = body[1:] or [ast.Pass()]
    return ast.dump(tree, include_attributes=False).encode()


@functools.lru_cache(maxsize=None)
def code_fingerprint(meta: str = "none") -> str:
    """SHA-256 of the package's training code for a run of meta-method ``meta``: the syntax tree (without comments
    and docstrings) of every ``.py`` below the package that is neither in :data:`NEUTRAL_MODULES` nor declared only
    by other meta-methods, plus the modules ``meta`` declares; read once per process - the code this process runs,
    even if the files are edited meanwhile."""
    from .meta import META_METHODS

    pkg = Path(__file__).resolve().parent
    own = method_modules(meta)
    declared = frozenset().union(*(method_modules(m) for m in META_METHODS))
    h = hashlib.sha256()
    for path in sorted(pkg.rglob("*.py")):
        rel = path.relative_to(pkg).as_posix()
        module = rel[:-len(".py")].replace("/", ".").removesuffix(".__init__") if rel != "__init__.py" else "__init__"
        if not _covers(own, module) and (_covers(NEUTRAL_MODULES, module) or _covers(declared, module)):
            continue
        h.update(rel.encode() + b"\0" + _code_digest(path.read_bytes()) + b"\0")
    return h.hexdigest()


def data_fingerprint(data: ImageSet) -> str:
    """SHA-256 of the images (bytes, dtype and shape); labels are not read by self-supervised training."""
    images = data.images.detach().cpu().contiguous()
    h = hashlib.sha256(f"{tuple(images.shape)}|{images.dtype}".encode())
    h.update(images.numpy().tobytes())
    return h.hexdigest()


def cache_key(cfg: TrainConfig, data: ImageSet, tag: str = "") -> dict:
    """The dictionary that is hashed (also written to the entry's ``key.json``)."""
    config = {k: v for k, v in cfg.to_dict().items() if k not in TrainConfig.RUN_CONTROL}
    config["device"] = torch.device(cfg.resolved_device()).type
    if config["device"] == "cpu":  # CPU kernels split reductions by thread: 1 and 2 threads differ in the last bits
        config["cpu_threads"] = torch.get_num_threads()
    world = world_size_from_env()
    if world > 1:  # torchrun: other float summation order (single-level), other inner tasks (bi-level)
        config["world_size"] = world
    return {"config": config, "data": data_fingerprint(data), "code": code_fingerprint(cfg.meta),
            "torch": torch.__version__, "tag": tag}


def entry_dir(cfg: TrainConfig, data: ImageSet, tag: str = "", root: str | Path | None = None) -> Path:
    key = cache_key(cfg, data, tag)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    return Path(root or cache_root()) / f"{cfg.objective}-{cfg.meta}-{digest[:12]}"


# this process's cached_train calls by outcome: "trained" (trained here, or resumed from a checkpoint) and
# "from_cache" (a finished entry loaded), and "from_cache_train_s", the training seconds the loaded runs took where
# they were made (the sum of their epochs' time_s); "runs": run_id -> {"train_s", "loaded"} for each of them, so that
# a run that several notebooks share is counted once in an estimate (reproduce.plan_estimate_s).
# report.write_metrics records them, so that a notebook's run time can be read as the cost it was (48 s with every
# run loaded is not what the notebook costs on a fresh clone) and make reproduce can estimate a run whose cache is
# empty (reproduce.estimate_s)
RUN_COUNTS = {"trained": 0, "from_cache": 0, "from_cache_train_s": 0.0, "runs": {}}


def run_id(cfg: TrainConfig, data: ImageSet, tag: str = "") -> str:
    """The run that ``cfg`` on ``data`` is, across versions of the code: the cache key without its ``code``
    fingerprint.  Two notebooks that train the same configuration on the same images share a run when one ``make
    reproduce`` makes them on one code; :func:`bilevel_ssl.reproduce.plan_estimate_s` counts such a run once.
    (:func:`entry_dir` also keys by the code, so that a change of the training code trains again.)"""
    key = {k: v for k, v in cache_key(cfg, data, tag).items() if k != "code"}
    return f"{cfg.objective}-{cfg.meta}-{hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]}"


def _count(outcome: str, cfg: TrainConfig, data: ImageSet, tag: str, history: list[dict]) -> None:
    train_s = sum(float(h.get("time_s", 0.0)) for h in history)
    RUN_COUNTS[outcome] += 1
    if outcome == "from_cache":
        RUN_COUNTS["from_cache_train_s"] += train_s
    RUN_COUNTS["runs"][run_id(cfg, data, tag)] = {"train_s": round(train_s, 1), "loaded": outcome == "from_cache"}


@dataclass
class CachedRun(TrainResult):
    cached: bool = False  # True when the run was loaded, not trained, by this call


def cached_train(cfg: TrainConfig, data: ImageSet, *, tag: str = "", root: str | Path | None = None,
                 monitors: tuple[Callable[[int, torch.nn.Module], dict], ...] = (), force: bool = False,
                 step_monitors: tuple[Callable, ...] = ()) -> CachedRun:
    """Train ``cfg`` on ``data`` unless the cache already holds the finished run; return it either way.

    ``monitors`` and ``step_monitors`` are passed to :func:`~bilevel_ssl.trainer.train` (their numbers land in the
    history); since a cache hit does not run them, name them in ``tag``.  ``force``: train again from scratch, replacing the entry.
    The returned ``net`` is the full network (backbone + heads) as it was at the end of training.
    """
    if not isinstance(cfg, TrainConfig):
        raise TypeError(f"cfg: expected TrainConfig, got {type(cfg).__name__}")
    if (monitors or step_monitors) and not tag:
        raise ValueError("tag: monitors add numbers to the cached history; name them in tag (e.g. tag='knn-monitor')")
    folder = entry_dir(cfg, data, tag, root)
    ckpt_path = folder / CHECKPOINT
    if not force and ckpt_path.exists() and (folder / ENCODER).exists():
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        if ckpt["epoch"] == cfg.epochs:
            net, _ = build_net(cfg, data.channels, data.size)
            net.load_state_dict(ckpt["net"])
            net.to(cfg.resolved_device())
            _count("from_cache", cfg, data, tag, ckpt["history"])
            return CachedRun(net, ckpt["history"], folder, cached=True)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "key.json").write_text(json.dumps(cache_key(cfg, data, tag), indent=2, sort_keys=True) + "\n")
    result = train(cfg, data, folder, resume=not force, overwrite=force, monitors=monitors,
                   step_monitors=step_monitors)
    _count("trained", cfg, data, tag, result.history)
    return CachedRun(result.net, result.history, folder, cached=False)
