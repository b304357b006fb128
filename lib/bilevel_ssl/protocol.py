"""The comparison protocol's preconditions: *has the base learned?* before any claim is decided.

Why
---
A claim "method M improves its base" is evidence about M only where the base itself has learned something:
at 8 epochs on the CPU the notebooks once compared SimCLR at 5-NN 0.643 with an *untrained* Conv-4 at 0.634, so
"GeSSL does not help" said nothing about GeSSL (issue #25).  Every claim notebook therefore measures the untrained
network (same architecture, same initialisation seeds, same split, same 5-NN protocol as the trained runs) and
checks, per base objective,

    mean over seeds of 5-NN(base, trained)  >=  mean over seeds of 5-NN(untrained)  +  margin      (margin = 0.10)

The margin 0.10 is the project's choice (issue #25), about ten times the seed-to-seed standard deviation of the
5-NN accuracy measured on mnistm5k (0.005-0.015), so a pass is not noise.  A notebook whose check fails still
shows every number, but :func:`bilevel_ssl.claims.decide` labels the claims that compare a base that failed **no
verdict** instead of supported / contradicted / not resolved (:data:`bilevel_ssl.claims.NO_VERDICT`;
:meth:`LearningCheck.restricted` says which bases a claim compares).

The untrained reference is a random network, not raw pixels: a randomly initialised Conv-4 is itself a strong
5-NN feature extractor on digits (random convolutional features, Saxe et al. 2011), and "better than what the
architecture gives for free" is what the claims need.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

LEARNING_MARGIN = 0.10
LEARNING_METRIC = "knn_acc"


@dataclass(frozen=True)
class LearningCheck:
    """Per base objective: trained 5-NN (mean over seeds) vs the untrained network's (mean over the same seeds)."""

    untrained: dict[str, float]  # base objective -> mean 5-NN of its untrained networks
    trained: dict[str, float]  # base objective -> mean 5-NN of its trained base runs
    margin: float = LEARNING_MARGIN
    metric: str = LEARNING_METRIC
    seeds: dict[str, int] = field(default_factory=dict)  # base objective -> number of seeds averaged

    def __post_init__(self):
        if set(self.untrained) != set(self.trained):
            raise ValueError(f"learning check: untrained runs for {sorted(self.untrained)} but trained runs for "
                             f"{sorted(self.trained)}; both need the same base objectives")
        if not self.trained:
            raise ValueError("learning check: no base objective given")

    def gain(self, base: str) -> float:
        return self.trained[base] - self.untrained[base]

    def passed(self, base: str) -> bool:
        g = self.gain(base)
        return bool(np.isfinite(g) and g >= self.margin - 1e-12)

    @property
    def failed(self) -> list[str]:
        return [b for b in self.trained if not self.passed(b)]

    @property
    def ok(self) -> bool:
        return not self.failed

    def restricted(self, runs) -> "LearningCheck":
        """The check of the bases that ``runs`` - a claim's run names, e.g. ``R16 simclr 0.1|1`` - compare: a base
        counts where its name is a word of a run name; where no base name is a word of any (``simclr+T``), every
        base counts.  So in a notebook with several bases (40: SimCLR, BYOL, Barlow Twins) a base that did not learn
        takes the verdict of the claims that compare it, not of a claim about another base (R16 is SimCLR's grid)."""
        words = {w for r in runs for w in str(r).split()}
        keep = [b for b in self.trained if b in words] or list(self.trained)
        return LearningCheck({b: self.untrained[b] for b in keep}, {b: self.trained[b] for b in keep}, self.margin,
                             self.metric, {b: n for b, n in self.seeds.items() if b in keep})

    def reason(self) -> str:
        """One line for a claim that gets no verdict because of this check."""
        fails = ", ".join(f"{b} {self.trained[b]:.3f} vs untrained {self.untrained[b]:.3f} "
                          f"(gain {self.gain(b):+.3f})" for b in self.failed)
        return f"the base did not learn: {self.metric} {fails}; needs a gain >= {self.margin:.2f}"

    def markdown(self) -> str:
        lines = [f"**Has the base learned?** {self.metric} of each base objective, trained vs the same network "
                 f"untrained (means over seeds, same split); a claim is decided only if the gain of every base it "
                 f"compares is >= {self.margin:.2f}.", "",
                 "| base | seeds | untrained | trained | gain | learned |", "|---|---|---|---|---|---|"]
        for b in self.trained:
            lines.append(f"| {b} | {self.seeds.get(b, '-')} | {self.untrained[b]:.3f} | {self.trained[b]:.3f} | "
                         f"{self.gain(b):+.3f} | {'yes' if self.passed(b) else '**no**'} |")
        lines += ["", "All bases learned: the claims below are decided." if self.ok else
                  f"**No verdict** for the claims that compare {', '.join(self.failed)}: {self.reason()}. Their "
                  "comparisons below are shown for information only; train longer (more epochs) for evidence."]
        return "\n".join(lines)

    def structure(self) -> str:
        """What is the same on every CPU (for nbval-checked cells): the bases and their seed counts."""
        def seeds(b):
            n = self.seeds.get(b)
            return f"{n} seed{'s' * (n != 1)}" if n is not None else "seeds unknown"

        return "learning check: " + ", ".join(f"{b} ({seeds(b)})" for b in self.trained)

    def as_dict(self) -> dict:
        return {"metric": self.metric, "margin": self.margin, "ok": self.ok,
                "bases": {b: {"untrained": self.untrained[b], "trained": self.trained[b], "gain": self.gain(b),
                              "seeds": self.seeds.get(b), "learned": self.passed(b)} for b in self.trained}}


