"""The claim rule of bilevel_ssl.claims on synthetic per-seed tables: every branch, Holm's step-down, the error
rates under no effect, and every declared claim R1-R17 decidable from its own declaration."""

import math

import numpy as np
import pandas as pd
import pytest

from bilevel_ssl import claims as C

# Student t quantiles from a printed table (independent of scipy): t(0.975, 4), t(0.8, 4), t(0.975, 1).
T975_4, T80_4, T975_1 = 2.7764451051977987, 0.9409645724372942, 12.706204736174696


def zvec(n, seed=0):
    """A fixed vector with mean 0 and sd (ddof 1) exactly 1."""
    z = np.random.default_rng(seed).normal(size=n)
    z = z - z.mean()
    return z / z.std(ddof=1)


def claim_of(*comparisons, cid="T"):
    return C.Claim(cid, "a test claim", "none", "none", tuple(comparisons))


def pair_table(diffs: dict, base=0.5, seeds=None):
    """{(a, b, metric): d} -> dict table with B = base + small jitter and A = B + d, paired by seed (each run in
    one pair only)."""
    runs = [r for a, b, _ in diffs for r in (a, b)]
    assert len(runs) == len(set(runs)), "pair_table: a run in two pairs would be overwritten"
    table = {}
    for (a, b, metric), d in diffs.items():
        d = np.asarray(d, dtype=float)
        s = list(range(len(d))) if seeds is None else seeds
        bv = base + 0.01 * zvec(len(d), seed=7) if len(d) > 1 else np.full(len(d), base)
        table.setdefault(b, {})[metric] = dict(zip(s, bv))
        table.setdefault(a, {})[metric] = dict(zip(s, bv + d))
    return table


CMP = C.Comparison("A", "B", "m")


def test_supported_and_contradicted():
    up = C.decide(claim_of(CMP), pair_table({("A", "B", "m"): 0.1 + 0.02 * zvec(5)}))
    r = up.results[0]
    assert (up.label, r.label) == ("supported", "supported")
    assert r.n == 5 and r.mean == pytest.approx(0.1) and r.ci_low > 0
    down = C.decide(claim_of(CMP), pair_table({("A", "B", "m"): -0.1 + 0.02 * zvec(5)}))
    assert (down.label, down.results[0].label) == ("contradicted", "contradicted")
    assert down.results[0].ci_high < 0


def test_less_direction():
    cmp = C.Comparison("A", "B", "time", "less")
    assert C.decide(claim_of(cmp), pair_table({("A", "B", "time"): -1.0 + 0.1 * zvec(5)})).label == "supported"
    assert C.decide(claim_of(cmp), pair_table({("A", "B", "time"): 1.0 + 0.1 * zvec(5)})).label == "contradicted"


def test_ci_and_mde_against_hand_formula():
    d = [0.1, 0.3, 0.2, 0.4, 0.0]  # mean 0.2, sd sqrt(0.025)
    r = C.decide(claim_of(CMP), pair_table({("A", "B", "m"): d})).results[0]
    se = math.sqrt(0.025) / math.sqrt(5)
    assert r.ci_level == pytest.approx(0.95)  # one comparison: the ordinary 95% interval
    assert (r.ci_low, r.ci_high) == pytest.approx((0.2 - T975_4 * se, 0.2 + T975_4 * se), abs=1e-9)
    assert r.mde == pytest.approx((T975_4 + T80_4) * se, rel=1e-6)
    assert r.label == "supported"  # 0.2 / se = 2.83 > 2.78


def test_not_resolved_reports_mde_above_true_effect():
    true = 0.01
    v = C.decide(claim_of(CMP), pair_table({("A", "B", "m"): true + 0.05 * zvec(5)}))
    r = v.results[0]
    assert (v.label, r.label) == ("not resolved", "not resolved")
    assert r.ci_low < 0 < r.ci_high
    assert r.mde > 0.05 > true  # the run could only have seen an effect several times larger
    assert f"{r.mde:.3g}" in r.reason
    assert f"{r.mde:.3f}" in v.reading()


def test_exactly_two_seeds_uses_one_degree_of_freedom():
    r = C.decide(claim_of(CMP), pair_table({("A", "B", "m"): [0.1, 0.3]})).results[0]
    assert r.n == 2
    assert (r.ci_low, r.ci_high) == pytest.approx((0.2 - T975_1 * 0.1, 0.2 + T975_1 * 0.1), abs=1e-9)
    assert r.label == "not resolved"


