"""The results index: ``outputs/index.md`` and ``outputs/index.html``, rebuilt from every run's ``metrics.json``.

``python -m bilevel_ssl.index`` (``make reproduce`` runs it at the end).  One section per notebook; in it, one
block per profile that has run (paper, default, smoke - the most complete first) with: run time, machine, git SHA
and date; the key metrics table (``results`` of ``metrics.json``: one row per model/setting, numeric columns; a
notebook chooses and orders them with an ``index_columns`` list in ``metrics.json``); the verdict per paper
claim (``verdicts``: claim -> text); the figures (``fig_*.png``, thumbnails in the HTML page).

``index.md``/``index.html`` list the *committed* profiles (:data:`COMMITTED`: the runs whose folders are in git,
so the index on the repository page links only to files that are there); the smoke runs that ``make test`` writes
go to ``index-smoke.md``/``index-smoke.html`` (git-ignored).

``python -m bilevel_ssl.index --readme README.md`` also rewrites the README's results blocks - every
``<!-- results NOTEBOOK PROFILE -->`` ... ``<!-- /results -->`` - from the committed ``metrics.json``
(:func:`readme_block`) and every ``<!-- budget PROFILE -->`` block - what each committed run of the profile took,
the table of ``make reproduce``'s time (:func:`budget_block`) - and ``--check`` fails when the README differs from
what the metrics give (``tests/test_readme_results.py``): a README number can only come from a committed run.  A block whose run was
made with other parameters than today's ``params/<profile>/<notebook>.yaml`` opens with a **Stale** line naming
each changed key (:func:`params_drift`), so a reader sees which verdicts are not those of the current profile.
"""

from __future__ import annotations

import argparse
import html
import json
import math
import re
import sys
from pathlib import Path

from .paths import outputs_dir

PROFILE_ORDER = ("paper", "gpu", "default", "smoke")
COMMITTED = ("paper", "gpu", "default")  # profiles whose run folders are committed (.gitignore)
DEFAULT_COLUMNS = ("knn_acc", "linear_acc", "fewshot_5w1s_acc", "fewshot_5w5s_acc")
MAX_COLUMNS = 8


def _runs(root: Path) -> dict[str, dict[str, Path]]:
    """notebook -> profile -> run folder, for every folder holding a metrics.json."""
    found: dict[str, dict[str, Path]] = {}
    for metrics in sorted(root.glob("*/*/metrics.json")):
        notebook, profile = metrics.parent.parent.name, metrics.parent.name
        if notebook == "cache":
            continue
        found.setdefault(notebook, {})[profile] = metrics.parent
    return found


def _fmt(v) -> str:
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, (int, float)):
        if isinstance(v, float) and not math.isfinite(v):
            return "–"
        return f"{v:.3f}" if isinstance(v, float) else str(v)
    return str(v)


