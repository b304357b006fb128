"""Run records: ``metrics.json`` with params, seed, versions, git SHA, machine and the numbers."""

from __future__ import annotations

import json
import platform
import subprocess
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from .paths import repo_root


def git_sha() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo_root(), capture_output=True, text=True,
                             timeout=10).stdout.strip()
        # outputs/ holds committed results that every run rewrites: they do not make the code dirty
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":!outputs"],
                               cwd=repo_root(),
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (sha + ("-dirty" if dirty else "")) if sha else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def versions() -> dict[str, str]:
    import sklearn
    import torch
    import torchvision

    return {"python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
            "numpy": np.__version__, "scikit-learn": sklearn.__version__}


def machine() -> dict[str, Any]:
    import os

    import torch

    return {"platform": platform.platform(), "processor": platform.machine(), "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            # which vectorised kernels torch picked (AVX512, AVX2, DEFAULT...): float results differ in the last
            # bits between them; ATEN_CPU_CAPABILITY / ONEDNN_MAX_CPU_ISA lower it (README, "Same numbers")
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA"),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, Path):
        return str(x)
    return x


def write_metrics(run_dir: str | Path, *, params: dict, results: dict, seed: int | list[int],
                  **extra) -> Path:
    """Write ``<run_dir>/metrics.json``; ``results`` keys name model then metric
    (e.g. ``results["simclr"]["knn_acc"]``).  ``training_runs`` records how many of this process's
    :func:`~bilevel_ssl.cache.cached_train` calls trained and how many loaded a finished run from the encoder
    cache (and how many seconds of training those loaded runs took where they were made; under ``runs``, each run's
    :func:`~bilevel_ssl.cache.run_id` with its training seconds and whether it was loaded), so that ``wall_time_s``
    can be read as the cost it was."""
    from .cache import RUN_COUNTS

    record = {"params": params, "seed": seed, "results": results, "versions": versions(), "git_sha": git_sha(),
              "machine": machine(), "written": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "training_runs": {k: round(v, 1) if isinstance(v, float) else dict(v) if isinstance(v, dict) else v
                                for k, v in RUN_COUNTS.items()},
              **extra}
    path = Path(run_dir) / "metrics.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_jsonable(record), indent=2, sort_keys=False) + "\n")
    return path


def table_structure(table) -> str:
    """What of a results table is the same on every CPU: its row labels, its columns and whether every number
    is finite.  The notebooks' nbval-checked cells print this; the numbers themselves differ in the last bits
    between CPU kernel sets and are compared, within measured tolerances, by ``tests/test_smoke_metrics.py``."""
    import pandas as pd

    def label(x) -> str:
        return " / ".join(map(str, x)) if isinstance(x, tuple) else str(x)

    numeric = table.select_dtypes("number")
    finite = bool(np.isfinite(numeric.to_numpy(dtype=float)).all()) if numeric.size else True
    lines = [f"{len(table)} rows x {len(table.columns)} columns; every number finite: {finite}",
             "rows: " + ", ".join(label(i) for i in table.index),
             "columns: " + ", ".join(label(c) for c in table.columns)]
    if isinstance(table.index, pd.MultiIndex):
        lines[1] = f"rows ({' / '.join(map(str, table.index.names))}): " + lines[1][len("rows: "):]
    return "\n".join(lines)


def table_results(table) -> dict[str, dict[str, float]]:
    """``results`` of ``metrics.json`` from a results table: one entry per row, named by its index labels joined by
    spaces (numbers as ``:g``: ``("engine", "aid_fd")`` -> ``"engine aid_fd"``, the run names of
    :func:`bilevel_ssl.claims.from_wide`), with every column as a float."""
    def name(idx) -> str:
        parts = idx if isinstance(idx, tuple) else (idx,)
        return " ".join(f"{p:g}" if isinstance(p, (float, np.floating)) else str(p) for p in parts)

    return {name(idx): {str(k): float(v) for k, v in row.items()} for idx, row in table.iterrows()}
