"""BiSSL: a bilevel *training stage* between self-supervised pre-training and downstream fine-tuning.

BiSSL (Zakarias, Hansen & Tan, ICML 2025; paper in ``shared/papers/bissl-bilevel-pretext-downstream.md``) replaces
the hand-over "pretext backbone θ -> fine-tuning" of the conventional pipeline by a bilevel problem (Eq. 2-3)

    min_{θ_D, ϕ_D}  L_D(θ_P*(θ_D), ϕ_D) + L_D(θ_D, ϕ_D)
    s.t.            θ_P*(θ_D) ∈ argmin_{θ_P} min_{ϕ_P} L_P(θ_P, ϕ_P) + λ·½‖θ_D − θ_P‖²,

and the pipeline of Fig. 1 (right), which this package implements stage by stage:

1. **Pretext pre-training** -> θ, ϕ_P: the library's trainer (:func:`pretrain` = :func:`bilevel_ssl.cache.cached_train`
   plus the checkpoint's teacher / objective state).
2. **Downstream head warm-up** -> ϕ_D: a linear head fitted on the frozen θ (:func:`warmup_head`, §4.2.2).
3. **BiSSL** (Algorithm 1): T alternations of N_L lower steps (pretext loss + λ/2‖θ_P − θ_D‖², §3.4) and N_U upper
   steps whose backbone gradient is the CG approximation of [I + ∇²L_P/λ]⁻¹ ∇_θ L_D(θ_P, ϕ_D) (Eq. 7; with
   Alg. 2's damping, λ → λ + λ_damp) plus the direct term ∇_θ L_D(θ_D, ϕ_D): :class:`BiSSLStage`,
   :func:`run_bissl`; :func:`cg_diagnostics` checks how well the CG solves that system.
4. **Fine-tuning** from θ_P (Algorithm 1 returns θ_P): :func:`finetune_backbone` (:func:`bilevel_ssl.semisup.finetune`
   with all labels).

The baseline "only FT" of Table 1 / Fig. 2 is the same pre-trained backbone given the *same extra pretext compute*
(the T·N_L lower steps, same optimiser, schedule, batches and views, without the proximal term and without the upper
level; :func:`continue_pretext`), then fine-tuned identically.  ``equivalent_epochs`` gives the pretext epochs the
stage amounts to, for the paper's other reading (a longer pretext run, Fig. 2).

Defaults (:class:`BiSSLConfig`) are the paper's (§4.2.2, App. B.3) and the authors' released code's where the paper is
silent (``shared/reference-facts.md``, "BiSSL"): T = 500, N_L = 20, N_U = 8, λ = 1e-3, N_c = 5 CG iterations,
λ_damp = 10, layer-wise CG, clipping at norm 10 at both levels, downstream SGD lr 0.05, momentum 0.9, wd 5e-4,
batch 256, head warm-up 20 epochs at a constant lr, lower-level warm-up over 10·N_L steps then cosine.

Choices where the paper is silent or ambiguous (each documented where it is made, and tested in
``tests/test_bissl.py``):

* **CG operator** (Alg. 2): ``A v = v + ∇²L_P v / (λ + λ_damp)`` - Algorithm 2 and the reference code, which with
  λ = 1e-3 and λ_damp = 10 is effectively I + H/10.001, not Eq. 7's I + H/λ (the two coincide for λ_damp = 0).
  ``cg_damping`` is this λ_damp, *not* the Tikhonov term of :func:`bilevel_ssl.hypergrad.conjugate_gradient`, which
  is called with damping 0 on the matvec built here (:func:`ig_matvec`).
* **Layer-wise CG** (``cg_layerwise``, the reference's default): one α, β per parameter tensor.  It is exact CG on
  a block-diagonal operator, a heuristic otherwise: on a coupled operator it need not converge at all
  (``tests/test_bissl.py`` shows both).  So every upper step measures the relative residual of its solve
  (:attr:`BiSSLResult.cg_log`; layer-wise: one more HVP) and acts on one above ``cg_max_residual`` (0.5) by
  ``cg_on_residual``: ``warn`` once per run (default), ``stop``, or ``global`` (re-solve that step with global CG);
  see :class:`BiSSLConfig` for why the defaults keep the reference's CG and only warn.
* **HVPs** over the lower model's *backbone* parameters only, by double backward (reference code), with the pretext
  heads (and a BYOL target) held fixed; one pretext batch per alternation serves every HVP of that upper phase
  (θ_P does not move during the upper phase, so one gradient graph is built per alternation).
* **γ** (``direct_weight``) weights the second term of Eq. 2, so it scales ∇_θ L_D(θ_D, ϕ_D) in the θ_D gradient and
  that term's share of the ϕ_D gradient; the reference used 0.01 in its 2024 version and 1 later (default 1).
* **Clipping**: the total gradient norm of each level's parameters (θ_P ∪ ϕ_P; θ_D ∪ ϕ_D) is clipped to 10 after the
  proximal / implicit terms are added (reference: both levels).
* **Batches** (App. B.4): separate "stacks" of shuffled batches per level, reshuffled only when fewer batches remain
  than the next phase needs, or, for sets too small for a phase, whenever fewer images than a batch remain
  (:class:`BatchStack`).
* **BatchNorm**: both backbones run in train mode (batch statistics).  The L_D(θ_P, ·) forward and every HVP forward
  use *copies* of the buffers, so the lower model's running statistics only see pretext batches of lower steps.
* **Head warm-up** runs the frozen backbone in train mode (the statistics the upper level will use), on a copy, so
  no running statistic changes.  ``head_standardize`` (default on, ours, for SGD at small scale) puts a *fixed*
  centring and one global scale (:func:`feature_normalizer`, measured once on the downstream training images with
  θ) in front of the linear layer: the head is still linear in the features.

Layout: :mod:`.config` (:class:`BiSSLConfig`, :class:`FinetuneConfig` and their validation), :mod:`.implicit`
(Eq. 7 / Alg. 2: the CG operator and solve, on :func:`bilevel_ssl.hypergrad.conjugate_gradient` and
:class:`~bilevel_ssl.hypergrad.InnerHessian`; clipping; the Hessian's spectrum), :mod:`.warmup` (stage 2),
:mod:`.stage` (stage 3, :class:`BiSSLStage`), :mod:`.pipeline` (stages 1-4 end to end, the baseline, the CG
check), :mod:`.data` (pretext set and downstream tasks).  Shared helpers live in the library:
:class:`~bilevel_ssl.data.BatchStack` (App. B.4 batches), :func:`~bilevel_ssl.evaluate.feature_normalizer` and
:func:`~bilevel_ssl.evaluate.reestimate_bn` (App. C.2), the optimisers and schedules of
:mod:`bilevel_ssl.trainer` (:func:`~bilevel_ssl.trainer.make_optimizer`,
:func:`~bilevel_ssl.trainer.build_schedule`).  Everything below stays importable from ``bilevel_ssl.bissl``.
"""


