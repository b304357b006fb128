"""Run the notebooks with papermill: ``python -m bilevel_ssl.reproduce [--profile default] [--nb 00_quickstart]``.

Each ``notebooks/<name>.ipynb`` runs with ``params/<profile>/<name>.yaml`` (plus ``profile``) and is written,
executed, to ``outputs/<name>/<profile>/<name>.ipynb``; the notebook itself writes ``metrics.json`` and figures
there.  All params files are validated against the notebooks' parameters cells *before* anything runs.  A
failing notebook stops the run with exit status 1; its partially executed copy stays in place (papermill saves
after every cell).  Either way ``outputs/index.md`` / ``index.html`` are rebuilt (:mod:`bilevel_ssl.index`).
A run never silently replaces an earlier one: the previous ``outputs/<name>/<profile>/`` is moved to
``outputs/<name>/archive/`` first (:func:`archive_previous`; the index lists only the current runs).

Before anything runs it prints an estimate (each notebook's last measured ``wall_time_s`` of this profile, from
its ``metrics.json`` or the newest archived one, plus the training time of the runs that run loaded from the encoder
cache, so that a run made from a full cache does not promise a fresh clone minutes for hours; a pre-training run
that several notebooks share counts once where their records name their runs, :func:`plan_estimate_s`) and then
shows one overall progress bar in notebook-seconds.
``--resume`` skips every notebook whose ``metrics.json`` of this profile is complete and was written with the
same parameters, so a killed ``make reproduce`` started again goes on where it stopped (training runs resume
from their checkpoints in ``outputs/cache`` anyway).  ``--jobs N`` runs N notebooks at once, each in its own
process with ``BILEVEL_SSL_THREADS`` threads (for a machine with many cores, e.g. a GPU host).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

from .paths import outputs_dir, repo_root

PROFILES = ("smoke", "default", "gpu", "paper")

# papermill's inferred type names -> Python types accepted for them (an int is a valid float).
_TYPE_NAMES = {"int": (int,), "float": (float, int), "str": (str,), "bool": (bool,), "list": (list,),
               "dict": (dict,)}


def notebooks_dir() -> Path:
    return repo_root() / "notebooks"


def list_notebooks() -> list[str]:
    return sorted(p.stem for p in notebooks_dir().glob("[0-9][0-9]_*.ipynb"))


def params_path(name: str, profile: str) -> Path:
    return repo_root() / "params" / profile / f"{name}.yaml"


def notebook_parameters(name: str) -> dict[str, dict]:
    """The parameters cell of a notebook: ``{name: {"inferred_type_name", "default", "help"}}``."""
    import papermill

    return papermill.inspect_notebook(str(notebooks_dir() / f"{name}.ipynb"))


def load_params(path: Path) -> dict:
    with open(path) as fh:
        data = yaml.safe_load(fh) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of parameter names to values, got {type(data).__name__}")
    return data


def validate_params(name: str, params: dict, *, where: str = "") -> list[str]:
    """Errors (empty if fine) of ``params`` against notebook ``name``'s parameters cell: unknown names, and values
    whose type does not match the annotation (with the YAML 1.1 ``1e-3``-is-a-string hint)."""
    spec = notebook_parameters(name)
    where = where or name
    errors = []
    for key, value in params.items():
        if key not in spec:
            errors.append(f"{where}: unknown parameter {key!r}; allowed: {', '.join(spec)}")
            continue
        tname = (spec[key]["inferred_type_name"] or "None").split("[")[0].strip()
        allowed = _TYPE_NAMES.get(tname)
        if allowed is None:
            errors.append(f"{where}: parameter {key!r} has no type annotation in the notebook; add one")
            continue
        if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
            hint = " (YAML 1.1 reads 1e-3 as a string: write 1.0e-3)" if tname == "float" and isinstance(value, str) else ""
            errors.append(f"{where}: parameter {key!r} must be {tname}, got {type(value).__name__} {value!r}{hint}")
    return errors


def archive_previous(run_folder: Path) -> Path | None:
    """Move a non-empty ``outputs/<name>/<profile>/`` to ``outputs/<name>/archive/<profile>-<time>/`` (time of
    its ``metrics.json``, else of the move), so a new run never silently replaces an earlier one's numbers."""
    if not run_folder.is_dir() or not any(run_folder.iterdir()):
        return None
    metrics = run_folder / "metrics.json"
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(metrics.stat().st_mtime if metrics.exists() else None))
    target = run_folder.parent / "archive" / f"{run_folder.name}-{stamp}"
    k = 1
    while target.exists():
        k += 1
        target = run_folder.parent / "archive" / f"{run_folder.name}-{stamp}-{k}"
    target.parent.mkdir(parents=True, exist_ok=True)
    run_folder.rename(target)
    return target


def _metrics(name: str, profile: str) -> dict | None:
    path = outputs_dir() / name / profile / "metrics.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _last_record(name: str, profile: str) -> dict | None:
    """``metrics.json`` of the last run of ``name`` under ``profile``: the current one, else the newest archived."""
    found = _metrics(name, profile)
    if found is None:
        archived = sorted((outputs_dir() / name / "archive").glob(f"{profile}-*/metrics.json"),
                          key=lambda p: p.stat().st_mtime)
        for path in reversed(archived):
            try:
                found = json.loads(path.read_text())
                break
            except (OSError, ValueError):
                continue
    return found