def metrics_table(record: dict) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the key metrics: one row per entry of ``results`` that is a dict of numbers."""
    results = record.get("results") or {}
    rows = {k: v for k, v in results.items() if isinstance(v, dict)}
    if not rows:
        flat = {k: v for k, v in results.items() if isinstance(v, (int, float))}
        return (["metric", "value"], [[k, _fmt(v)] for k, v in flat.items()]) if flat else ([], [])
    numeric = [c for r in rows.values() for c, v in r.items() if isinstance(v, (int, float))]
    columns = list(dict.fromkeys(numeric))
    chosen = record.get("index_columns") or [c for c in DEFAULT_COLUMNS if c in columns] or columns
    chosen = [c for c in chosen if c in columns][:MAX_COLUMNS]
    return ["", *chosen], [[name, *(_fmt(r.get(c, float("nan"))) for c in chosen)] for name, r in rows.items()]


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    if not header:
        return "_no metrics table_\n"
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    if not header:
        return "<p><em>no metrics table</em></p>"
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _summary(record: dict) -> str:
    m = record.get("machine") or {}
    wall = record.get("wall_time_s")
    runs = record.get("training_runs") or {}
    loaded_s = runs.get("from_cache_train_s") or 0
    counted = (f" (pre-training runs through the encoder cache: {runs.get('trained', 0)} trained here, "
               f"{runs.get('from_cache', 0)} loaded"
               + (f", whose training took {loaded_s:.0f} s where they were made" if loaded_s else "")
               + ")") if runs.get("trained") or runs.get("from_cache") else ""  # none: it trains outside the cache
    parts = [(f"run time {wall:.0f} s" if isinstance(wall, (int, float)) else "run time unknown") + counted,
             f"machine: {m.get('cuda') or m.get('processor', '?')}, {m.get('cpus', '?')} CPUs",
             f"git {str(record.get('git_sha', '?'))[:12]}", f"written {record.get('written', '?')}"]
    return "; ".join(parts)


def build(root: str | Path | None = None) -> tuple[Path, Path]:
    """Write ``index.md``/``index.html`` (the :data:`COMMITTED` profiles) and ``index-smoke.md``/``.html`` (the
    rest) in ``root`` (default ``outputs/``); returns the paths of the first two."""
    root = Path(root or outputs_dir())
    runs = _runs(root)
    rest = {nb: {p: f for p, f in by.items() if p not in COMMITTED} for nb, by in runs.items()}
    _build(root, {nb: by for nb, by in rest.items() if by}, "index-smoke",
           "the runs of the profiles that are not committed (smoke: what `make test` runs).")
    committed = {nb: {p: f for p, f in by.items() if p in COMMITTED} for nb, by in runs.items()}
    return _build(root, {nb: by for nb, by in committed.items() if by}, "index",
                  "the committed runs (the smoke runs of `make test` are in `index-smoke.md`).")


def _build(root: Path, runs: dict, name: str, what: str) -> tuple[Path, Path]:
    md = ["# Results index", "",
          "Generated by `python -m bilevel_ssl.index` from every `outputs/<notebook>/<profile>/metrics.json` "
          f"(rebuilt by `make reproduce`): {what} Profiles: smoke = seconds (what the tests run), default = the "
          "offline CPU reproduction, gpu = longer schedules on one CUDA GPU, paper = the papers' settings (GPU).",
          ""]
    page = ["<!doctype html><html><head><meta charset='utf-8'><title>bilevel-ssl results</title><style>"
            "body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
            "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:2px 8px;"
            "text-align:right}td:first-child{text-align:left}img{border:1px solid #ddd;margin:4px}"
            ".meta{color:#555;font-size:90%}</style></head><body><h1>bilevel-ssl results</h1>"]
    if not runs:
        md.append("_No runs yet: `make reproduce` (or `make reproduce PROFILE=smoke`)._")
        page.append("<p>No runs yet: <code>make reproduce</code>.</p>")
    for notebook in sorted(runs):
        md += [f"## {notebook}", ""]
        page.append(f"<h2>{html.escape(notebook)}</h2>")
        profiles = sorted(runs[notebook], key=lambda p: PROFILE_ORDER.index(p) if p in PROFILE_ORDER else 99)
        for profile in profiles:
            folder = runs[notebook][profile]
            rel = folder.relative_to(root).as_posix()
            try:
                record = json.loads((folder / "metrics.json").read_text())
            except (OSError, json.JSONDecodeError) as err:
                md += [f"### {profile}", "", f"_unreadable metrics.json: {err}_", ""]
                continue
            header, rows = metrics_table(record)
            verdicts = record.get("verdicts") or {}
            figures = sorted(p.name for p in folder.glob("fig_*.png"))
            md += [f"### {profile}", "", _summary(record) + f" — [notebook]({rel}/{notebook}.ipynb), "
                   f"[metrics.json]({rel}/metrics.json)", ""]
            stale = _stale_line(notebook, profile, record, root)
            if stale:
                md += [stale, ""]
                page.append(f"<p><b>{html.escape(stale.replace('**', '').replace('`', ''))}</b></p>")
            md += [_md_table(header, rows)]
            notes = [line for line in (_learning_line(record), _selections(record)) if line]
            for line in notes:
                md += [line, ""]
            if verdicts:
                md += ["Verdicts:", ""] + [f"- **{k}**: {v}" for k, v in verdicts.items()] + [""]
            if figures:
                md += ["Figures: " + ", ".join(f"[{f}]({rel}/{f})" for f in figures), ""]
            page.append(f"<h3>{html.escape(profile)}</h3><p class='meta'>{html.escape(_summary(record))} — "
                        f"<a href='{rel}/{notebook}.ipynb'>notebook</a>, <a href='{rel}/metrics.json'>metrics.json"
                        f"</a></p>{_html_table(header, rows)}")
            page += [f"<p>{html.escape(line.replace('**', ''))}</p>" for line in notes]
            if verdicts:
                page.append("<ul>" + "".join(f"<li><b>{html.escape(k)}</b>: {html.escape(str(v))}</li>"
                                             for k, v in verdicts.items()) + "</ul>")
            page.append("".join(f"<a href='{rel}/{f}'><img src='{rel}/{f}' width='320' alt='{html.escape(f)}'>"
                                f"</a>" for f in figures))
    page.append("</body></html>")
    md_path, html_path = root / f"{name}.md", root / f"{name}.html"
    root.mkdir(parents=True, exist_ok=True)
    md_path.write_text("\n".join(md).rstrip() + "\n")
    html_path.write_text("\n".join(page) + "\n")
    return md_path, html_path


# ------------------------------------------------------------------------------------------- README result blocks

BLOCK = re.compile(r"<!-- results (\S+) (\S+) -->\n.*?<!-- /results -->", re.S)


def _claim_paragraph(cid: str, claim: dict) -> str:
    """One paragraph per claim from ``metrics.json`` ``claims[cid]`` (:meth:`bilevel_ssl.claims.ClaimVerdict.
    as_dict`): the label, the reason and each primary comparison's effect, Holm-level CI and MDE."""
    parts = []
    for c in claim.get("comparisons", []):
        if not c.get("primary") or not isinstance(c.get("mean"), (int, float)) or not math.isfinite(c["mean"]):
            continue
        ci = (f"CI [{c['ci_low']:+.3f}, {c['ci_high']:+.3f}] at {100 * c['ci_level']:.1f}%"
              if isinstance(c.get("ci_low"), (int, float)) and math.isfinite(c["ci_low"]) else "no CI")
        mde = f", MDE {c['mde']:.3f}" if isinstance(c.get("mde"), (int, float)) and math.isfinite(c["mde"]) else ""
        parts.append(f"{c['comparison']}: {c['mean']:+.3f} ({ci}{mde}, n = {c['n']}; {c['label']})")
    text = f"**{cid}: {claim.get('label', '?')}** ({claim.get('reason', '')})."
    return text + (" Primary comparisons (mean A − B): " + "; ".join(parts) + "." if parts else "")


