"""Stage 3 of Fig. 1, BiSSL itself (Algorithm 1): :class:`BiSSLStage` alternates N_L lower steps (pretext loss +
λ/2‖θ_P − θ_D‖²) and N_U upper steps (CG implicit gradient of Eq. 7 plus the direct term) from a pre-trained
:class:`PretextModel`; :class:`BiSSLResult` is what it returns.
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.func import functional_call

from ..augment import augment as augment_batch, make_views, preset
from ..config import TrainConfig
from ..data import BatchStack, ImageSet, to_channels
from ..hypergrad import InnerHessian
from ..meta import FunctionalNet, SSLNet
from ..trainer import build_schedule, make_optimizer
from .config import BiSSLConfig, crop_flip, stream_seeds
from .implicit import (
    CGResidualError,
    CGResidualWarning,
    clip_gradients,
    implicit_gradient,
    norm,
    upper_backbone_gradient,
)
from .warmup import DownstreamHead


@dataclass
class PretextModel:
    """θ and ϕ_P after pretext pre-training: the network (backbone + heads), its objective (with its state: queue,
    centre), the EMA teacher for momentum objectives (``None`` otherwise) and the run's configuration."""

    net: SSLNet
    objective: object
    teacher: object | None
    cfg: TrainConfig

    def copy(self) -> "PretextModel":
        return PretextModel(copy.deepcopy(self.net), copy.deepcopy(self.objective), copy.deepcopy(self.teacher),
                            self.cfg)

    @property
    def backbone(self) -> nn.Module:
        return self.net.backbone


@dataclass
class BiSSLResult:
    """What the stage returns.  ``backbone`` is θ_P (what Algorithm 1 returns and fine-tuning starts from);
    ``net`` the lower model (θ_P, ϕ_P); ``backbone_D`` / ``head`` the upper model (θ_D, ϕ_D) (``None`` for
    :func:`~bilevel_ssl.bissl.continue_pretext`); ``history`` one record per alternation (see
    :meth:`BiSSLStage.alternation`); ``cg_log`` one record per upper step: the CG solve's relative residual (see
    :meth:`BiSSLStage.upper_step`)."""

    net: SSLNet
    backbone_D: nn.Module | None
    head: DownstreamHead | None
    history: list[dict] = field(default_factory=list)
    warmup_history: list[dict] = field(default_factory=list)
    cg_log: list[dict] = field(default_factory=list)

    @property
    def backbone(self) -> nn.Module:
        return self.net.backbone


