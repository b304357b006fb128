"""The learning check of bilevel_ssl.protocol (issue #25): a claim is decided only where its base has learned."""

import pytest

from bilevel_ssl import claims as C
from bilevel_ssl import protocol as P
from bilevel_ssl.evaluate import evaluate_encoder
from bilevel_ssl.experiments import make_config, prepare
from bilevel_ssl.trainer import build_net


def test_gain_margin_and_boundary():
    chk = P.learning_check({"simclr": [0.75, 0.77], "byol": [0.70, 0.72]},
                           {"simclr": [0.64, 0.66], "byol": [0.64, 0.66]})
    assert chk.gain("simclr") == pytest.approx(0.11) and chk.passed("simclr")
    assert chk.gain("byol") == pytest.approx(0.06) and not chk.passed("byol")
    assert chk.failed == ["byol"] and not chk.ok
    assert "byol 0.710 vs untrained 0.650" in chk.reason() and "simclr" not in chk.reason()
    # exactly the margin passes (the rule is >=), a hair below does not
    assert P.learning_check({"a": [0.75]}, {"a": [0.65]}).ok
    assert not P.learning_check({"a": [0.7499]}, {"a": [0.65]}).ok
    # a non-finite score never passes
    assert not P.learning_check({"a": [float("nan")]}, {"a": [0.1]}).ok


def test_as_dict_and_markdown_say_which_base_failed():
    chk = P.learning_check({"simclr": [0.8, 0.8], "byol": [0.6, 0.6]}, {"simclr": [0.6, 0.6], "byol": [0.6, 0.6]})
    d = chk.as_dict()
    assert d["ok"] is False and d["bases"]["simclr"]["learned"] and not d["bases"]["byol"]["learned"]
    assert d["bases"]["byol"]["seeds"] == 2
    md = chk.markdown()
    assert "| byol | 2 | 0.600 | 0.600 | +0.000 | **no** |" in md and "**No verdict**" in md
    assert chk.structure() == "learning check: simclr (2 seeds), byol (2 seeds)"


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="simclr has 2 trained and 1 untrained seeds"):
        P.learning_check({"simclr": [0.8, 0.8]}, {"simclr": [0.6]})
    with pytest.raises(ValueError, match="same base objectives"):
        P.learning_check({"simclr": [0.8]}, {"byol": [0.6]})
    with pytest.raises(ValueError, match="no base objective"):
        P.learning_check({}, {})


def _table(d):
    return {"A": {"m": dict(enumerate([0.5 + d + 0.001 * i for i in range(5)]))},
            "B": {"m": dict(enumerate([0.5 + 0.002 * i for i in range(5)]))}}


def test_failed_check_turns_any_label_into_no_verdict():
    claim = C.Claim("T", "a test claim", "none", "none", (C.Comparison("A", "B", "m"),))
    table = _table(0.1)
    assert C.decide(claim, table).label == "supported"
    good = P.learning_check({"simclr": [0.8]}, {"simclr": [0.6]})
    bad = P.learning_check({"simclr": [0.65]}, {"simclr": [0.6]})
    assert C.decide(claim, table, learning=good).label == "supported"
    v = C.decide(claim, table, learning=bad)
    assert v.label == C.NO_VERDICT
    assert v.reason.startswith("the base did not learn") and "alone would say: supported" in v.reason
    assert v.results[0].label == "supported"  # the comparison itself is still computed and shown
    assert "gets **no verdict** at this scale" in v.reading()
    assert C.summaries({"T": v})["T"].startswith("no verdict (the base did not learn")


@pytest.fixture(scope="module")
def tiny():
    return prepare("mnist5k", novel_classes=5, max_train=64)


def test_untrained_knn_is_the_notebooks_protocol_on_the_initial_network(tiny):
    cfg = make_config("simclr", dataset="mnist5k", seed=3, epochs=1, backbone_args={"width": 8})
    net, _ = build_net(cfg, tiny.splits.train.channels, tiny.splits.train.size)
    expected = evaluate_encoder(net.backbone, tiny.splits, n_episodes=2)["knn_acc"]
    assert P.untrained_knn(cfg, tiny.splits) == pytest.approx(expected, abs=1e-12)


def test_check_bases_pairs_each_base_run_with_its_own_seed(tiny):
    cfgs = {(b, s): make_config(b, dataset="mnist5k", seed=s, epochs=1, backbone_args={"width": 8})
            for b in ("simclr", "byol") for s in (0, 1)}
    u = {s: P.untrained_knn(cfgs[("simclr", s)], tiny.splits) for s in (0, 1)}
    assert u[0] != u[1]  # different seeds, different networks
    chk = P.check_bases([(cfg, u[s] + 0.2) for (b, s), cfg in cfgs.items()], tiny.splits)
    assert chk.ok and chk.seeds == {"simclr": 2, "byol": 2}
    assert chk.untrained["byol"] == pytest.approx((u[0] + u[1]) / 2)  # heads differ, backbone does not
    assert chk.gain("simclr") == pytest.approx(0.2)


def test_a_base_that_did_not_learn_takes_only_the_verdicts_of_the_claims_that_compare_it():
    # notebook 40's shape: R16 is SimCLR's grid, R15 compares every base; BYOL fails the check, SimCLR passes
    chk = P.learning_check({"simclr": [0.8, 0.8], "byol": [0.62, 0.62]}, {"simclr": [0.6, 0.6], "byol": [0.6, 0.6]})
    simclr_only = C.Claim("T16", "grid", "none", "none",
                          (C.Comparison("R16 simclr 0.1|1", "R16 simclr 0.01|0.1", "m"),))
    both = C.Claim("T15", "bases", "none", "none", (C.Comparison("R15 simclr +MCR", "R15 simclr base", "m"),
                                                     C.Comparison("R15 byol +MCR", "R15 byol base", "m")))
    runs = ["R16 simclr 0.1|1", "R16 simclr 0.01|0.1", "R15 simclr +MCR", "R15 simclr base", "R15 byol +MCR",
            "R15 byol base"]
    table = {r: {"m": dict(enumerate([0.5 + (0.1 if "+MCR" in r or "0.1|1" in r else 0) + 0.001 * i * (k % 3)
                                      for i in range(5)]))} for k, r in enumerate(runs)}
    assert chk.restricted(simclr_only.runs).ok and chk.restricted(simclr_only.runs).trained == {"simclr": 0.8}
    assert C.decide(simclr_only, table, learning=chk).label == "supported"
    v = C.decide(both, table, learning=chk)
    assert v.label == C.NO_VERDICT and "byol 0.620 vs untrained 0.600" in v.reason and "simclr 0.800" not in v.reason
    # no base name among the runs' words (notebook 20's "simclr+T"): every base counts, as before
    assert chk.restricted(["simclr+T"]).trained == chk.trained
    assert "**No verdict** for the claims that compare byol" in chk.markdown()