@pytest.mark.parametrize("table", [pair_table({("A", "B", "m"): [0.3]}),  # one seed
                                   {"A": {"m": {0: 0.6}}, "B": {"m": {1: 0.5}}}],  # no common seed
                         ids=["one seed", "no common seed"])
def test_fewer_than_two_seeds(table):
    v = C.decide(claim_of(CMP), table)
    r = v.results[0]
    assert r.label == "not resolved" and "fewer than 2" in r.reason and math.isnan(r.p_adj)
    assert v.label == "not resolved" and "2 usable" in v.reason


def long_table(a, b, metric="m", diverged_a=(), diverged_b=()):
    rows = [{"run": run, "seed": s, "metric": metric, "value": v, "diverged": s in div}
            for run, vals, div in (("A", a, diverged_a), ("B", b, diverged_b)) for s, v in enumerate(vals)]
    return pd.DataFrame(rows)


def test_diverged_seed_is_dropped_and_reported():
    b = 0.5 + 0.01 * zvec(5, 3)
    a = b + 0.1 + 0.02 * zvec(5)
    r = C.decide(claim_of(CMP), long_table(a, b, diverged_a=(2,))).results[0]
    keep = [0, 1, 3, 4]
    assert r.n == 4 and r.seeds == tuple(keep)
    assert r.mean == pytest.approx(float(np.mean((a - b)[keep])))
    assert r.dropped == {2: "A diverged"} and (r.unusable_a, r.unusable_b) == (1, 0)
    assert "lost more seeds than B" in r.note
    # the same flag given as a "diverged" metric row instead of a column
    t = long_table(a, b).drop(columns="diverged")
    t = pd.concat([t, pd.DataFrame([{"run": "A", "seed": 2, "metric": "diverged", "value": 1.0}])])
    assert C.decide(claim_of(CMP), t).results[0].seeds == tuple(keep)


def test_nan_and_inf_are_dropped_not_decided():
    b = list(0.5 + 0.01 * zvec(5, 3))
    a = [x + 0.1 for x in b]
    b[1], a[3] = float("nan"), float("inf")
    v = C.decide(claim_of(CMP), long_table(a, b))
    r = v.results[0]
    assert r.n == 3 and r.dropped == {1: "B non-finite", 3: "A non-finite"}
    assert "lost more" not in r.note and "non-finite" in v.reading()
    assert math.isfinite(r.mean)


def test_seed_on_one_side_only_and_duplicates():
    t = pair_table({("A", "B", "m"): 0.1 + 0.02 * zvec(5)})
    t["A"]["m"][9] = 0.7
    r = C.decide(claim_of(CMP), t).results[0]
    assert r.n == 5 and r.dropped == {9: "B has no seed 9"} and "one side only: 9" in r.note
    dup = long_table([0.1, 0.2], [0.1, 0.1])
    with pytest.raises(ValueError, match="two values"):
        C.decide(claim_of(CMP), pd.concat([dup, dup.iloc[:1]]))


def test_missing_run_is_reported_and_left_out_of_holm():
    other = C.Comparison("A", "Z", "m")
    v = C.decide(claim_of(CMP, other), pair_table({("A", "B", "m"): 0.1 + 0.02 * zvec(5)}))
    r, miss = v.results
    assert miss.label == "not resolved" and "not in the table: Z / m" in miss.reason
    assert r.ci_level == pytest.approx(0.95) and v.label == "supported"
    with pytest.raises(ValueError, match="none of its runs"):
        C.decide(claim_of(CMP), {"X": {"m": [1, 2]}})


def test_holm_adjusted_values():
    assert C.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert C.holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])


def diff_with_p(p, n=5, sd=0.05):
    """Differences whose two-sided paired t p-value is exactly p (positive mean)."""
    from scipy import stats
    se = sd / math.sqrt(n)
    return stats.t.isf(p / 2, n - 1) * se + sd * zvec(n)


