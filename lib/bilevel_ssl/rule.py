"""How a paper claim is decided: the one rule behind every verdict (the claims R1-R17 themselves are declared in
:mod:`bilevel_ssl.claims`, which re-exports this module's public names).

A claim is a list of *comparisons* "run A vs run B on a metric, in a claimed direction", some of them *primary*
(they decide the claim) and the rest *secondary* (reported beside it, never deciding it); ``Claim.how`` says how
the paper's words became these comparisons and ``Claim.not_covered`` what of the claim they leave out.  Runs are
named by their key in the notebook's ``metrics.json`` ``results`` (e.g. ``"simclr +GeSSL"`` in notebook 10,
``"mu=0.7 +GeSSL"`` in notebook 11, ``"variant bilevel"`` in notebook 13); :data:`bilevel_ssl.claims.CLAIMS` uses the runs of the
default profiles, so a smaller profile shows the runs it lacks as "not in the table".

The rule
--------
1. **Pairing.**  For each comparison, the per-seed difference ``d_s = A_s − B_s`` over the seeds that both runs
   have, usable on both sides.  Seeds are paired because A and B of one seed share the data order, the
   initialisation and the evaluation episodes, so pairing removes the seed-to-seed noise they have in common.
2. **Test.**  Student t on ``d`` with ``n − 1`` degrees of freedom.  Every comparison gives two "twice one-sided"
   p-values, one for the claimed side (``p_for``) and one against it (``p_against``); its p-value is the smaller,
   which for a directional comparison is the ordinary two-sided p.

   * ``greater`` (the claim says A > B): for = mean(d) > 0, against = mean(d) < 0.
   * ``less`` (A < B): the mirror image.
   * ``equivalent`` (A ≈ B within a declared ``margin`` δ, for "insensitive" claims, R16): for = the two one-sided
     tests (TOST) that −δ < mean(d) < δ; against = |mean(d)| > δ.  δ is taken from the paper's own table (the
     variation it calls minimal), never from our data.
3. **Holm-Bonferroni** over the primary comparisons of one claim that have a p-value (m of them; the secondary
   ones form their own family): adjusted ``p_adj(j) = max_{i<=j} min(1, (m − i + 1) p(i))`` in ascending order of
   p.  A comparison is decided when ``p_adj <= alpha`` (0.05): **supported** if its smaller p was the claimed
   side, **contradicted** if it was the opposite; otherwise **not resolved**.  Holm keeps the chance of any false
   decision among the m comparisons at most alpha (for decisions of either sign this is proven for independent
   comparisons, Shaffer 1980; tests/test_claims.py checks it by simulation), and its step-down decides more than
   plain Bonferroni.
4. **CI at the adjusted level.**  Each comparison reports the t interval ``mean ± t(1 − a/2, n − 1) · sd/√n`` at
   ``a = alpha · p / p_adj`` (``alpha / (m − j + 1)``, Holm's own step level, unless a larger p-value earlier in
   the order carried over).  With that level the interval agrees with the decision: a directional comparison is
   decided exactly when its interval excludes 0, an equivalence one when it lies inside (supported) or wholly
   outside (contradicted) ``(−δ, δ)``.  With one comparison it is the ordinary 95% interval.
5. **Minimum detectable effect (MDE).**  ``(t(1 − a₁/2, n − 1) + t(power, n − 1)) · sd/√n`` with
   ``a₁ = alpha / m`` (the level of Holm's first step, what a lone true effect among m must pass) and power 0.8:
   the usual t approximation of the true mean difference this run would detect with 80% power, using the sd
   observed here (so an estimate).  For an ``equivalent`` comparison the MDE is the smallest margin it could
   prove with 80% power if the true difference were 0, ``(t(1 − a₁/2) + t(1 − (1 − power)/2)) · sd/√n``.  A
   "not resolved" then says how large an effect the run could have seen.
6. **Claim label** from its primary comparisons: **supported** if at least one is supported and none
   contradicted, **contradicted** if at least one is contradicted and none supported, **not resolved** otherwise
   (nothing decided, or mixed: some each way, which is reported as such).  The counts "k of m" always go with
   the label, because "supported in 1 of 6" is weaker than "in 6 of 6".

Diverged and missing runs
-------------------------
A seed is *unusable* on one side when that run's ``diverged`` flag is set for that seed (a row with metric
``"diverged"`` and a non-zero value, or a ``diverged`` column) or its value is NaN/±inf.  Such a seed is dropped
from the pair - for both sides - and listed in the result, counted per side; when the side the claim says is
better (A of ``greater``/``less``) lost more seeds than the other, the result says so.  Divergence never decides a
comparison by itself (the notebooks used to count a diverged method as "worse"; that is a judgement, not a test,
and is now stated next to the numbers instead).  A seed present on one side only is dropped and listed too.
Fewer than 2 usable seeds, or a run/metric absent from the table, leave the comparison **not resolved** with
that reason, outside the Holm family.  Nothing is dropped silently, and a duplicated (run, seed, metric) is an
error rather than averaged.

Input
-----
A long :class:`pandas.DataFrame` with columns ``run, seed, metric, value`` (optionally ``diverged``), which
:func:`from_wide` builds from the notebooks' per-seed ``runs`` frames, or a dict
``{run: {metric: [values by seed 0, 1, ...] or {seed: value}}}``; :data:`bilevel_ssl.claims.NOTEBOOK_TABLES` gives the call per
notebook.  Output: :func:`decide` -> :class:`ClaimVerdict` (``.markdown()``, ``.reading()``, ``.table()``,
``.as_dict()`` for ``metrics.json``), :func:`verdict_table` for several claims, :func:`markdown_table`.

What the rule does not cover
----------------------------
Statements about the *spread over seeds* (R8's seed spread, R10's "unstable gains") have no per-seed pairing;
they are named in the claim's ``not_covered`` and stay with the notebooks' own F tests.  Benchmarked step times
(one measurement per configuration, no seeds) are not decided here either; the per-seed training time per epoch
is, with the caveat that a cached run keeps the time measured under whatever load it was trained.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy.special import stdtr, stdtrit  # Student t cdf and its inverse: scipy.stats.t without its overhead

ALPHA = 0.05
POWER = 0.8
LABELS = ("supported", "contradicted", "not resolved")
NO_VERDICT = "no verdict"  # claim label when the notebook's base runs failed the learning check (protocol.py)
DIRECTIONS = {"greater": ">", "less": "<", "equivalent": "≈"}


# --------------------------------------------------------------------------------------------------- declarations

@dataclass(frozen=True)
class Comparison:
    """Run ``a`` against run ``b`` on ``metric``: the claim says ``a > b`` (``greater``), ``a < b`` (``less``) or
    ``|a − b| < margin`` (``equivalent``)."""

    a: str
    b: str
    metric: str
    direction: str = "greater"
    primary: bool = True
    margin: float = 0.0
    note: str = ""

    def __post_init__(self):
        if self.direction not in DIRECTIONS:
            raise ValueError(f"direction: {self.direction!r} not in {sorted(DIRECTIONS)}")
        if self.direction == "equivalent" and not self.margin > 0:
            raise ValueError("margin: an equivalent comparison needs a margin > 0")

    @property
    def name(self) -> str:
        sign = DIRECTIONS[self.direction]
        tail = f" (±{self.margin:g})" if self.direction == "equivalent" else ""
        return f"{self.a} {sign} {self.b}: {self.metric}{tail}"


@dataclass(frozen=True)
class Claim:
    """One paper claim: its id in ``shared/paper-claims.md``, words, source (paper table/figure), the notebook whose
    runs test it, and its comparisons (the primary ones decide it)."""

    id: str
    text: str
    source: str
    notebook: str
    comparisons: tuple[Comparison, ...]
    how: str = ""  # how the words of the claim become these comparisons
    not_covered: str = ""  # parts of the claim this rule cannot decide, and why

    @property
    def primary(self) -> tuple[Comparison, ...]:
        return tuple(c for c in self.comparisons if c.primary)

    @property
    def secondary(self) -> tuple[Comparison, ...]:
        return tuple(c for c in self.comparisons if not c.primary)

    @property
    def runs(self) -> set[str]:
        return {r for c in self.comparisons for r in (c.a, c.b)}


# ---------------------------------------------------------------------------------------------------- input data

def from_wide(frame: pd.DataFrame, run, metrics, *, seed: str = "seed", diverged: str = "diverged") -> pd.DataFrame:
    """Long table (run, seed, metric, value, diverged) from a per-seed frame with one column per metric.

    ``run``: a column name, a list of columns (joined by spaces, numbers as ``:g``, as the notebooks' result keys
    are) or a callable row -> name.  ``metrics``: column names, or a mapping column -> metric name (e.g.
    ``{"bissl_top1": "top1"}`` with ``run=lambda r: f"{r.task} bissl"``).  A ``diverged`` column, if present,
    is carried along."""
    if callable(run):
        names = [run(r) for r in frame.itertuples(index=False)]
    else:
        cols = [run] if isinstance(run, str) else list(run)
        fmt = lambda v: f"{v:g}" if isinstance(v, (float, np.floating)) else str(v)  # noqa: E731
        names = [" ".join(fmt(v) for v in vals) for vals in frame[cols].itertuples(index=False)]
    mapping = dict(metrics) if isinstance(metrics, dict) else {m: m for m in metrics}
    div = frame[diverged].fillna(0).astype(float).to_numpy() != 0 if diverged in frame else np.zeros(len(frame), bool)
    rows = [{"run": name, "seed": s, "metric": metric, "value": float("nan") if v is None else float(v),
             "diverged": bool(dv)}
            for col, metric in mapping.items()
            for name, s, v, dv in zip(names, frame[seed], frame[col], div)]
    return pd.DataFrame(rows, columns=["run", "seed", "metric", "value", "diverged"])


@dataclass
class _Data:
    values: dict  # (run, metric) -> {seed: value}
    diverged: dict  # run -> set of seeds flagged


def _normalise(table) -> _Data:
    values, diverged = {}, {}
    if isinstance(table, pd.DataFrame):
        missing = {"run", "seed", "metric", "value"} - set(table.columns)
        if missing:
            raise ValueError(f"table: missing columns {sorted(missing)}; expected run, seed, metric, value")
        flags = table["diverged"].fillna(False).astype(bool).to_numpy() if "diverged" in table else None
        cols = table[["run", "seed", "metric", "value"]]
        for i, (run, seed, metric, value) in enumerate(cols.itertuples(index=False)):
            if flags is not None and flags[i]:
                diverged.setdefault(run, set()).add(seed)
            _put(values, diverged, run, metric, seed, value)
    elif isinstance(table, dict):
        for run, metrics in table.items():
            for metric, vals in metrics.items():
                items = vals.items() if isinstance(vals, dict) else enumerate(vals)
                for seed, value in items:
                    _put(values, diverged, run, metric, seed, value)
    else:
        raise TypeError(f"table: a long DataFrame or a dict, got {type(table).__name__}")
    return _Data(values, diverged)


def _put(values, diverged, run, metric, seed, value):
    seed = int(seed) if isinstance(seed, (np.integer, int)) else seed
    if metric == "diverged":
        if float(value) != 0:
            diverged.setdefault(run, set()).add(seed)
        return
    cell = values.setdefault((run, metric), {})
    if seed in cell:
        raise ValueError(f"table: run {run!r} has two values of {metric!r} for seed {seed}")
    cell[seed] = float(value)


# -------------------------------------------------------------------------------------------------- the decision

@dataclass
class ComparisonResult:
    comparison: Comparison
    label: str = "not resolved"
    reason: str = ""
    n: int = 0
    mean: float = float("nan")  # mean of A − B over the usable paired seeds
    sd: float = float("nan")
    ci_low: float = float("nan")
    ci_high: float = float("nan")
    ci_level: float = float("nan")  # confidence of [ci_low, ci_high], the Holm-adjusted level
    p: float = float("nan")  # the smaller of p_for and p_against
    p_adj: float = float("nan")  # Holm-adjusted within its family
    mde: float = float("nan")
    seeds: tuple = ()  # seeds used
    dropped: dict = field(default_factory=dict)  # seed -> why
    unusable_a: int = 0  # seeds lost on side A (diverged or non-finite)
    unusable_b: int = 0
    note: str = ""
    _leans: str = ""  # "for" / "against": the side of the smaller p

    def as_dict(self) -> dict:
        c = self.comparison
        return {"comparison": c.name, "a": c.a, "b": c.b, "metric": c.metric, "direction": c.direction,
                "primary": c.primary, "margin": c.margin, "label": self.label, "n": self.n, "mean": self.mean,
                "ci_low": self.ci_low, "ci_high": self.ci_high, "ci_level": self.ci_level, "p": self.p,
                "p_adj": self.p_adj, "mde": self.mde, "seeds": list(self.seeds),
                "dropped": {str(k): v for k, v in self.dropped.items()}, "reason": self.reason, "note": self.note,
                "caveat": c.note}


def _usable(data: _Data, run: str, metric: str) -> tuple[dict, dict]:
    """{seed: value} of the usable seeds and {seed: why} of the others."""
    ok, bad = {}, {}
    flagged = data.diverged.get(run, set())
    for seed, v in data.values[(run, metric)].items():
        if seed in flagged:
            bad[seed] = "diverged"
        elif not math.isfinite(v):
            bad[seed] = "non-finite"
        else:
            ok[seed] = v
    return ok, bad


def _pair(data: _Data, c: Comparison) -> ComparisonResult:
    res = ComparisonResult(c)
    absent = [r for r in (c.a, c.b) if (r, c.metric) not in data.values]
    if absent:
        res.reason = "not in the table: " + ", ".join(f"{r} / {c.metric}" for r in absent)
        return res
    (a, bad_a), (b, bad_b) = _usable(data, c.a, c.metric), _usable(data, c.b, c.metric)
    all_seeds = set(a) | set(b) | set(bad_a) | set(bad_b)
    for s in sorted(all_seeds, key=str):
        why = [f"{side} {w}" for side, w in (("A", bad_a.get(s)), ("B", bad_b.get(s))) if w]
        why += [f"{side} has no seed {s}" for side, vals, bad in (("A", a, bad_a), ("B", b, bad_b))
                if s not in vals and s not in bad]
        if why:
            res.dropped[s] = ", ".join(why)
    res.unusable_a, res.unusable_b = len(bad_a), len(bad_b)
    seeds = sorted(set(a) & set(b), key=str)
    res.seeds, res.n = tuple(seeds), len(seeds)
    notes = []
    if bad_a or bad_b:
        notes.append(f"unusable seeds: A {len(bad_a)}, B {len(bad_b)} (" + "; ".join(
            f"seed {s}: {w}" for s, w in res.dropped.items() if "diverged" in w or "non-finite" in w) + ")")
        if c.direction != "equivalent" and len(bad_a) > len(bad_b):
            notes.append("the side the claim favours (A) lost more seeds than B")
    one_sided = [s for s, w in res.dropped.items() if "has no seed" in w]
    if one_sided:
        notes.append("seeds on one side only: " + ", ".join(map(str, one_sided)))
    res.note = "; ".join(notes)
    if res.n < 2:
        res.reason = f"fewer than 2 usable paired seeds (n = {res.n})"
        if res.n == 1:
            res.mean = a[seeds[0]] - b[seeds[0]]
        return res
    d = np.array([a[s] - b[s] for s in seeds])
    res.mean, res.sd = float(d.mean()), float(d.std(ddof=1))
    res.p, res._leans = _p_values(res.mean, res.sd, res.n, c)
    return res


def _p_values(mean: float, sd: float, n: int, c: Comparison) -> tuple[float, str]:
    """The smaller of the two "twice one-sided" p-values of step 2 of the rule, and which side it is."""
    df, se = n - 1, sd / math.sqrt(n)

    def above(x):  # P-value of "mean(d) > x"
        if se == 0:
            return 0.0 if mean > x else 1.0
        return float(stdtr(df, -(mean - x) / se))

    def below(x):  # P-value of "mean(d) < x"
        if se == 0:
            return 0.0 if mean < x else 1.0
        return float(stdtr(df, (mean - x) / se))

    if c.direction == "greater":
        p_for, p_against = above(0.0), below(0.0)
    elif c.direction == "less":
        p_for, p_against = below(0.0), above(0.0)
    else:
        p_for, p_against = max(above(-c.margin), below(c.margin)), min(above(c.margin), below(-c.margin))
    p_for, p_against = min(1.0, 2 * p_for), min(1.0, 2 * p_against)
    return (p_for, "for") if p_for <= p_against else (p_against, "against")


def holm(p: list[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values, in the order given: ``max_{i<=j} min(1, (m − i + 1) p(i))``."""
    m = len(p)
    order = sorted(range(m), key=lambda i: p[i])
    out, running = [0.0] * m, 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return out