def learning_check(trained: dict[str, list[float]], untrained: dict[str, list[float]], *,
                   margin: float = LEARNING_MARGIN, metric: str = LEARNING_METRIC) -> LearningCheck:
    """:class:`LearningCheck` from per-seed scores ``{base objective: [score of seed s, ...]}`` of the trained base
    runs and of the untrained networks (the same seeds, in the same order)."""
    for b in trained:
        if b in untrained and len(trained[b]) != len(untrained[b]):
            raise ValueError(f"learning check: {b} has {len(trained[b])} trained and {len(untrained[b])} "
                             "untrained seeds; use the same seeds")
    return LearningCheck(untrained={b: float(np.mean(v)) for b, v in untrained.items()},
                         trained={b: float(np.mean(v)) for b, v in trained.items()}, margin=margin, metric=metric,
                         seeds={b: len(v) for b, v in trained.items()})


def knn(backbone, splits, *, device="cpu") -> float:
    """5-NN accuracy of a backbone on the base-class train/test split: the ``knn_acc`` of
    :func:`bilevel_ssl.evaluate.evaluate_encoder`, for notebooks that do not run the whole protocol."""
    from .evaluate import extract_features, knn_accuracy

    f_tr = extract_features(backbone, splits.train, device=device)
    f_te = extract_features(backbone, splits.test, device=device)
    return knn_accuracy(f_tr, splits.train.labels, f_te, splits.test.labels, k=5)


def untrained_knn(cfg, splits, *, device=None) -> float:
    """:func:`knn` of the network that ``cfg`` would train, at its initialisation (``cfg.seed``)."""
    from .trainer import build_net

    net, _ = build_net(cfg, splits.train.channels, splits.train.size)
    return knn(net.backbone, splits, device=device or cfg.resolved_device())


def check_bases(base_runs, splits, *, metric: str = LEARNING_METRIC, margin: float = LEARNING_MARGIN,
                device=None) -> LearningCheck:
    """The learning check of a notebook from ``base_runs``: ``[(TrainConfig of a trained base run, its score), ...]``
    (one per base objective and seed).  The untrained network of each is built from the same config (same seed,
    backbone and split); backbones that would be identical (same seed, backbone and options - the objective's
    heads do not enter the 5-NN) are evaluated once."""
    trained, untrained, memo = {}, {}, {}
    for cfg, score in base_runs:
        key = (cfg.seed, cfg.backbone, repr(sorted(cfg.backbone_args.items())))
        if key not in memo:
            memo[key] = untrained_knn(cfg, splits, device=device)
        trained.setdefault(cfg.objective, []).append(float(score))
        untrained.setdefault(cfg.objective, []).append(memo[key])
    return learning_check(trained, untrained, margin=margin, metric=metric)