def test_holm_step_down():
    x = C.Comparison("A", "B", "m")
    alone = C.decide(claim_of(x), pair_table({("A", "B", "m"): diff_with_p(0.03)})).results[0]
    assert alone.p == pytest.approx(0.03) and alone.label == "supported"
    nulls = {(f"X{i}", f"N{i}", "m"): diff_with_p(0.6) for i in range(2)}
    crowd = claim_of(x, *(C.Comparison(f"X{i}", f"N{i}", "m") for i in range(2)))
    t = pair_table({("A", "B", "m"): diff_with_p(0.03), **nulls})
    r = C.decide(crowd, t).results[0]
    assert r.p_adj == pytest.approx(0.09) and r.label == "not resolved"  # 3 x 0.03: passes alone, not after Holm
    assert r.ci_low < 0 < r.ci_high
    strong = {(f"X{i}", f"N{i}", "m"): diff_with_p(1e-4) for i in range(2)}
    r = C.decide(crowd, pair_table({("A", "B", "m"): diff_with_p(0.03), **strong})).results[0]
    assert r.p_adj == pytest.approx(0.03) and r.label == "supported"  # step-down: Bonferroni would say 0.09
    assert r.ci_low > 0 and r.ci_level == pytest.approx(0.95)  # Holm's last step is tested at alpha
    v = C.decide(crowd, pair_table({("A", "B", "m"): diff_with_p(0.03), **strong}))
    # the two strong ones tie at p 1e-4: the first step is at alpha / 3 and the second inherits its adjusted p
    assert [x.ci_level for x in v.results[1:]] == pytest.approx([1 - 0.05 / 3] * 2)


def test_interval_agrees_with_every_decision():
    """Step 4 of the rule: at the Holm level a directional comparison is decided exactly when its CI excludes 0,
    an equivalence one is supported exactly when its CI is inside (−δ, δ) and contradicted when wholly outside."""
    rng = np.random.default_rng(5)
    comps = [C.Comparison(f"A{i}", f"B{i}", "m", d, margin=0.5 if d == "equivalent" else 0.0)
             for i, d in enumerate(["greater", "less", "equivalent"] * 3)]
    seen = set()
    for _ in range(300):
        table = {}
        for c in comps:
            eq = c.direction == "equivalent"
            b = rng.normal(size=4)
            table[c.b] = {"m": list(b)}
            table[c.a] = {"m": list(b + rng.normal(0, 0.5 if eq else 1) + (0.1 if eq else 0.6) * rng.normal(size=4))}
        for r in C.decide(claim_of(*comps), table).results:
            lo, hi, d = r.ci_low, r.ci_high, r.comparison.margin
            if r.comparison.direction == "equivalent":
                assert (r.label == "supported") == (-d < lo and hi < d)
                assert (r.label == "contradicted") == (lo > d or hi < -d)
            else:
                assert (r.label != "not resolved") == (lo > 0 or hi < 0)
            seen.add((r.comparison.direction, r.label))
    assert len(seen) == 9  # every direction met every label


def test_mixed_claim_is_not_resolved():
    other = C.Comparison("D", "C", "m")
    t = pair_table({("A", "B", "m"): 0.1 + 0.02 * zvec(5), ("D", "C", "m"): -0.1 + 0.02 * zvec(5)})
    v = C.decide(claim_of(CMP, other), t)
    assert [r.label for r in v.results] == ["supported", "contradicted"]
    assert v.label == "not resolved" and v.reason.startswith("mixed")


def test_secondary_never_decides_the_claim():
    sec = C.Comparison("D", "C", "m", primary=False)
    t = pair_table({("A", "B", "m"): 0.01 + 0.05 * zvec(5), ("D", "C", "m"): -0.1 + 0.02 * zvec(5)})
    v = C.decide(claim_of(CMP, sec), t)
    assert v.secondary[0].label == "contradicted" and v.label == "not resolved"


def test_equivalence_margin():
    eq = C.Comparison("A", "B", "m", "equivalent", margin=0.04)
    inside = C.decide(claim_of(eq), pair_table({("A", "B", "m"): 0.005 + 0.005 * zvec(5)}))
    assert inside.label == "supported" and -0.04 < inside.results[0].ci_low < inside.results[0].ci_high < 0.04
    outside = C.decide(claim_of(eq), pair_table({("A", "B", "m"): -0.12 + 0.005 * zvec(5)}))
    assert outside.label == "contradicted" and outside.results[0].ci_high < -0.04
    noisy_v = C.decide(claim_of(eq), pair_table({("A", "B", "m"): 0.0 + 0.05 * zvec(5)}))
    noisy = noisy_v.results[0]
    assert noisy.label == "not resolved" and noisy.mde > 0.04  # this run cannot show a 0.04 margin
    assert f"prove equivalence within about {noisy.mde:.3f}" in noisy_v.reading()


