"""bilevel_ssl: bi-level self-supervised learning (GeSSL, TC², BiSSL, MCR) at notebook scale.

Modules: ``data`` (datasets, splits), ``augment`` (batched per-sample augmentation), ``models`` (backbones,
heads, encoder files), ``objectives`` (base SSL losses), ``meta`` (single-level and bi-level steps), ``config``
(validated parameters), ``trainer`` (the one training loop), ``evaluate`` (k-NN, linear, few-shot), ``plots``,
``report`` (metrics.json), ``reproduce`` (papermill runner).
"""

__version__ = "0.1.0"
