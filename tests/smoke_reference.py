"""Reference numbers of the notebooks' smoke runs, and the cross-CPU tolerances they are compared with.

Not a test module (``tests/test_smoke_metrics.py`` is): the helpers it uses, and a command line to re-record
the references and to measure the spread of the numbers between CPU kernel sets.

Why tolerances at all: float32 results differ in the last bits between CPUs, because PyTorch picks its
vectorised kernels by CPU capability (``ATEN_CPU_CAPABILITY``: avx512, avx2, default) and oneDNN its convolution
algorithms by ISA (``ONEDNN_MAX_CPU_ISA``); a few training steps turn that into visible differences of the smoke
numbers.  The tolerance of a metric is derived from that spread as measured on one machine by switching the
kernel sets (``spread``): ``tol = SAFETY * (largest difference seen for that metric in that notebook)`` - per
notebook, because how far rounding travels depends on how long and how chaotic the notebook's training is (a
quickstart probe moves by 0.002, a first-order GeSSL run by 0.04) - falling back to the largest difference of that
metric in any notebook for a key no measurement covered, and never below ``FLOOR_ABS + FLOOR_REL * |value|``.

    python tests/smoke_reference.py record [OUTPUTS]                   # <nb>/smoke/metrics.json -> references
    python tests/smoke_reference.py spread BASE_OUTPUTS RUN_OUTPUTS [...] # the same notebooks run under other
                                                                         # kernel sets -> spread, tolerances
    python tests/smoke_reference.py spread-ref RUN_OUTPUTS [...]          # runs on other CPUs / kernel sets
                                                                         # against the recorded reference values,
                                                                         # merged into the stored spread
    python tests/smoke_reference.py check OUTPUTS                        # compare a run with the references

(an ``outputs`` folder; a file ``KERNELS`` in it or beside it names the kernel set it was made with).

Only ``results`` of ``metrics.json`` is compared, and in it every number except timings and memory (machine
load and the allocator move those); the set of keys must match exactly, so a metric that disappears or appears
is a failure too.
"""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = Path(__file__).with_name("reference") / "smoke_metrics.json"
SAFETY = 3.0
FLOOR_ABS, FLOOR_REL = 1e-9, 1e-5
# timings, speeds and memory depend on the machine and its load, not on the code's results (case-sensitive: "S" is
# GeSSL's σ-measure, "_s" a time in seconds)
_VOLATILE = re.compile(r"(^|_)(s|ms|mb|time|wall|seconds|iqr|ratio)(_|$)|^bench_x_|^x_base_(time|memory)|per_run|per_epoch")


def _notebooks() -> list[str]:
    from bilevel_ssl.reproduce import list_notebooks

    return list_notebooks()


def flatten(tree, prefix: str = "") -> dict[str, float]:
    """``{"a/b/c": number}`` for every numeric leaf of a nested dict/list (booleans and strings left out)."""
    out: dict[str, float] = {}
    if isinstance(tree, dict):
        for k, v in tree.items():
            out.update(flatten(v, f"{prefix}{k}/"))
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            out.update(flatten(v, f"{prefix}{i}/"))
    elif isinstance(tree, (int, float)) and not isinstance(tree, bool):
        out[prefix.rstrip("/")] = float(tree)
    elif tree is None:
        out[prefix.rstrip("/")] = math.nan
    return out


def family(key: str) -> str:
    """The metric a key measures: its last path component that is not an index (``simclr/knn_acc`` -> ``knn_acc``)."""
    parts = [p for p in key.split("/") if not p.isdigit()]
    return parts[-1] if parts else key


def is_volatile(key: str) -> bool:
    return any(_VOLATILE.search(p) for p in key.split("/"))


def comparable(metrics: dict) -> dict[str, float]:
    """The numbers of a ``metrics.json`` that the reference compares."""
    return {k: v for k, v in flatten(metrics.get("results", {})).items() if not is_volatile(k)}


def load_metrics(root: Path, notebook: str) -> dict:
    return json.loads((root / notebook / "smoke" / "metrics.json").read_text())


def load_reference() -> dict:
    return json.loads(REFERENCE.read_text())


def tolerance(ref: dict, key: str, value: float, notebook: str = "") -> float:
    fam = family(key)
    measured = ref["tolerances"].get(notebook, {}).get(fam, ref["tolerances_any_notebook"].get(fam, 0.0))
    return max(measured, FLOOR_ABS + FLOOR_REL * abs(value))