def test_no_effect_error_rates_over_many_claims():
    """1000 claims x 15 comparisons, 5 seeds, no true effect: Holm keeps false decisions per claim <= 5%."""
    rng = np.random.default_rng(2026)
    comps = tuple(C.Comparison(f"A{i}", f"B{i}", "m", "greater" if i % 2 else "less") for i in range(15))
    claim = claim_of(*comps)
    labels, naive = [], 0
    for _ in range(1000):
        x = rng.normal(size=(2, 15, 5))
        table = {f"{side}{i}": {"m": list(x[k, i])} for k, side in enumerate("AB") for i in range(15)}
        v = C.decide(claim, table)
        labels.append(v.label)
        naive += any(r.p < 0.05 for r in v.results)
    rate = {lab: labels.count(lab) / len(labels) for lab in C.LABELS}
    assert rate["contradicted"] <= 0.05 and rate["supported"] <= 0.05
    assert naive / len(labels) > 0.4  # without the correction most claims would decide something


def synthetic(claim: C.Claim, flip=False, n=6):
    """Per-seed table in which every declared comparison holds (or, with flip, is reversed)."""
    runs = sorted(claim.runs)
    metrics = sorted({c.metric for c in claim.comparisons})
    rng = np.random.default_rng(0)
    table = {r: {} for r in runs}
    for m in metrics:
        cs = [c for c in claim.comparisons if c.metric == m]
        score = dict.fromkeys(runs, 0)
        for _ in range(len(runs)):
            for c in cs:
                if c.direction == "greater":
                    score[c.a] = max(score[c.a], score[c.b] + 1)
                elif c.direction == "less":
                    score[c.b] = max(score[c.b], score[c.a] + 1)
        shared = rng.normal(0, 0.01, n)  # seed effect common to all runs: what pairing removes
        for r in runs:
            off = (-score[r] if flip else score[r]) * 0.05
            if flip and any(c.direction == "equivalent" and c.a == r and c.metric == m for c in cs):
                off += 3 * max(c.margin for c in cs)
            table[r][m] = list(0.5 + off + shared + rng.normal(0, 0.002, n))
    return table


@pytest.mark.parametrize("cid", list(C.CLAIMS))
def test_every_claim_decidable_from_its_declaration(cid):
    claim = C.CLAIMS[cid]
    v = C.decide(cid, synthetic(claim))
    assert v.label == "supported" and all(r.label == "supported" for r in v.results + v.secondary)
    assert all(r.n == 6 for r in v.results)
    w = C.decide(cid, synthetic(claim, flip=True))
    assert w.label == "contradicted" and all(r.label == "contradicted" for r in w.results)
    md = v.markdown()
    assert md.count("\n| ") == len(claim.comparisons) + 1 and f"**{cid}**" in md
    assert v.reading().startswith(f"{cid} (") and "**supported**" in v.reading()


def test_declarations():
    assert list(C.CLAIMS) == [f"R{i}" for i in range(1, 18)]
    for c in C.CLAIMS.values():
        assert c.primary and c.source and c.text and c.notebook
        assert len(set(c.comparisons)) == len(c.comparisons)
    assert C.mcr_table6_margin() == pytest.approx((93.91 - 90.08) / 100)
    assert all(c.margin == C.mcr_table6_margin() for c in C.CLAIMS["R16"].comparisons)
    assert f"±{C.mcr_table6_margin():g}" in C.CLAIMS["R16"].how
    tab = C.claims_table()
    assert len(tab) == sum(len(c.comparisons) for c in C.CLAIMS.values())
    assert set(tab.direction) == {">", "<", "≈"}


def test_from_wide_names_and_diverged():
    runs = pd.DataFrame({"sweep": ["mu", "mu", "mu", "mu"], "value": [0.7, 0.7, 1.0, 1.0],
                         "method": ["+GeSSL"] * 4, "seed": [0, 1, 0, 1], "linear_acc": [0.8, 0.7, 0.6, float("nan")],
                         "diverged": [0.0, 0.0, 0.0, 1.0]})
    long = C.from_wide(runs, ["sweep", "value", "method"], ["linear_acc"])
    assert sorted(set(long.run)) == ["mu 0.7 +GeSSL", "mu 1 +GeSSL"]
    assert long.diverged.tolist() == [False, False, False, True]
    named = C.from_wide(runs, lambda r: f"{r.sweep}={r.value:g} {r.method}", {"linear_acc": "lin"})
    assert set(named.run) == {"mu=0.7 +GeSSL", "mu=1 +GeSSL"} and set(named.metric) == {"lin"}
    r = C.decide(claim_of(C.Comparison("mu=0.7 +GeSSL", "mu=1 +GeSSL", "lin")), named).results[0]
    assert r.n == 1 and r.dropped == {1: "B diverged"}