from ..data import BatchStack
from ..evaluate import feature_normalizer, reestimate_bn
from .config import CG_ON_RESIDUAL, OBJECTIVES_OK, BiSSLConfig, FinetuneConfig
from .data import (DOWNSTREAM_TASKS, Downstream, PretextData, balanced_indices, balanced_subset, learning_check_task,
                   prepare_downstream, prepare_pretext)
from .implicit import (
    CGResidualError,
    CGResidualWarning,
    cg_solve,
    clip_gradients,
    hessian_extremes,
    ig_matvec,
    implicit_gradient,
    upper_backbone_gradient,
)
from .pipeline import (
    cg_diagnostics,
    cg_summary,
    check_fit,
    compare_arms,
    continue_pretext,
    equivalent_epochs,
    feature_scores,
    finetune_backbone,
    load_pretext,
    only_ft_model,
    pipeline_row,
    pretrain,
    run_bissl,
    run_pipeline,
    select_on_validation,
    validation_split,
)
from .stage import BiSSLResult, BiSSLStage, PretextModel
from .warmup import DownstreamHead, warmup_head

__all__ = [
    "BiSSLConfig",
    "FinetuneConfig",
    "BatchStack",
    "DownstreamHead",
    "PretextModel",
    "Downstream",
    "BiSSLResult",
    "BiSSLStage",
    "DOWNSTREAM_TASKS",
    "ig_matvec",
    "implicit_gradient",
    "cg_solve",
    "CGResidualWarning",
    "CGResidualError",
    "CG_ON_RESIDUAL",
    "upper_backbone_gradient",
    "clip_gradients",
    "hessian_extremes",
    "feature_normalizer",
    "pretrain",
    "load_pretext",
    "warmup_head",
    "run_bissl",
    "cg_diagnostics",
    "continue_pretext",
    "finetune_backbone",
    "run_pipeline",
    "equivalent_epochs",
    "reestimate_bn",
    "prepare_pretext",
    "prepare_downstream",
    "learning_check_task",
    "PretextData",
    "OBJECTIVES_OK",
    "balanced_indices",
    "balanced_subset",
    "only_ft_model",
    "pipeline_row",
    "feature_scores",
    "cg_summary",
    "compare_arms",
    "select_on_validation",
    "validation_split",
    "check_fit",
]
