"""Every paper claim R1-R17 of ``shared/paper-claims.md``, declared once: the runs each compares, the metric, the
claimed direction, primary or secondary, and how the paper's words became these comparisons (``Claim.how``) and
what they leave out (``Claim.not_covered``).  Runs are named by their key in the notebook's ``metrics.json``
``results`` (e.g. ``"simclr +GeSSL"`` in notebook 10, ``"mu=0.7 +GeSSL"`` in notebook 11, ``"variant bilevel"`` in
notebook 13); :data:`CLAIMS` uses the runs of the default profiles, so a smaller profile shows the runs it lacks as
"not in the table".  :data:`NOTEBOOK_TABLES` says how each notebook builds its per-seed table.

The rule that decides a claim (pairing by seed, Student t, Holm-Bonferroni, minimum detectable effect, labels) is
:mod:`bilevel_ssl.rule`; its public names are re-exported here, so ``claims.decide("R1", table)``,
``claims.from_wide`` and ``claims.ClaimVerdict`` are the notebooks' one import.
"""

from __future__ import annotations

import pandas as pd

from .rule import (ALPHA, DIRECTIONS, LABELS, NO_VERDICT, POWER, Claim, ClaimVerdict, Comparison,  # noqa: F401
                   ComparisonResult, from_wide, holm, markdown_table, structure, summaries, variance_ratio,
                   verdict_table)
from .rule import decide as decide_claim

def _each(pairs, metrics, direction="greater", primary=True, **kw) -> list[Comparison]:
    return [Comparison(a, b, m, direction, primary, **kw) for a, b in pairs for m in metrics]


BASES = ("simclr", "byol", "barlow_twins")  # the three bases of GeSSL Table 6 and MCR Table 1 run here
ACC2 = ("linear_acc", "knn_acc")
ACC3 = ("linear_acc", "knn_acc", "fewshot_5w5s_acc")
ENGINES_ALL = ("second_order", "first_order", "aid_cg", "aid_neumann", "momentum_proxy")
ENGINES_G = ("second_order", "aid_cg", "aid_neumann")  # the engines that give GeSSL's g a gradient

# MCR Table 6 (SimCLR+, ResNet-18, CIFAR-10, top-1 %): rows lambda1, columns lambda2, both 0.001, 0.01, 0.1, 1.
MCR_TABLE6 = {0.001: (91.79, 92.13, 92.77, 91.75), 0.01: (92.56, 91.89, 93.91, 91.11),
              0.1: (93.35, 92.23, 92.35, 90.78), 1.0: (93.03, 91.26, 92.77, 90.08)}
MCR_DEFAULT = (0.01, 0.1)  # the Table 6 cell the notebook trains as "+MCR" (its best)


def mcr_table6_margin() -> float:
    """R16's equivalence margin, as an accuracy fraction: the largest distance of any Table 6 cell from the
    default cell, i.e. the variation the MCR paper itself calls "minimal" (93.91 − 90.08 points)."""
    lam2 = (0.001, 0.01, 0.1, 1.0)
    ref = MCR_TABLE6[MCR_DEFAULT[0]][lam2.index(MCR_DEFAULT[1])]
    return round(max(abs(v - ref) for row in MCR_TABLE6.values() for v in row) / 100, 6)


R16_CELLS = [(l1, l2) for l1 in (0.001, 0.01, 0.1) for l2 in (0.1, 1.0)]  # notebook 40's default grid


def _r16() -> list[Comparison]:
    ref = f"R16 simclr {MCR_DEFAULT[0]:g}|{MCR_DEFAULT[1]:g}"
    cells = [f"R16 simclr {l1:g}|{l2:g}" for l1, l2 in R16_CELLS if (l1, l2) != MCR_DEFAULT]
    return _each([(c, ref) for c in cells], ACC2, "equivalent", margin=mcr_table6_margin())