def test_rendering_is_rounded_and_stable():
    v = C.decide(claim_of(CMP), pair_table({("A", "B", "m"): [0.1, 0.3, 0.2, 0.4, 0.0]}))
    md = v.markdown()
    assert "| A > B: m | yes | 5 | +0.200 | [+0.004, +0.396] (95.0%) |" in md
    assert md == v.markdown()
    summary = C.verdict_table([v])
    assert summary.loc["T", "label"] == "supported" and summary.loc["T", "supported"] == 1
    per = C.verdict_table({"T": v}, comparisons=True)
    assert per.loc[0, "mean"] == pytest.approx(0.2) and per.loc[0, "label"] == "supported"
    text = C.markdown_table(per[["comparison", "mean", "ci_low", "p_adj"]])
    assert "| A > B: m | 0.200 | 0.004 |" in text
    assert v.as_dict()["comparisons"][0]["n"] == 5


def notebook_frames():
    """Per-seed frames shaped as the default-profile notebooks build them (columns and labels from their code),
    turned into long tables by the calls of claims.NOTEBOOK_TABLES."""
    rng = np.random.default_rng(1)

    def frame(keys, metrics, seeds):
        rows = [{**k, "seed": s, **{m: rng.uniform(0.2, 0.8) for m in metrics}, "diverged": 0.0}
                for k in keys for s in seeds]
        return pd.DataFrame(rows)

    bases, s5, s3 = ["simclr", "byol", "barlow_twins"], range(5), range(3)
    nb10_m = ["linear_acc", "knn_acc", "fewshot_5w1s_acc", "fewshot_5w5s_acc", "S", "S_disc", "S_gen", "S_trans"]
    nb10 = frame([{"base": b, "method": m} for b in bases for m in ("base", "+GeSSL", "base, equal time")], nb10_m, s5)
    sweeps = ([("base", "-", "base")] + [("mu", v, "+GeSSL") for v in (0.0, 0.7, 1.0)]
              + [("k", v, "+GeSSL") for v in (10.0, 30.0, 50.0)]
              + [("n", v, m) for v in (16, 32, 64) for m in ("+GeSSL", "base")]
              + [("m", v, "+GeSSL") for v in (4, 8, 16, 32)])
    nb11 = frame([{"sweep": a, "value": v, "method": m} for a, v, m in sweeps], ["linear_acc", "knn_acc"], s3)
    scores = ["silhouette_test", "davies_bouldin_test", "silhouette_novel", "davies_bouldin_novel"]
    nb12 = frame([{"base": b, "method": m} for b in bases for m in ("base", "+GeSSL μ=0", "+GeSSL")], scores, s3)
    acc = ["linear_acc", "knn_acc", "fewshot_5w1s_acc", "fewshot_5w5s_acc"]
    nb13 = frame([{"group": "base", "label": "simclr"}]
                 + [{"group": "variant", "label": v} for v in ("bilevel", "joint", "per_task")]
                 + [{"group": "engine", "label": e} for e in ("second_order", "first_order", "aid_fd", "aid_cg",
                                                              "aid_neumann", "momentum_proxy")],
                 acc + ["train_s_per_epoch"], s3)
    nb14_m = ["linear_acc", "knn_acc", "grad_norm_mean", "grad_norm_var", "train_s_per_epoch"]
    nb14 = frame([{"method": m} for m in ("base", "+GeSSL second_order", "+GeSSL aid_fd")], nb14_m, s5)
    nb20 = frame([{"label": x} for x in ("simclr", "simclr+T", "simclr+T pcgrad", "simclr+TC2")],
                 acc + ["mean_cos", "conflict_steps"], s5)
    n_f = lambda r: f"{r:g}d"  # noqa: E731  as notebook 21
    nb21 = frame([{"group": "base", "label": "simclr"}, {"group": "tc2", "label": "full"}]
                 + [{"group": "ablation", "label": v} for v in ("no_lv", "no_lw", "no_lv_lw", "no_bilevel")]
                 + [{"group": "n_tasks", "label": str(n)} for n in (2, 4, 8, 16)]
                 + [{"group": "n_f", "label": n_f(r)} for r in (0.25, 0.5, 1.0, 2.0)]
                 + [{"group": "lambda_s", "label": f"{x:g}"} for x in (0.001, 0.01, 0.1, 1.0)], acc, s3)
    arms = ["bissl_top1", "only_ft_top1", "bissl_top5", "only_ft_top5"]
    main_rows = frame([{"task": t, "epochs": 10} for t in ("digits", "heldout")], arms, s3)
    dur_rows = frame([{"task": "digits", "epochs": e} for e in (3, 10, 20)], arms, s3)
    nb40 = frame([{"group": "R15", "base": b, "label": x} for b in bases for x in ("base", "+MCR")]
                 + [{"group": "R16", "base": "simclr", "label": f"{l1:g}|{l2:g}"}
                    for l1 in (0.001, 0.01, 0.1) for l2 in (0.1, 1.0)]
                 + [{"group": "R17", "base": b, "label": x} for b in bases  # fusion_base: any of them
                    for x in ("M(h)", "M(z)", "mixup 0.5", "no bi-level")],
                 ["linear_acc", "knn_acc"], s3)
    base = "simclr"
    # the calls of claims.NOTEBOOK_TABLES, with each notebook's names
    env = {"runs": None, "pd": pd, "from_wide": C.from_wide, "base": base, "METRICS": None}
    spec = {"10_gessl_universality": (nb10, {"METRICS": nb10_m}),
            "11_gessl_sensitivity": (nb11, {"CLAIM_METRICS": ["linear_acc", "knn_acc"]}),
            "12_gessl_tsne": (nb12, {"SCORES": dict.fromkeys(scores)}),
            "13_gessl_bilevel_ablation": (nb13, {"METRICS": acc}),
            "14_gessl_efficiency_stability": (nb14, {"METRICS": nb14_m}),
            "20_tc2_gradient_conflict": (nb20, {"ACC": acc}),
            "21_tc2_ablation": (nb21, {"METRICS": acc}),
            "30_bissl": (None, {"main_rows": main_rows.to_dict("records"), "dur_rows": dur_rows.to_dict("records")}),
            "40_mcr": (nb40, {"ACC": ["linear_acc", "knn_acc"]})}
    out = {}
    for nb, (runs, names) in spec.items():
        out[nb] = eval(C.NOTEBOOK_TABLES[nb], {**env, "runs": runs, **names})  # noqa: S307  our own snippet
    return out