def _decide_family(results: list[ComparisonResult], alpha: float, power: float):
    tested = [r for r in results if math.isfinite(r.p)]
    m = len(tested)
    adj = holm([r.p for r in tested])
    steps = {id(r): k for k, r in enumerate(sorted(tested, key=lambda r: r.p))}
    for r, pa in zip(tested, adj):
        c, df, se = r.comparison, r.n - 1, r.sd / math.sqrt(r.n)
        r.p_adj = pa
        level = alpha * r.p / pa if r.p > 0 else alpha / (m - steps[id(r)])
        r.ci_level = 1 - level
        half = float(stdtrit(df, 1 - level / 2)) * se
        r.ci_low, r.ci_high = r.mean - half, r.mean + half
        q_power = stdtrit(df, power if c.direction != "equivalent" else 1 - (1 - power) / 2)
        r.mde = float((stdtrit(df, 1 - alpha / m / 2) + q_power) * se)
        if pa <= alpha:
            r.label = "supported" if r._leans == "for" else "contradicted"
            r.reason = f"Holm-adjusted p {pa:.3g} <= {alpha:g}"
        else:
            r.label = "not resolved"
            what = ("prove a margin as small as about" if c.direction == "equivalent"
                    else "detect a difference of about")
            r.reason = f"Holm-adjusted p {pa:.3g} > {alpha:g}; the run could {what} {r.mde:.3g} with {power:.0%} power"