CLAIMS: dict[str, Claim] = {c.id: c for c in [
    Claim("R1", "adding GeSSL improves its base on linear and 5-NN accuracy", "GeSSL Table 6 (and 1)",
          "10_gessl_universality", tuple(
              _each([(f"{b} +GeSSL", f"{b} base") for b in BASES], ACC2)
              + _each([(f"{b} +GeSSL", f"{b} base, equal time") for b in BASES], ACC2, primary=False,
                      note="the base trained for about the +GeSSL run's wall-clock (equal_time_epochs), not its epochs")),
          how="at equal epochs (the paper's protocol); at equal training time secondary"),
    Claim("R2", "μ ≈ 0.7 and k ≈ 30 are the best settings", "GeSSL Fig. 3-4", "11_gessl_sensitivity", tuple(
        _each([("mu=0.7 +GeSSL", "mu=1 +GeSSL"), ("k=30 +GeSSL", "k=10 +GeSSL"), ("k=30 +GeSSL", "k=50 +GeSSL")], ACC2)
        + _each([("mu=0.7 +GeSSL", "mu=0 +GeSSL")], ACC2, primary=False,
                note="μ = 0 switches L_disc off, outside the range 0.3-1 the paper searched")),
          how="'best' = the paper's value beats each other swept value within the range the paper searched",
          not_covered="values between the swept ones"),
    Claim("R3", "L_disc gives sharper class clusters", "GeSSL Fig. 8", "12_gessl_tsne", tuple(
        _each([(f"{b} +GeSSL", f"{b} +GeSSL μ=0") for b in BASES], ["silhouette_test"])
        + _each([(f"{b} +GeSSL", f"{b} +GeSSL μ=0") for b in BASES], ["davies_bouldin_test"], "less")
        + _each([(f"{b} +GeSSL", f"{b} +GeSSL μ=0") for b in BASES], ["silhouette_novel"], primary=False)
        + _each([(f"{b} +GeSSL", f"{b} +GeSSL μ=0") for b in BASES], ["davies_bouldin_novel"], "less", False)),
          how="sharper = higher silhouette and lower Davies-Bouldin of the base-class test features, with L_disc "
              "(μ = 0.7) against the same GeSSL without it (μ = 0)",
          not_covered="the t-SNE pictures themselves"),
    Claim("R4", "bilevel beats one-stage joint optimisation and a separate f′ per task", "GeSSL Fig. 11",
          "13_gessl_bilevel_ablation",
          tuple(_each([("variant bilevel", "variant joint"), ("variant bilevel", "variant per_task")], ACC3))),
    Claim("R5", "AID with finite differences is the best hypergradient implementation", "GeSSL App. G.4",
          "13_gessl_bilevel_ablation", tuple(
              _each([("engine aid_fd", f"engine {e}") for e in ENGINES_ALL], ACC3)
              + _each([("engine aid_fd", f"engine {e}") for e in ENGINES_G], ["train_s_per_epoch"], "less", False,
                      note="training time of each seed's run, under the load it was trained with")),
          how="best = more accurate than each other engine (App. G.4 and Fig. 4 judge accuracy); training time "
              "against the engines that also give g a gradient is secondary"),
    Claim("R6", "GeSSL costs less time per epoch than its base", "GeSSL Tables 28-29",
          "14_gessl_efficiency_stability",
          tuple(_each([("+GeSSL second_order", "base"), ("+GeSSL aid_fd", "base")], ["train_s_per_epoch"], "less",
                      note="training time of each seed's run, under the load it was trained with")),
          not_covered="the benchmarked step time and peak memory (one measurement per configuration, no seeds)"),
    Claim("R7", "GeSSL improves few-shot accuracy on class-disjoint tasks", "GeSSL Table 4", "10_gessl_universality",
          tuple(_each([(f"{b} +GeSSL", f"{b} base") for b in BASES], ("fewshot_5w1s_acc", "fewshot_5w5s_acc")))),
    Claim("R8", "GeSSL lowers gradient-norm mean and variance and seed spread", "GeSSL Table 27",
          "14_gessl_efficiency_stability",
          tuple(_each([("+GeSSL second_order", "base"), ("+GeSSL aid_fd", "base")],
                      ("grad_norm_mean", "grad_norm_var"), "less")),
          not_covered="the seed spread: a variance over seeds has no per-seed pairing (the notebook's F test)"),
    Claim("R9", "GeSSL improves universality (σ-measure)", "GeSSL App. F.4, Table 16", "10_gessl_universality",
          tuple(_each([(f"{b} +GeSSL", f"{b} base") for b in BASES], ["S"])
                + _each([(f"{b} +GeSSL", f"{b} base") for b in BASES], ("S_disc", "S_gen", "S_trans"),
                        primary=False)),
          how="universality = the σ-measure S; its three parts are secondary",
          not_covered="the ratio r per epoch (Table 16) is a curve of seed means, not a paired difference"),
    Claim("R10", "splitting a batch into tasks creates inter-task gradient conflict and unstable gains",
          "TC² Fig. 1", "20_tc2_gradient_conflict",
          tuple(_each([("simclr+T", "simclr")], ["conflict_steps"])
                + _each([("simclr+T", "simclr")], ["mean_cos"], "less")),
          how="conflict = more steps with a negative task-gradient cosine and a lower mean cosine than SimCLR "
              "without the split, measured by the same monitor",
          not_covered="'unstable gains' is a claim about the spread of the gains over seeds (the notebook's "
                      "sign count and F test), which a paired mean difference cannot decide"),
    Claim("R11", "TC² improves its base; L_v, L_w and the bilevel update each matter", "TC² Tables 5, 12",
          "21_tc2_ablation", tuple(_each([("tc2 full", "base simclr")] + [
              ("tc2 full", f"ablation {v}") for v in ("no_lv", "no_lw", "no_lv_lw", "no_bilevel")], ACC2)),
          how="'each matters' = the full TC² run beats the run without that part"),
    Claim("R12", "n_t = 4 tasks is best; n_f = d factors is best", "TC² Tables 13, 9", "21_tc2_ablation",
          tuple(_each([("n_tasks 4", f"n_tasks {n}") for n in (2, 8, 16)]
                      + [("n_f 1d", f"n_f {r}d") for r in ("0.25", "0.5", "2")], ACC2)),
          how="'best' = the paper's value beats each other swept value"),
    Claim("R13", "BiSSL + fine-tuning beats fine-tuning alone", "BiSSL Table 1", "30_bissl",
          tuple(_each([(f"{t} bissl", f"{t} only_ft") for t in ("digits", "heldout")], ["top1"])
                + _each([(f"{t} bissl", f"{t} only_ft") for t in ("digits", "heldout")], ["top5"], primary=False))),
    Claim("R14", "the BiSSL gain persists across pretext durations", "BiSSL Fig. 2", "30_bissl",
          tuple(_each([(f"digits {e} epochs bissl", f"digits {e} epochs only_ft") for e in (3, 10, 20)], ["top1"])),
          how="persists = BiSSL + fine-tuning beats fine-tuning alone at each pretext duration"),
    Claim("R15", "MCR improves its base on linear and 5-NN accuracy", "MCR Table 1", "40_mcr",
          tuple(_each([(f"R15 {b} +MCR", f"R15 {b} base") for b in BASES], ACC2))),
    Claim("R16", "MCR is insensitive to λ1, λ2", "MCR Table 6", "40_mcr", tuple(_r16()),
          how=f"insensitive = every other cell of the grid equivalent to the default cell {MCR_DEFAULT} within "
              f"±{mcr_table6_margin():g}, the largest variation from that cell in the paper's own Table 6, which it "
              "calls minimal (Table 6 is linear accuracy; the same margin serves 5-NN)",
          not_covered="cells outside the grid the notebook runs"),
    Claim("R17", "fusion in representation space beats embedding-space and mixup fusion; no-bilevel is worse",
          "MCR Table 7", "40_mcr", tuple(_each([(f"R17 {b} M(h)", f"R17 {b} {x}") for b in BASES
                                                for x in ("M(z)", "mixup 0.5", "no bi-level")], ACC2)),
          how="on the notebook's fusion_base: BYOL in Table 7; SimCLR in the default profile, where BYOL does not "
              "learn (5-NN 0.596 vs untrained 0.634, 20 epochs of Adam, seed 0)"),
]}