def test_notebook_tables_name_every_declared_run():
    tables = notebook_frames()
    assert set(tables) == {c.notebook for c in C.CLAIMS.values()}
    for cid, claim in C.CLAIMS.items():
        v = C.decide(cid, tables[claim.notebook])
        missing = [r.reason for r in v.results + v.secondary if "not in the table" in r.reason]
        assert not missing, (cid, missing)
        assert all(r.n >= 3 for r in v.results), cid


def test_decide_notebook_structure_and_summaries():
    """The notebook helpers: every claim of a notebook, the CPU-stable structure text, the one-line summaries."""
    tables = notebook_frames()
    vs = C.decide_notebook("10_gessl_universality", tables["10_gessl_universality"])
    assert list(vs) == [cid for cid, c in C.CLAIMS.items() if c.notebook == "10_gessl_universality"]
    text = C.structure(vs)
    assert "R1: 6 primary, 6 secondary comparisons" in text
    assert "simclr +GeSSL > simclr base: linear_acc: n = 5" in text
    assert not any(lab in text for lab in C.LABELS)  # no label: it may differ across CPUs
    summary = C.summaries(vs)
    assert set(summary) == set(vs) and all(s.startswith(vs[k].label) for k, s in summary.items())


def test_variance_ratio():
    r = C.variance_ratio([0.0, 0.01, 0.02, 0.0, 0.01], [0.0, 1.0, 2.0, 0.5, 1.5])
    assert r["side"] == "lower" and r["hi"] < 1 and r["lo"] < r["ratio"] < r["hi"]
    assert C.variance_ratio([1.0], [1.0, 2.0])["side"] == "not resolved"