def differences(ref: dict, notebook: str, got: dict[str, float]) -> list[str]:
    """Human-readable differences of one notebook's numbers from the reference; empty when within tolerance."""
    want = ref["values"][notebook]
    problems = []
    for key in sorted(set(want) - set(got)):
        problems.append(f"{notebook}: {key} missing (reference {want[key]:.6g})")
    for key in sorted(set(got) - set(want)):
        problems.append(f"{notebook}: {key} is new ({got[key]:.6g}); re-record the references if intended")
    for key in sorted(set(want) & set(got)):
        a, b = got[key], want[key]
        if math.isnan(a) and math.isnan(b):
            continue
        tol = tolerance(ref, key, b, notebook)
        if not abs(a - b) <= tol:  # NaN on one side fails too
            problems.append(f"{notebook}: {key} = {a:.6g}, reference {b:.6g}, |diff| {abs(a - b):.3g} > "
                            f"tolerance {tol:.3g} ({family(key)})")
    return problems


def _kernels(run: Path) -> str:
    for f in (run / "KERNELS", run.parent / "KERNELS"):
        if f.exists():
            return f.read_text().strip()
    return str(run)


def record(outputs: Path = ROOT / "outputs") -> None:
    """Store every notebook's current smoke numbers as the references (keeps the measured tolerances)."""
    old = load_reference() if REFERENCE.exists() else {"tolerances": {}, "spread": {}}
    values = {nb: comparable(load_metrics(outputs, nb)) for nb in _notebooks()}
    REFERENCE.parent.mkdir(parents=True, exist_ok=True)
    REFERENCE.write_text(json.dumps({**old, "values": values}, indent=1, sort_keys=True) + "\n")
    print(f"recorded {sum(map(len, values.values()))} numbers of {len(values)} notebooks -> {REFERENCE}")


def spread(outputs: Path | None, runs: list[Path], *, merge: bool = False) -> None:
    """Largest difference per metric family between ``outputs`` (this machine's kernels; None: the recorded
    reference values, i.e. the machine and kernels that recorded them) and each of ``runs`` (the same notebooks
    under other kernel sets or on other CPUs); tolerances = SAFETY x that spread.  ``merge`` keeps the larger of
    this and the stored measurement per family (measurements of several pairs of runs add up)."""
    have = lambda d, nb: (d / nb / "smoke" / "metrics.json").exists()  # noqa: E731
    ref = load_reference() if REFERENCE.exists() else {"values": {}}
    if outputs is None:
        base = {nb: v for nb, v in ref["values"].items() if nb in _notebooks()}
    else:
        base = {nb: comparable(load_metrics(outputs, nb)) for nb in _notebooks() if have(outputs, nb)}
    worst: dict[str, dict[str, dict]] = {nb: dict(v) for nb, v in ref.get("spread", {}).items()} if merge else {}
    for run in runs:
        label = _kernels(run)
        for nb, values in base.items():
            if not have(run, nb):
                print(f"{nb}: not in {run}; skipped")
                continue
            other = comparable(load_metrics(run, nb))
            for key, v in values.items():
                if key not in other or math.isnan(v) or math.isnan(other[key]):
                    continue
                d = abs(other[key] - v)
                fam = family(key)
                if d > worst.setdefault(nb, {}).get(fam, {"diff": -1.0})["diff"]:
                    worst[nb][fam] = {"diff": d, "key": key, "kernels": label}
    REFERENCE.parent.mkdir(parents=True, exist_ok=True)
    ref["spread"] = {nb: dict(sorted(f.items())) for nb, f in sorted(worst.items())}
    ref["tolerances"] = {nb: {fam: SAFETY * w["diff"] for fam, w in f.items()} for nb, f in ref["spread"].items()}
    pooled: dict[str, float] = {}
    for f in ref["spread"].values():
        for fam, w in f.items():
            pooled[fam] = max(pooled.get(fam, 0.0), SAFETY * w["diff"])
    ref["tolerances_any_notebook"] = dict(sorted(pooled.items()))
    sets = ([] if outputs is None else [_kernels(outputs)]) + [_kernels(r) for r in runs]
    ref["kernel_sets"] = sorted(set(ref.get("kernel_sets", [])) | set(sets)) if merge else sets
    REFERENCE.write_text(json.dumps(ref, indent=1, sort_keys=True) + "\n")
    for nb, f in ref["spread"].items():
        top = sorted(f.items(), key=lambda kv: -kv[1]["diff"])[:4]
        print(f"{nb}: " + ", ".join(f"{fam} {w['diff']:.3g}" for fam, w in top))


if __name__ == "__main__":
    cmd, *args = sys.argv[1:] or ["help"]
    if cmd == "record":
        record(*map(Path, args[:1]))
    elif cmd == "spread":
        merge = "--merge" in args
        args = [a for a in args if a != "--merge"]
        spread(Path(args[0]), [Path(a) for a in args[1:]], merge=merge)
    elif cmd == "spread-ref":
        spread(None, [Path(a) for a in args], merge=True)
    elif cmd == "check":
        ref = load_reference()
        problems = [p for nb in _notebooks() for p in differences(ref, nb, comparable(load_metrics(Path(args[0]), nb)))]
        print("\n".join(problems) or f"every number of {len(ref['values'])} notebooks within tolerance")
        sys.exit(1 if problems else 0)
    else:
        print(__doc__)