def params_drift(notebook: str, profile: str, record: dict, params_dir: Path) -> list[tuple[str, object, object]]:
    """``(key, value of the run, value now)`` for every parameter where the run's ``metrics.json`` ``params``
    differ from ``params_dir/<profile>/<notebook>.yaml`` today (a missing key reads ``None``); empty when they agree
    or when there is no such file (a run from elsewhere).  A committed run whose parameters file changed since is
    not the run ``make reproduce`` would make now: its block says so."""
    from .reproduce import load_params  # the reader make reproduce runs the notebooks with

    path = params_dir / profile / f"{notebook}.yaml"
    if not path.is_file():
        return []
    now = {**load_params(path), "profile": profile}  # what reproduce passes to papermill (and so to metrics.json)
    run = record.get("params") or {}
    # JSON round trip: the run's params went through metrics.json (tuples -> lists, int keys -> str)
    now = json.loads(json.dumps(now, default=str))
    run, now = _dotted(run), _dotted(now)
    return [(k, run.get(k), now.get(k)) for k in sorted(set(run) | set(now)) if run.get(k) != now.get(k)]


def _dotted(d: dict, prefix: str = "") -> dict:
    """Nested mappings flattened to dotted keys, so a drift names the changed leaf (``gessl_args.inner_lr``)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_dotted(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _short(value, width: int = 40) -> str:
    if value is None:
        return "unset"
    text = json.dumps(value, default=str)
    return text if len(text) <= width else text[:width - 1] + "…"


def _stale_line(notebook: str, profile: str, record: dict, root: Path) -> str:
    """The **Stale** line of a run whose parameters file changed since (``root`` is the outputs folder; the
    parameters are in ``root.parent / "params"``), or ``""``."""
    drift = params_drift(notebook, profile, record, root.parent / "params")
    if not drift:
        return ""
    changes = "; ".join(f"`{k}` {_short(a)} → {_short(b)}" for k, a, b in drift)
    return (f"**Stale: `params/{profile}/{notebook}.yaml` changed after this run** ({changes}). The numbers and "
            f"verdicts below are those of the run's parameters; `make reproduce NB={notebook}` re-makes it with "
            "today's.")


def readme_block(notebook: str, profile: str, root: str | Path | None = None) -> str:
    """The generated body of a README results block: where the numbers come from, the key metrics table, the
    learning check and one paragraph per claim, all from ``outputs/<notebook>/<profile>/metrics.json``."""
    root = Path(root or outputs_dir())
    folder = root / notebook / profile
    try:
        record = json.loads((folder / "metrics.json").read_text())
    except (OSError, json.JSONDecodeError):
        return (f"_No committed `{profile}` run of {notebook} yet: `make reproduce PROFILE={profile} NB={notebook}` "
                f"writes `outputs/{notebook}/{profile}/`._\n")
    rel = f"outputs/{notebook}/{profile}"
    lines = [f"From [`{rel}/metrics.json`]({rel}/metrics.json) ({_summary(record)}; executed notebook: "
             f"[`{rel}/{notebook}.ipynb`]({rel}/{notebook}.ipynb)).", "", _md_table(*metrics_table(record)).rstrip()]
    stale = _stale_line(notebook, profile, record, root)
    if stale:
        lines[0:0] = [stale, ""]
    for line in (_learning_line(record), _selections(record), _targets_line(record)):
        lines += ["", line] if line else []
    for cid, claim in (record.get("claims") or {}).items():
        lines += ["", _claim_paragraph(cid, claim)]
    return "\n".join(lines) + "\n"


def _learning_line(record: dict) -> str:
    """The learning check of a run (``metrics.json`` ``learning_check``: each base's score against the untrained
    network and whether the margin was met), or ``""`` when the run recorded none."""
    check = record.get("learning_check")
    if not check:
        return ""
    bases = ", ".join(f"{b} {v['trained']:.3f} vs untrained {v['untrained']:.3f} ({v['gain']:+.3f})"
                      for b, v in check.get("bases", {}).items())
    return (f"Learning check ({check.get('metric')}, needs +{check.get('margin', 0):.2f}): {bases} — "
            + ("passed." if check.get("ok") else "**failed: no verdicts**."))


def _targets_line(record: dict) -> str:
    """The benchmark targets of a run (``metrics.json`` ``targets``: name -> ratio, target, met; notebook 90) with
    the machine load it ran under, or ``""`` when the run recorded none."""
    targets = record.get("targets")
    if not targets:
        return ""
    parts = [f"{name} {v['ratio']:.3g} vs ≤ {v['target']:g} ({'met' if v['met'] else '**not met**'})"
             for name, v in targets.items()]
    load = record.get("load_average")
    where = f" (load average {load[0]:.1f}–{load[1]:.1f} during the run)" if load else ""
    return "Targets" + where + ": " + "; ".join(parts) + "."


def _selections(record: dict) -> str:
    """The hyper-parameters the run chose on a validation split (each recorded by
    :meth:`bilevel_ssl.experiments.Selection.as_dict` as ``<name>_selection``), in the words of
    :meth:`~bilevel_ssl.experiments.Selection.markdown`, with whether the runs used the choice when the record has
    ``<name>_used`` (the value the profile's runs trained with)."""
    from .experiments import Selection

    chosen = [Selection(**{**v, "values": tuple(v["values"]), "scores": tuple(v["scores"]),
                                 "seeds": tuple(v.get("seeds", ())),
                                 "seed_scores": tuple(tuple(x) for x in v.get("seed_scores", ()))}).markdown(
                  used=record.get(key.removesuffix("_selection") + "_used") if key.endswith("_selection") else None)
              for key, v in record.items()
              if isinstance(v, dict) and {"option", "values", "scores", "chosen"} <= v.keys()]
    return " ".join(chosen)


BUDGET = re.compile(r"<!-- budget (\S+) -->\n.*?<!-- /budget -->", re.S)


def _minutes(seconds: float) -> str:
    """``42 s``, ``2 min 34 s`` (under 10 min), ``52 min``."""
    if seconds >= 600:
        return f"{seconds / 60:.0f} min"
    m, s = divmod(round(seconds), 60)
    return f"{m} min {s} s" if m and s else f"{m} min" if m else f"{s} s"


def _machine(record: dict) -> str:
    """``2 CPUs, 2 threads, AVX512`` (or the CUDA device) from ``metrics.json`` ``machine``."""
    m = record.get("machine") or {}
    if m.get("cuda"):
        return str(m["cuda"])
    return ", ".join(x for x in (f"{m['cpus']} CPUs" if m.get("cpus") else "",
                                 f"{m['torch_threads']} threads" if m.get("torch_threads") else "",
                                 str(m.get("cpu_capability") or "")) if x) or "?"


def budget_block(profile: str, root: str | Path | None = None) -> str:
    """The generated body of a README ``<!-- budget PROFILE -->`` block: what each notebook's committed run of
    ``profile`` took (``wall_time_s``), how many of its pre-training runs it trained and how many it loaded from the
    encoder cache, what it would cost with an empty cache (:func:`bilevel_ssl.reproduce.fresh_cache_s`), its commit
    and date, and the sums; the notebooks without a run are named (those of ``root.parent / "notebooks"``).

    The two sums bracket one ``make reproduce``: the run times add runs that loaded what an earlier notebook
    trained (low), the empty-cache costs count a run shared by several notebooks in each (high)."""
    from .reproduce import fresh_cache_s, loads_unrecorded, plan_estimate_s

    root = Path(root or outputs_dir())
    runs = {nb: by[profile] for nb, by in _runs(root).items() if profile in by}
    names = sorted({*runs, *(p.stem for p in (root.parent / "notebooks").glob("[0-9][0-9]_*.ipynb"))})
    header = ["notebook", "run time", "pre-training runs trained / loaded", "training of the loaded runs",
              "with an empty cache", "machine", "commit", "written"]
    rows, wall_sum, fresh_sum, missing, low, records = [], 0.0, 0.0, [], [], []
    for name in names:
        if name not in runs:
            missing.append(name)
            continue
        try:
            record = json.loads((runs[name] / "metrics.json").read_text())
        except (OSError, json.JSONDecodeError):
            missing.append(name)
            continue
        wall, fresh = record.get("wall_time_s"), fresh_cache_s(record)
        if not isinstance(wall, (int, float)) or fresh is None:
            missing.append(name)
            continue
        tr = record.get("training_runs")
        if tr is None:  # written before training_runs: whether it loaded runs from the cache is unknown
            counted, loaded, unknown = "not recorded", "not recorded", True
            low.append(f"{name} (recorded no `training_runs`)")
        else:
            counted = (f"{tr.get('trained', 0)} / {tr.get('from_cache', 0)}" if tr.get("trained") or tr.get("from_cache")
                       else "– (trains outside the cache)")
            unrecorded = loads_unrecorded(record)
            unknown = unrecorded > 0
            loaded = ("not recorded" if unknown else _minutes(float(tr.get("from_cache_train_s") or 0.0))
                      if tr.get("from_cache") else "–")
            if unknown:
                low.append(f"{name} (loaded {unrecorded} runs without recording their training time)")
        wall_sum, fresh_sum = wall_sum + wall, fresh_sum + fresh
        records.append(record)
        rows.append([name, _minutes(wall), counted, loaded, _minutes(fresh) + (" or more" if unknown else ""),
                     _machine(record), str(record.get("git_sha", "?"))[:7], str(record.get("written", "?"))[:10]])
    if not rows:
        return f"_No committed `{profile}` run yet: `make reproduce PROFILE={profile}`._\n"
    rows.append(["**sum**", f"**{_minutes(wall_sum)}** ({wall_sum / 3600:.1f} h)", "", "",
                 f"**{_minutes(fresh_sum)}** ({fresh_sum / 3600:.1f} h)" + (" or more" if low else ""), "", "", ""])
    lines = [f"From each notebook's committed `outputs/<notebook>/{profile}/metrics.json` (`wall_time_s`, "
             "`training_runs`, `machine`, `git_sha`, `written`). The run times add runs that loaded "
             "from the encoder cache what an earlier run had trained, so their sum is low; \"with an empty cache\" adds "
             "the training time of those loaded runs, and counts a run shared by several notebooks in each, so "
             "its sum is high for one `make reproduce` in order.", "", _md_table(header, rows).rstrip()]
    named = sum(isinstance((r.get("training_runs") or {}).get("runs"), dict) for r in records)
    if named:
        once = plan_estimate_s(records)
        lines += ["", f"One `make reproduce` in order, each pre-training run that notebooks share trained once: "
                  f"**{_minutes(once)}** ({once / 3600:.1f} h; "
                  f"`bilevel_ssl.reproduce.plan_estimate_s`). It knows the shared runs of the {named} of "
                  f"{len(records)} notebook runs that name their pre-training runs (`training_runs.runs`, recorded "
                  "since 2026-12-08); the others count their empty-cache cost."]
    if low:
        lines += ["", "\"or more\": " + "; ".join(low) + ". Their empty-cache cost leaves out the training of "
                  "whatever they loaded from the cache."]
    if missing:
        lines += ["", "No committed run: " + ", ".join(missing) + "."]
    return "\n".join(lines) + "\n"


def render_readme(text: str, root: str | Path | None = None) -> str:
    """``text`` with every results block re-generated by :func:`readme_block` and every budget block by
    :func:`budget_block`."""
    text = BLOCK.sub(lambda m: f"<!-- results {m[1]} {m[2]} -->\n{readme_block(m[1], m[2], root)}<!-- /results -->",
                     text)
    return BUDGET.sub(lambda m: f"<!-- budget {m[1]} -->\n{budget_block(m[1], root)}<!-- /budget -->", text)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bilevel_ssl.index", description=__doc__.split("\n")[0])
    ap.add_argument("--root", default="", help="outputs folder (default: <repo>/outputs)")
    ap.add_argument("--readme", default="", help="also rewrite this README's results and budget blocks from the metrics")
    ap.add_argument("--check", action="store_true", help="with --readme: only check, exit 1 if it differs")
    args = ap.parse_args(argv)
    if args.readme:
        path = Path(args.readme)
        text = path.read_text()
        new = render_readme(text, args.root or None)
        if args.check:
            if new != text:
                print(f"[index] {path}: results or budget blocks differ from the committed metrics; run "
                      f"python -m bilevel_ssl.index --readme {path}", file=sys.stderr)
                return 1
            print(f"[index] {path}: results and budget blocks match the metrics")
            return 0
        path.write_text(new)
        print(f"[index] rewrote the results and budget blocks of {path}")
    md_path, html_path = build(args.root or None)
    print(f"[index] wrote {md_path} and {html_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