@dataclass
class ClaimVerdict:
    claim: Claim
    label: str
    reason: str
    results: list[ComparisonResult]  # primary, in declaration order
    secondary: list[ComparisonResult]
    alpha: float = ALPHA
    power: float = POWER

    @property
    def counts(self) -> dict[str, int]:
        return {lab: sum(r.label == lab for r in self.results) for lab in LABELS}

    def table(self, secondary: bool = True) -> pd.DataFrame:
        rs = self.results + (self.secondary if secondary else [])
        return pd.DataFrame([{"claim": self.claim.id, **r.as_dict()} for r in rs])

    def as_dict(self) -> dict:
        """For ``metrics.json``: the label, the reason, the counts and every comparison."""
        return {"claim": self.claim.id, "label": self.label, "reason": self.reason, "counts": self.counts,
                "alpha": self.alpha, "power": self.power,
                "comparisons": [r.as_dict() for r in self.results + self.secondary]}

    def markdown(self, secondary: bool = True) -> str:
        """The claim's heading line and a Markdown table of its comparisons, numbers to 3 decimals."""
        head = (f"**{self.claim.id}** ({self.claim.source}): {self.claim.text} - **{self.label}** "
                f"({self.reason})")
        rows = [_md_row(r) for r in self.results + (self.secondary if secondary else [])]
        cols = ["comparison", "primary", "n", "mean A − B", "CI (Holm level)", "p adj", "MDE", "label", "note"]
        lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        lines += ["| " + " | ".join(str(row[c]) for c in cols) + " |" for row in rows]
        head += f"\n\nRead as: {self.claim.how}." if self.claim.how else ""
        tail = f"\n\nNot decided by this rule: {self.claim.not_covered}." if self.claim.not_covered else ""
        return head + "\n\n" + "\n".join(lines) + tail

    def reading(self) -> str:
        """One paragraph that says what was decided and with which numbers (generated, never hand-written)."""
        k, n = self.counts, len(self.results)
        seeds = sorted({r.n for r in self.results if r.n})
        seeds_txt = f"{seeds[0]}" if len(seeds) == 1 else (f"{seeds[0]}-{seeds[-1]}" if seeds else "no")
        state = (f"gets **{NO_VERDICT}** at this scale ({self.reason}); for information only: of"
                 if self.label == NO_VERDICT else f"is **{self.label}** at this scale: of")
        text = (f"{self.claim.id} ({self.claim.text}; {self.claim.source}) {state} "
                f"{n} primary comparison{'s' * (n != 1)}, {k['supported']} supported, {k['contradicted']} "
                f"contradicted and {k['not resolved']} not resolved (paired over {seeds_txt} seed{'s' * (seeds_txt != '1')}, Student t, "
                f"Holm-Bonferroni at α = {self.alpha:g}).")
        text += f" Read as: {self.claim.how}." if self.claim.how else ""
        decided = [r for r in self.results if r.label != "not resolved"]
        if decided:
            text += " Decided: " + "; ".join(_short(r) for r in decided) + "."
        open_ = [r for r in self.results if r.label == "not resolved" and math.isfinite(r.mde)]
        if open_:
            means, mdes = [r.mean for r in open_], [r.mde for r in open_]
            span = lambda xs, sign: (_f(xs[0], sign) if len(xs) == 1  # noqa: E731
                                     else f"{_f(min(xs), sign)} to {_f(max(xs), sign)}")
            what = ("prove equivalence within about" if all(r.comparison.direction == "equivalent" for r in open_)
                    else "detect about")
            text += (f" The {len(open_)} not resolved had mean differences of {span(means, True)}; with their seed "
                     f"noise they could {what} {span(mdes, False)} with {self.power:.0%} power.")
        other = [r for r in self.results if r.label == "not resolved" and not math.isfinite(r.mde)]
        if other:
            text += " Not testable: " + "; ".join(f"{r.comparison.name} ({r.reason})" for r in other) + "."
        if self.secondary:
            ks = {lab: sum(r.label == lab for r in self.secondary) for lab in LABELS}
            text += (f" Secondary comparisons (reported, not deciding; their own Holm family): {ks['supported']} "
                     f"supported, {ks['contradicted']} contradicted, {ks['not resolved']} not resolved of "
                     f"{len(self.secondary)}.")
        lost = [r for r in self.results + self.secondary if r.note]
        if lost:
            text += " Seeds dropped: " + "; ".join(f"{r.comparison.name}: {r.note}" for r in lost) + "."
        if self.claim.not_covered:
            text += f" Not decided by this rule: {self.claim.not_covered}."
        return text


