"""bilevel_ssl: bi-level self-supervised learning (GeSSL, TC², BiSSL, MCR) at notebook scale.

Modules: ``data`` (datasets, splits), ``augment`` (batched per-sample augmentation), ``models`` and ``vit``
(backbones, heads, encoder files), ``objectives`` (base SSL losses, one file per family), ``meta`` (the
single-level step, EMA teacher, functional views of a network), ``hypergrad`` (hypergradient engines), ``gessl``
(GeSSL), ``config`` (validated parameters), ``trainer`` (the one training loop), ``evaluate`` (k-NN, linear,
few-shot), ``plots``, ``report`` (metrics.json), ``reproduce`` (papermill runner).
"""

__version__ = "0.1.0"