def fresh_cache_s(record: dict) -> float | None:
    """What the run recorded in ``record`` (a ``metrics.json``) would cost with an empty encoder cache: its measured
    wall time plus the training seconds of the runs it loaded from the cache (``training_runs.from_cache_train_s``;
    runs recorded before that field count 0, see :func:`loads_unrecorded`), or None without a wall time."""
    t = record.get("wall_time_s")
    if not isinstance(t, (int, float)):
        return None
    loaded = (record.get("training_runs") or {}).get("from_cache_train_s")
    return float(t) + (float(loaded) if isinstance(loaded, (int, float)) else 0.0)


def loads_unrecorded(record: dict) -> int:
    """How many runs the run recorded in ``record`` loaded from the encoder cache without recording their training
    time (``metrics.json`` written before ``from_cache_train_s``): :func:`fresh_cache_s` leaves their training out."""
    runs = record.get("training_runs") or {}
    return int(runs.get("from_cache", 0)) if "from_cache_train_s" not in runs else 0


def plan_estimate_s(records: list[dict]) -> float:
    """What the runs recorded in ``records`` (one ``metrics.json`` per notebook) cost in one ``make reproduce`` from
    an empty encoder cache: each notebook's wall time less the training it did itself, plus the training of every
    pre-training run once - a run that several notebooks share (one :func:`~bilevel_ssl.cache.run_id` in their
    ``training_runs.runs``) trains in the first of them and loads in the others.  A record without
    ``training_runs.runs`` (written before 2026-12-08) counts its :func:`fresh_cache_s`, shared runs included, so
    the estimate is only as exact as its records are recent; records without a wall time count 0."""
    total, once = 0.0, {}
    for record in records:
        fresh = fresh_cache_s(record)
        runs = (record.get("training_runs") or {}).get("runs")
        if fresh is None:
            continue
        if not isinstance(runs, dict):
            total += fresh
            continue
        total += float(record["wall_time_s"]) - sum(float(r["train_s"]) for r in runs.values() if not r["loaded"])
        for rid, r in runs.items():
            once.setdefault(rid, float(r["train_s"]))
    return total + sum(once.values())


def estimate_s(name: str, profile: str) -> float | None:
    """:func:`fresh_cache_s` of the last run of ``name`` under ``profile``, or None when it never ran here."""
    return fresh_cache_s(_last_record(name, profile) or {})


def unrecorded_loads(name: str, profile: str) -> int:
    """:func:`loads_unrecorded` of the last run of ``name`` under ``profile``."""
    return loads_unrecorded(_last_record(name, profile) or {})


def is_done(name: str, params: dict, profile: str) -> bool:
    """True when ``outputs/<name>/<profile>/metrics.json`` exists and was written with exactly ``params`` by the
    same commit of the code (``git_sha``, which says ``-dirty`` for uncommitted edits outside ``outputs/``)."""
    from .report import git_sha

    found = _metrics(name, profile)
    sha = git_sha()
    return (found is not None and found.get("params") == params and sha != "unknown"
            and found.get("git_sha") == sha)


def _fmt(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 5400 else f"{seconds / 60:.0f} min"


def run(names: list[str], profile: str, *, log_output: bool = False, resume: bool = False, jobs: int = 1,
        index: bool = True) -> int:
    plan = []
    errors = []
    for name in names:
        path = params_path(name, profile)
        if not path.exists():
            errors.append(f"{name}: no params file {path.relative_to(repo_root())}")
            continue
        params = {**load_params(path), "profile": profile}
        errors += validate_params(name, params, where=str(path.relative_to(repo_root())))
        plan.append((name, params))
    if errors:
        print("Invalid parameters; nothing was run:\n  " + "\n  ".join(errors), file=sys.stderr)
        return 2
    if jobs < 1:
        print(f"--jobs: must be >= 1, got {jobs}", file=sys.stderr)
        return 2
    if resume:
        done = [n for n, p in plan if is_done(n, p, profile)]
        if done:
            print(f"[reproduce] --resume: {', '.join(done)} already done with these parameters; skipped", flush=True)
        plan = [(n, p) for n, p in plan if n not in done]

    from tqdm.auto import tqdm

    from .runtime import pin_threads

    threads = pin_threads()  # the kernels inherit OMP_NUM_THREADS: results do not depend on the machine's load
    records = {n: _last_record(n, profile) or {} for n, _ in plan}  # each metrics.json read once
    est = {n: fresh_cache_s(r) for n, r in records.items()}
    known = {n: t for n, t in est.items() if t is not None}
    unknown = [n for n, t in est.items() if t is None]
    once = plan_estimate_s([records[n] for n in known])
    shared = (f" ({_fmt(sum(known.values()) / jobs)} if each notebook trained its shared pre-training runs again)"
              if known and once < sum(known.values()) - 30 else "")
    print(f"[reproduce] {len(plan)} notebook(s), profile {profile}, {threads} CPU threads per notebook "
          f"(BILEVEL_SSL_THREADS), {jobs} at a time; estimate from the last runs here: "
          f"{_fmt(once / jobs) if known else 'none'}{shared}"
          + (f" + {', '.join(unknown)} (never ran here)" if unknown else ""), flush=True)
    low = {n: k for n, r in records.items() if (k := loads_unrecorded(r))}
    if low:
        print("[reproduce] the estimate is low for " + ", ".join(
            f"{n} (its last run loaded {k} pre-training runs from the encoder cache and did not record their "
            f"training time)" for n, k in low.items()) + "; with an empty cache they train", flush=True)
    bar = tqdm(total=round(sum(known.values()) + 60 * len(unknown)), unit="s", desc=f"reproduce {profile}",
               disable=not plan)
    timings, failed = {}, None
    if jobs == 1:
        for name, params in plan:
            t0 = time.perf_counter()
            if not _execute(name, params, profile, log_output):
                failed = name
                break
            timings[name] = time.perf_counter() - t0
            bar.update(round(est[name] if est[name] is not None else 60))
    else:
        failed = _parallel(plan, profile, jobs, est, bar, timings)
    bar.close()
    if failed is None:
        print(f"[reproduce] all done in {sum(timings.values()):.0f} s of notebook time: "
              + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()), flush=True)
    if index:
        _index()
    return 0 if failed is None else 1