def _f(x: float, sign: bool = True) -> str:
    return "nan" if not math.isfinite(x) else (f"{x:+.3f}" if sign else f"{x:.3f}")


def _short(r: ComparisonResult) -> str:
    return (f"{r.comparison.name} {r.label} ({_f(r.mean)}, {r.ci_level:.1%} CI [{_f(r.ci_low)}, {_f(r.ci_high)}], "
            f"p adj {r.p_adj:.3f}, n {r.n})")


def _md_row(r: ComparisonResult) -> dict:
    ci = (f"[{_f(r.ci_low)}, {_f(r.ci_high)}] ({r.ci_level:.1%})" if math.isfinite(r.ci_level) else "-")
    return {"comparison": r.comparison.name.replace("|", "\\|"), "primary": "yes" if r.comparison.primary else "no",
            "n": r.n, "mean A − B": _f(r.mean), "CI (Holm level)": ci,
            "p adj": f"{r.p_adj:.3f}" if math.isfinite(r.p_adj) else "-",
            "MDE": _f(r.mde, sign=False) if math.isfinite(r.mde) else "-", "label": r.label,
            "note": "; ".join(x for x in (r.comparison.note, r.note, r.reason if not math.isfinite(r.p_adj) else "")
                              if x).replace("|", "\\|")}