def claims_table() -> pd.DataFrame:
    """One row per declared comparison: claim, source, notebook, A, direction, B, metric, primary, margin."""
    return pd.DataFrame([{"claim": c.id, "source": c.source, "notebook": c.notebook, "a": k.a,
                          "direction": DIRECTIONS[k.direction], "b": k.b, "metric": k.metric, "primary": k.primary,
                          "margin": k.margin if k.direction == "equivalent" else float("nan")}
                         for c in CLAIMS.values() for k in c.comparisons])


# How each notebook's per-seed frame becomes the long table whose run names CLAIMS uses (the names are the
# notebooks' metrics.json result keys).  Names as in the notebooks' code; tests/test_claims.py checks them.
NOTEBOOK_TABLES = {
    "10_gessl_universality": 'from_wide(runs, ["base", "method"], METRICS)',
    "11_gessl_sensitivity": 'from_wide(runs, lambda r: f"{r.sweep}={r.value:g} {r.method}" if r.sweep != "base" '
                            'else f"{base} without GeSSL", CLAIM_METRICS)',
    "12_gessl_tsne": 'from_wide(runs, ["base", "method"], list(SCORES))',
    "13_gessl_bilevel_ablation": 'from_wide(runs, ["group", "label"], METRICS + ["train_s_per_epoch"])',
    "14_gessl_efficiency_stability": 'from_wide(runs, "method", METRICS)',
    "20_tc2_gradient_conflict": 'from_wide(runs, "label", ACC + ["mean_cos", "conflict_steps"])',
    "21_tc2_ablation": 'from_wide(runs, ["group", "label"], METRICS)',
    "30_bissl": 'pd.concat([from_wide(pd.DataFrame(main_rows), lambda r: f"{r.task} {arm}", '
                '{f"{arm}_top1": "top1", f"{arm}_top5": "top5"}) for arm in ("bissl", "only_ft")] + '
                '[from_wide(pd.DataFrame(dur_rows), lambda r: f"{r.task} {r.epochs} epochs {arm}", '
                '{f"{arm}_top1": "top1"}) for arm in ("bissl", "only_ft")])',
    "40_mcr": 'from_wide(runs, ["group", "base", "label"], ACC)',
}



def decide(claim: str | Claim, table, **kw) -> ClaimVerdict:
    """Decide one claim - an id of :data:`CLAIMS` or a :class:`Claim` - on a per-seed ``table``
    (:func:`bilevel_ssl.rule.decide`; ``alpha``, ``power``, ``learning`` go there)."""
    if isinstance(claim, str) and claim not in CLAIMS:
        raise KeyError(f"unknown claim {claim!r}; declared: {', '.join(CLAIMS)}")
    return decide_claim(CLAIMS[claim] if isinstance(claim, str) else claim, table, **kw)


def decide_notebook(notebook: str, table, **kw) -> dict[str, ClaimVerdict]:
    """Every claim that ``notebook`` tests (``Claim.notebook``), decided on its long ``table``: {id: verdict}."""
    return {cid: decide(cid, table, **kw) for cid, c in CLAIMS.items() if c.notebook == notebook}