def _execute(name: str, params: dict, profile: str, log_output: bool) -> bool:
    import papermill
    from papermill.exceptions import PapermillExecutionError

    out = outputs_dir() / name / profile / f"{name}.ipynb"
    moved = archive_previous(out.parent)
    if moved is not None:
        print(f"[reproduce] the previous {profile} run of {name} moved to {moved.relative_to(repo_root())}",
              flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    print(f"[reproduce] {name} ({profile}) -> {out.relative_to(repo_root())}", flush=True)
    t0 = time.perf_counter()
    try:
        papermill.execute_notebook(str(notebooks_dir() / f"{name}.ipynb"), str(out), parameters=params,
                                   kernel_name="python3", cwd=str(repo_root()), log_output=log_output,
                                   progress_bar=False)
    except PapermillExecutionError as err:
        print(f"[reproduce] {name} FAILED in cell {err.exec_count}: {err.ename}: {err.evalue}\n"
              f"  partial output: {out}", file=sys.stderr, flush=True)
        return False
    print(f"[reproduce] {name} done in {time.perf_counter() - t0:.0f} s", flush=True)
    return True


def _parallel(plan, profile, jobs, est, bar, timings) -> str | None:
    """Run each notebook as ``python -m bilevel_ssl.reproduce --nb NAME --no-index`` in its own process, ``jobs``
    at a time (the longest first); returns the first failed notebook's name or None.  The others go on."""
    pending = sorted(plan, key=lambda np_: -(est[np_[0]] or 0))
    running, failed = {}, None
    while pending or running:
        while pending and len(running) < jobs:
            name, _ = pending.pop(0)
            cmd = [sys.executable, "-m", "bilevel_ssl.reproduce", "--profile", profile, "--nb", name, "--no-index"]
            running[name] = (subprocess.Popen(cmd, env=os.environ.copy()), time.perf_counter())
        time.sleep(1.0)
        for name, (proc, t0) in list(running.items()):
            if proc.poll() is None:
                continue
            del running[name]
            if proc.returncode != 0:
                print(f"[reproduce] {name} FAILED (exit {proc.returncode})", file=sys.stderr, flush=True)
                failed = failed or name
                continue
            timings[name] = time.perf_counter() - t0
            bar.update(round(est[name] if est[name] is not None else 60))
    return failed


def _index() -> None:
    """Rebuild outputs/index.md and index.html from every run's metrics.json."""
    from .index import build

    md_path, _ = build()
    print(f"[reproduce] results index: {md_path.relative_to(repo_root())} (+ index.html)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bilevel_ssl.reproduce", description=__doc__.split("\n")[0])
    ap.add_argument("--profile", default="default", choices=PROFILES)
    ap.add_argument("--nb", default="", help="comma-separated notebook names (default: all, in order)")
    ap.add_argument("--log-output", action="store_true", help="stream the notebooks' output")
    ap.add_argument("--resume", action="store_true",
                    help="skip notebooks whose metrics.json of this profile was written with the same parameters")
    ap.add_argument("--jobs", type=int, default=1, help="notebooks run at once, each in its own process")
    ap.add_argument("--no-index", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    available = list_notebooks()
    names = [n.strip().removesuffix(".ipynb") for n in args.nb.split(",") if n.strip()] or available
    unknown = [n for n in names if n not in available]
    if unknown:
        print(f"NB: unknown notebook(s) {unknown}; allowed: {', '.join(available)}", file=sys.stderr)
        return 2
    return run(names, args.profile, log_output=args.log_output, resume=args.resume, jobs=args.jobs,
               index=not args.no_index)


if __name__ == "__main__":
    sys.exit(main())