def decide(claim: Claim, table, *, alpha: float = ALPHA, power: float = POWER,
           learning=None) -> ClaimVerdict:
    """Decide one :class:`Claim` on a per-seed ``table`` by the rule of this module (:func:`bilevel_ssl.claims.decide`
    takes a claim id).  Raises if none of the claim's runs is in the table (the wrong table, not a result).

    ``learning``: the notebook's :class:`bilevel_ssl.protocol.LearningCheck`.  When it failed for a base this
    claim compares (a base objective's 5-NN is not 0.10 above the untrained network's;
    :meth:`~bilevel_ssl.protocol.LearningCheck.restricted`), every comparison is still computed and shown, but the
    claim's label is :data:`NO_VERDICT` with the check's reason: a comparison against a base that has not learned is not
    evidence about the method (issue #25)."""
    c = claim
    data = _normalise(table)
    present = {run for run, _ in data.values}
    if not c.runs & present:
        raise ValueError(f"{c.id}: none of its runs is in the table (expected e.g. {sorted(c.runs)[:3]}, "
                         f"found e.g. {sorted(present)[:3]})")
    primary = [_pair(data, k) for k in c.primary]
    secondary = [_pair(data, k) for k in c.secondary]
    _decide_family(primary, alpha, power)
    _decide_family(secondary, alpha, power)
    k = {lab: sum(r.label == lab for r in primary) for lab in LABELS}
    tested = sum(math.isfinite(r.p) for r in primary)
    if k["supported"] and not k["contradicted"]:
        label, reason = "supported", (f"{k['supported']} of {len(primary)} primary comparisons supported, "
                                      "none contradicted")
    elif k["contradicted"] and not k["supported"]:
        label, reason = "contradicted", (f"{k['contradicted']} of {len(primary)} primary comparisons contradicted, "
                                         "none supported")
    elif k["supported"]:
        label, reason = "not resolved", (f"mixed: {k['supported']} of {len(primary)} primary comparisons supported "
                                         f"and {k['contradicted']} contradicted")
    elif tested:
        label, reason = "not resolved", (f"no primary comparison decided after Holm ({tested} of {len(primary)} "
                                         "testable)")
    else:
        label, reason = "not resolved", "no primary comparison has 2 usable paired seeds"
    if learning is not None and not (gate := learning.restricted(c.runs)).ok:  # the bases this claim compares
        label, reason = NO_VERDICT, f"{gate.reason()}; the comparisons alone would say: {label}, {reason}"
    return ClaimVerdict(c, label, reason, primary, secondary, alpha, power)