class BiSSLStage:
    """Algorithm 1 on one pretext set and one downstream training set.

    ``pretext`` (θ, ϕ_P; copied, never modified) initialises the lower model and θ_D = θ; ``head`` (ϕ_D from
    :func:`~bilevel_ssl.bissl.warmup_head`; copied) the upper head.  ``couple=False`` drops the proximal term and the upper level: the
    lower model then does exactly the pretext steps of the coupled stage (same batches, views, optimiser and
    schedule: separate random streams per level), the "equal extra pretext compute" baseline.

    Random streams (from ``cfg.seed``): lower batches and views, upper batches and augmentation, the HVP batch.
    Same seed -> same numbers on CPU.
    """

    def __init__(self, pretext: PretextModel, head: DownstreamHead | None, pretext_images: ImageSet | Tensor,
                 downstream: ImageSet | None, cfg: BiSSLConfig, *, couple: bool = True):
        if not isinstance(cfg, BiSSLConfig):
            raise TypeError(f"cfg: expected BiSSLConfig, got {type(cfg).__name__}")
        images = pretext_images.images if isinstance(pretext_images, ImageSet) else pretext_images
        if couple and (head is None or downstream is None):
            raise ValueError("head / downstream: the coupled stage needs the warmed-up head and the downstream set")
        cfg.check_against(pretext.cfg, len(images), len(downstream) if couple else None)
        self.cfg, self.couple = cfg, couple
        self.device = torch.device(cfg.resolved_device())
        p = pretext.copy()
        self.net, self.objective, self.teacher = p.net.to(self.device).train(), p.objective, p.teacher
        if self.teacher is not None:
            self.teacher.net.to(self.device).train()
        # the pretext run's augmentation: its preset with its ``augment_args`` where the config has them
        self.aug = (pretext.cfg.augmentation() if hasattr(pretext.cfg, "augmentation")
                    else preset(pretext.cfg.augment))
        low = cfg.lower_settings(pretext.cfg)
        self.lower_batch = low["batch_size"]
        self.hvp_batch = cfg.hvp_batch_size or low["batch_size"]
        self.images = images.to(self.device)
        s_low, s_up, s_hvp, _ = stream_seeds(cfg.seed, 4)
        self.gen_lower = torch.Generator().manual_seed(s_low)
        self.gen_upper = torch.Generator().manual_seed(s_up)
        self.gen_hvp = torch.Generator().manual_seed(s_hvp)
        self.stack_lower = BatchStack(len(images), self.lower_batch, self.gen_lower)
        self.theta_P = list(self.net.backbone.parameters())
        self._bb_names = [n for n, _ in self.net.backbone.named_parameters()]
        params = list(self.net.parameters())
        self.opt_P = make_optimizer(low["optimizer"], params, lr=low["lr"], momentum=low["momentum"],
                                    weight_decay=low["weight_decay"])
        total_low = cfg.alternations * cfg.lower_steps
        warm = cfg.lower_warmup * cfg.lower_steps
        self.sched_P = build_schedule(self.opt_P, total_low, warm, "cosine")
        self.backbone_D = self.head = None
        if couple:
            self.backbone_D = copy.deepcopy(self.net.backbone).train()
            self.theta_D = list(self.backbone_D.parameters())
            self.head = copy.deepcopy(head).to(self.device).train()
            want = pretext.net.backbone.spec["in_channels"] if hasattr(pretext.net.backbone, "spec") else images.shape[1]
            self.d_images = to_channels(downstream.images, want).to(self.device)
            self.d_labels = downstream.labels.to(self.device)
            self.stack_upper = BatchStack(len(downstream), cfg.downstream_batch_size, self.gen_upper)
            self.d_aug = crop_flip(cfg.downstream_augment)
            self.opt_D = make_optimizer("sgd", [*self.theta_D, *self.head.parameters()], lr=cfg.downstream_lr,
                                        momentum=cfg.downstream_momentum, weight_decay=cfg.downstream_weight_decay)
            total_up = cfg.alternations * cfg.upper_steps
            self.sched_D = build_schedule(self.opt_D, total_up, 0, cfg.upper_schedule)
        self.history: list[dict] = []
        self.cg_log: list[dict] = []
        self._cg_warned = False
        self.t = self.upper_steps_done = 0

    # ------------------------------------------------------------------------------------------------ pieces
    def _teacher_outputs(self, x: Tensor, n_views: int):
        return None if self.teacher is None else self.objective.outputs(self.teacher, x, n_views)

    def views(self, idx: Tensor, generator: torch.Generator) -> list[Tensor]:
        x = self.images[idx.to(self.device)].float().div_(255)
        return make_views(x, self.objective.n_views, self.aug, generator)

    def distance(self) -> float:
        """‖θ_P − θ_D‖ over the backbone parameters (nan without an upper model)."""
        if not self.couple:
            return float("nan")
        return norm([a.detach() - b.detach() for a, b in zip(self.theta_P, self.theta_D)])

    def lower_step(self, views: list[Tensor]) -> dict:
        """One lower step of Algorithm 1: g_ϕP = ∇_ϕ L_P, g_θP = ∇_θ L_P + λ(θ_P − θ_D) (the gradient of the reference's
        L_P + ½λ‖θ_P − sg(θ_D)‖²), joint norm clipped, opt_P step, schedule step; then the EMA teacher (constant
        ``teacher_momentum``) and the objective's state (queue, centre) as after a pretext step."""
        x, n = torch.cat(views), len(views)
        student = self.objective.outputs(self.net, x, n)
        teacher = self._teacher_outputs(x, n)
        loss = self.objective.loss(student, teacher)
        total = loss
        if self.couple:
            reg = sum(((a - b.detach()) ** 2).sum() for a, b in zip(self.theta_P, self.theta_D))
            total = loss + 0.5 * self.cfg.lam * reg
        self.opt_P.zero_grad(set_to_none=True)
        total.backward()
        gnorm = clip_gradients(list(self.net.parameters()), self.cfg.clip_norm)
        self.opt_P.step()
        self.sched_P.step()
        with torch.no_grad():
            if self.teacher is not None:
                self.teacher.update(self.net, self.cfg.teacher_momentum)
            det = lambda outs: None if outs is None else [{k: v.detach() for k, v in o.items()} for o in outs]
            self.objective.update_state(det(student), det(teacher))
        return {"lower_loss": float(loss.detach()), "lower_grad_norm": gnorm}

    def pretext_hessian(self, views: list[Tensor]) -> InnerHessian:
        """∇²_θ L_P(θ_P, ϕ_P) on one batch of views, as an :class:`~bilevel_ssl.hypergrad.InnerHessian` over the
        lower *backbone* parameters: double backward through ``functional_call`` (reference: ``grad(loss, params,
        create_graph=True)`` then ``grad(Σ g·v, params)``), pretext heads detached (held fixed), BatchNorm in train
        mode on *copies* of the buffers (the HVPs do not move the running statistics), teacher outputs computed
        once, without gradient (the target is not updated during HVPs)."""
        x, n = torch.cat(views), len(views)
        teacher = None
        if self.teacher is not None:  # on copies of its buffers too: nothing of the target changes
            with torch.no_grad():
                t_net = FunctionalNet(self.teacher.net, {k: b.clone() for k, b in self.teacher.net.named_buffers()})
                teacher = self.objective.outputs(t_net, x, n)
        fixed = {k: v.detach() for k, v in self.net.named_parameters() if not k.startswith("backbone.")}
        buffers = {k: b for k, b in self.net.named_buffers()}
        names = [f"backbone.{k}" for k in self._bb_names]

        def loss_fn(theta, _phi):
            tensors = {**fixed, **{k: b.clone() for k, b in buffers.items()}, **dict(zip(names, theta))}
            return self.objective.loss(self.objective.outputs(FunctionalNet(self.net, tensors), x, n), teacher)

        return InnerHessian(loss_fn, self.theta_P)

    def _lower_features(self, x: Tensor, theta: list[Tensor]) -> Tensor:
        tensors = {**{k: b.clone() for k, b in self.net.backbone.named_buffers()}, **dict(zip(self._bb_names, theta))}
        return functional_call(self.net.backbone, tensors, (x,))

    def upper_step(self, x: Tensor, y: Tensor, H: InnerHessian, *, residual: bool = False) -> dict:
        """One upper step of Algorithm 1 on the downstream batch (x, y):

        * v = ∇_θ L_D(θ_P, ϕ_D) (lower backbone, buffers copied), direct = ∇_θ L_D(θ_D, ϕ_D),
          g_ϕD = ∇_ϕ [L_D(θ_P, ϕ_D) + γ L_D(θ_D, ϕ_D)] - one backward of L_D(θ_P) + γ L_D(θ_D);
        * v_IG ≈ [I + H/(λ + λ_damp)]⁻¹ v (:func:`implicit_gradient`, N_c CG iterations, HVPs of ``H``);
        * g_θD = v_IG + γ·direct (:func:`upper_backbone_gradient`); joint norm of (g_θD, g_ϕD) clipped; opt_D step.

        ``residual`` (what :meth:`alternation` sets at every step): measure the relative residual ρ = ‖v − A v_IG‖/‖v‖
        (layer-wise CG: one more HVP; global CG: free) and check it against ``cg_max_residual`` by
        ``cg_on_residual`` (:class:`~bilevel_ssl.bissl.BiSSLConfig`): ``warn`` once per stage, ``stop`` raises
        :class:`~bilevel_ssl.bissl.implicit.CGResidualError` before the optimizer step, ``global`` re-solves with
        global CG.  Each measured step appends ``{"alternation", "upper_step" (1-based count over the run),
        "cg_residual" (of the v_IG used),
        "cg_residual_layerwise" (layer-wise solve; nan with global CG), "cg_solver" ("layerwise" / "global" /
        "global_fallback")}`` to ``self.cg_log``.  Without ``residual``, ``cg_residual`` is nan and nothing is
        checked.
        """
        cfg = self.cfg
        theta = [p.detach().requires_grad_(True) for p in self.theta_P]
        logits_p = self.head(self._lower_features(x, theta))
        loss_p = F.cross_entropy(logits_p, y)
        logits_d = self.head(self.backbone_D(x))
        loss_d = F.cross_entropy(logits_d, y)
        head_params = list(self.head.parameters())
        g_p = torch.autograd.grad(loss_p, [*theta, *head_params], allow_unused=True)
        g_d = torch.autograd.grad(loss_d, [*self.theta_D, *head_params], allow_unused=True)
        zeros = lambda gs, ps: [torch.zeros_like(p) if g is None else g for g, p in zip(gs, ps)]
        g_p, g_d = zeros(g_p, [*theta, *head_params]), zeros(g_d, [*self.theta_D, *head_params])
        k = len(theta)
        v, direct = g_p[:k], g_d[:k]
        g_phi = [a + cfg.direct_weight * b for a, b in zip(g_p[k:], g_d[k:])]
        solve = lambda layerwise: implicit_gradient(H.hvp, v, lam=cfg.lam, damping=cfg.cg_damping,
                                                    iters=cfg.cg_iters, layerwise=layerwise,
                                                    residual="auto" if residual else False)
        v_ig, res = solve(cfg.cg_layerwise)
        if residual:
            v_ig, res = self._check_cg(v_ig, res, solve)
        g_theta = upper_backbone_gradient(v_ig, direct, cfg.direct_weight)
        for p, g in zip([*self.theta_D, *head_params], [*g_theta, *g_phi]):
            p.grad = g.detach().clone()
        gnorm = clip_gradients([*self.theta_D, *head_params], cfg.clip_norm)
        self.opt_D.step()
        self.sched_D.step()
        self.opt_D.zero_grad(set_to_none=True)
        self.upper_steps_done += 1
        acc = float((logits_p.detach().argmax(1) == y).float().mean())  # at θ_P, before this step
        vn, ign = norm(v), norm(v_ig)
        cos = float(sum((a.double() * b.double()).sum() for a, b in zip(v, v_ig))) / (vn * ign) if vn * ign > 0 else 0.0
        return {"upper_loss": float(loss_p.detach()), "upper_loss_direct": float(loss_d.detach()),
                "upper_grad_norm": gnorm, "v_norm": vn, "ig_norm": ign, "ig_cos": cos, "direct_norm": norm(direct),
                "cg_residual": res, "upper_acc": acc}

    def _check_cg(self, v_ig: list[Tensor], res: float, solve) -> tuple[list[Tensor], float]:
        """Log the residual of this upper step and act on a bad one (``cg_on_residual``); returns the v_IG to use and
        its residual."""
        cfg = self.cfg
        bad = lambda r: not r <= cfg.cg_max_residual  # nan counts as bad
        rec = {"alternation": self.t + 1, "upper_step": self.upper_steps_done + 1, "cg_residual": res,
               "cg_residual_layerwise": res if cfg.cg_layerwise else float("nan"),
               "cg_solver": "layerwise" if cfg.cg_layerwise else "global"}
        self.cg_log.append(rec)
        if not bad(res):
            return v_ig, res
        if cfg.cg_on_residual == "stop":
            raise CGResidualError(self._cg_message(rec, res, "stopped (bissl.cg_on_residual: stop) before the "
                                                             "optimizer step"))
        note = "the step goes on with this v_IG"
        if cfg.cg_on_residual == "global" and cfg.cg_layerwise:
            v_ig, res = solve(False)
            rec.update(cg_residual=res, cg_solver="global_fallback")
            if not bad(res):
                return v_ig, res
            note = f"global CG (bissl.cg_on_residual: global) reached only {res:.3g}; the step goes on with it"
        if not self._cg_warned:
            self._cg_warned = True
            warnings.warn(self._cg_message(rec, rec["cg_residual_layerwise"] if cfg.cg_layerwise else res, note),
                          CGResidualWarning, stacklevel=3)
        return v_ig, res

    def _cg_message(self, rec: dict, res: float, outcome: str) -> str:
        cfg = self.cfg
        kind = "layer-wise" if cfg.cg_layerwise else "global"
        return (f"BiSSL's CG ({kind}, bissl.cg_iters = {cfg.cg_iters}, bissl.cg_damping = {cfg.cg_damping:g}) did "
                f"not solve [I + H/(λ + λ_damp)] v_IG = v at alternation {rec['alternation']}, upper step "
                f"{rec['upper_step']} (of the run): relative residual ‖v − A v_IG‖/‖v‖ = {res:.3g} > bissl.cg_max_residual = "
                f"{cfg.cg_max_residual:g} (1 = no better than v_IG = 0), so the implicit gradient is inaccurate; "
                f"{outcome}.  Fixes: bissl.cg_layerwise: false (layer-wise CG need not converge when the Hessian "
                f"couples parameter tensors), more bissl.cg_iters, or a larger bissl.cg_damping (A is indefinite when "
                f"the pretext Hessian has an eigenvalue below −(λ + λ_damp); cg_diagnostics measures both); "
                f"bissl.cg_on_residual: global re-solves such steps with global CG, stop raises.  Warned once per "
                f"run; every upper step's residual is in BiSSLResult.cg_log.")

    def downstream_batch(self, idx: Tensor) -> tuple[Tensor, Tensor]:
        idx = idx.to(self.device)
        x = self.d_images[idx].float().div_(255)
        if self.d_aug is not None:
            x = augment_batch(x, self.d_aug, self.gen_upper)
        return x, self.d_labels[idx]

    def alternation(self) -> dict:
        """One t of Algorithm 1: N_L lower steps, then (coupled) one HVP batch and N_U upper steps.  Returns the
        history record: ``alternation``, ``lower_loss`` (mean pretext loss of the N_L steps), ``lower_grad_norm``
        (mean, before clipping), ``hvp_loss`` (L_P on the HVP batch), ``upper_loss`` (mean L_D(θ_P, ϕ_D)),
        ``upper_loss_direct`` (mean L_D(θ_D, ϕ_D)), ``upper_acc`` (batch accuracy at θ_P), ``upper_grad_norm``
        (before clipping), ``v_norm`` ‖∇_θ L_D(θ_P, ϕ_D)‖, ``ig_norm`` ‖v_IG‖, ``ig_cos`` cos(v, v_IG) (1 when the
        implicit gradient only rescales v; ≤ 0 when CG turned it around), ``direct_norm`` (all means over the N_U
        steps), ``cg_residual`` (relative residual ‖v − A v_IG‖/‖v‖ of the last upper step; every upper step's
        is in ``cg_log``, :meth:`upper_step`), ``distance``
        ‖θ_P − θ_D‖ at the end, ``lr_lower``, ``lr_upper``, ``time_s``."""
        t0 = time.perf_counter()
        cfg = self.cfg
        lows = [self.lower_step(self.views(idx, self.gen_lower)) for idx in self.stack_lower.phase(cfg.lower_steps)]
        rec = {"alternation": self.t + 1, **_mean(lows)}
        rec["lr_lower"] = self.opt_P.param_groups[0]["lr"]
        if self.couple:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            idx = torch.randperm(len(self.images), generator=self.gen_hvp)[:self.hvp_batch]
            views = self.views(idx, self.gen_hvp)
            with sdpa_kernel(SDPBackend.MATH):  # double backward through attention needs the math kernel (ViT)
                H = self.pretext_hessian(views)
                batches = self.stack_upper.phase(cfg.upper_steps)
                ups = [self.upper_step(*self.downstream_batch(b), H, residual=True) for b in batches]
            rec["hvp_loss"] = H.loss
            del H
            rec.update(_mean(ups))
            rec["cg_residual"] = ups[-1]["cg_residual"]
            rec["lr_upper"] = self.opt_D.param_groups[0]["lr"]
        rec["distance"] = self.distance()
        rec["time_s"] = time.perf_counter() - t0
        self.t += 1
        return rec

    def run(self) -> BiSSLResult:
        """All T alternations with a tqdm bar; non-finite numbers stop the run with FloatingPointError."""
        from tqdm import tqdm

        cfg = self.cfg
        bar = tqdm(range(self.t, cfg.alternations), desc="BiSSL" if self.couple else "extra pretext",
                   disable=not cfg.progress, unit="alt", leave=False)
        for _ in bar:
            rec = self.alternation()
            skip = set() if self.couple else {"distance"}
            bad = [k for k, v in rec.items() if isinstance(v, float) and k not in skip and not math.isfinite(v)]
            if bad:
                raise FloatingPointError(f"BiSSL alternation {rec['alternation']}: non-finite {bad}: "
                                         f"{ {k: rec[k] for k in bad} }")
            self.history.append(rec)
            post = {"L_P": f"{rec['lower_loss']:.3f}"}
            if self.couple:
                post.update(L_D=f"{rec['upper_loss']:.3f}", res=f"{rec['cg_residual']:.2g}",
                            dist=f"{rec['distance']:.3g}")
            bar.set_postfix(post)
        bar.close()
        return BiSSLResult(self.net, self.backbone_D, self.head, self.history, cg_log=self.cg_log)


def _mean(records: list[dict]) -> dict:
    keys = records[0].keys() if records else []
    return {k: float(np.mean([r[k] for r in records])) for k in keys}