def verdict_table(verdicts, comparisons: bool = False) -> pd.DataFrame:
    """One row per claim (label, counts, reason), or with ``comparisons=True`` one row per comparison."""
    verdicts = list(verdicts.values()) if isinstance(verdicts, dict) else list(verdicts)
    if comparisons:
        return pd.concat([v.table() for v in verdicts], ignore_index=True)
    return pd.DataFrame([{"claim": v.claim.id, "source": v.claim.source, "label": v.label, **v.counts,
                          "primary": len(v.results), "reason": v.reason} for v in verdicts]).set_index("claim")


def markdown_table(frame: pd.DataFrame, digits: int = 3) -> str:
    """A DataFrame as a Markdown table, floats rounded to ``digits`` (stable text for a notebook cell)."""
    frame = frame.reset_index() if frame.index.name else frame
    cell = lambda v: (f"{v:.{digits}f}" if isinstance(v, (float, np.floating)) and math.isfinite(v)  # noqa: E731
                      else "-" if isinstance(v, (float, np.floating)) else str(v).replace("|", "\\|"))
    lines = ["| " + " | ".join(map(str, frame.columns)) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- notebook helpers

def structure(verdicts) -> str:
    """What of the verdicts is the same on every CPU: the claim ids, the comparison names and the number of paired
    seeds of each (the nbval-checked cells print this; labels and numbers are compared elsewhere, within measured
    tolerances, because float results differ in the last bits across CPU kernel sets)."""
    verdicts = list(verdicts.values()) if isinstance(verdicts, dict) else list(verdicts)
    lines = []
    for v in verdicts:
        lines.append(f"{v.claim.id}: {len(v.results)} primary, {len(v.secondary)} secondary comparisons")
        lines += [f"  {'primary  ' if r.comparison.primary else 'secondary'} {r.comparison.name}: n = {r.n}"
                  for r in v.results + v.secondary]
    return "\n".join(lines)


def summaries(verdicts) -> dict[str, str]:
    """{claim id: "label (reason)"}: the one-line verdicts of ``metrics.json`` ``verdicts`` (outputs/index.md)."""
    verdicts = verdicts.values() if isinstance(verdicts, dict) else verdicts
    return {v.claim.id: f"{v.label} ({v.reason})" for v in verdicts}


def variance_ratio(a, b, *, alpha: float = ALPHA) -> dict:
    """For a spread over seeds, which the paired rule does not cover (R8's seed spread, R10's unstable gains):
    ``var(a) / var(b)`` of two independent samples with its two-sided ``1 − alpha`` F interval.  ``side`` is
    "lower" / "higher" when the interval lies below / above 1, else "not resolved" (also with < 2 values a side)."""
    from scipy.stats import f as f_dist

    a, b = np.asarray(a, float), np.asarray(b, float)
    a, b = a[np.isfinite(a)], b[np.isfinite(b)]
    out = {"std_a": float("nan"), "std_b": float("nan"), "ratio": float("nan"), "lo": float("nan"),
           "hi": float("nan"), "n_a": len(a), "n_b": len(b), "side": "not resolved"}
    if min(len(a), len(b)) < 2:
        return out
    va, vb = float(np.var(a, ddof=1)), float(np.var(b, ddof=1))
    ratio = va / vb if vb > 0 else float("inf")
    lo = ratio / f_dist.ppf(1 - alpha / 2, len(a) - 1, len(b) - 1)
    hi = ratio / f_dist.ppf(alpha / 2, len(a) - 1, len(b) - 1)
    side = "lower" if hi < 1 else "higher" if lo > 1 else "not resolved"
    return {**out, "std_a": va ** 0.5, "std_b": vb ** 0.5, "ratio": ratio, "lo": lo, "hi": hi, "side": side}
