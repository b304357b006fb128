"""Golden gradients: one float64 step of every benchmark case (and the variants of the bi-level methods) gives
the gradients, logs and meta-method state recorded in ``tests/golden/golden_gradients.pt``.

A guard for refactoring the meta-methods: any change of what a step computes - not only a bug, also a reordered
sum - shows here.  Tiny batch and width so the file runs in seconds on one core; one torch thread, so the
reference (recorded the same way) is reproduced bit for bit on the same machine and to RTOL on AVX2/AVX-512 CPUs.
Regenerate (only when a change of the numbers is intended) with
``PYTHONPATH=lib python tests/test_golden_gradients.py``; a new case alone (the others' references kept) with
``--add-missing``.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

from bilevel_ssl.bench import cases
from bilevel_ssl.bilevel import FIRST_ORDER_ENGINES
from float64_step import build64, step64, views64

GOLDEN = Path(__file__).parent / "golden" / "golden_gradients.pt"
BATCH, SIZE, WIDTH = 16, 16, 8  # GeSSL: 8 tasks of 2 images; TC²: 4 tasks of 4; multi-task: its default count
# Norm-wise relative tolerance.  Measured between CPU kernel sets (reference recorded with AVX-512 kernels):
# ATEN_CPU_CAPABILITY=avx2 (+ ONEDNN_MAX_CPU_ISA=AVX2) differs by at most 1.3e-13 (tc2_no_lv_ssl), and a second
# AVX-512 machine (Xeon with AVX512-FP16/AMX, 2026-12-05) by at most 1.2e-12 (tc2_no_lv_ssl), so 1e-10 holds on
# AVX2 and AVX-512 machines, far below what a changed formula or a reordered random draw moves.  The
# non-vectorised `default` kernel set is outside this promise: it changes these one-step gradients by O(1)
# (README, "Same numbers").
RTOL = 1e-10
# A gradient that is zero in exact arithmetic (the bias of a linear layer followed by BatchNorm: BatchNorm removes
# any constant shift) is rounding noise of size ~1e-16 x the case's gradient norm, and its *relative* change between
# CPUs is O(1) (measured 1.3 for vicreg's and tc2_byol's projector biases on the second machine).  So every tensor
# also gets an absolute allowance of FLOOR x the norm of all gradients of its case (largest err / total norm
# measured on the second machine: 4.5e-13, tc2_no_lv_ssl).
FLOOR = 1e-11
# Cases whose numbers depend on an ill-conditioned linear-algebra step get their own measured tolerance:
# gessl_meancov_detach's g reads a rank-`cov_rank` covariance (eigenvectors of nearly equal eigenvalues), which
# LAPACK's CPU-dependent code paths move by 4.3e-8 relative (g's gradient) and 1.2e-9 (logs) on the second machine.
RTOL_CASE = {"gessl_meancov_detach": 1e-6}

# the bi-level methods' variants, options and teacher objectives beyond the benchmark's cases
EXTRA = {
    "gessl_joint": {"objective": "simclr", "meta": "gessl", "meta_args": {"variant": "joint"}},
    "gessl_per_task": {"objective": "simclr", "meta": "gessl", "hypergrad": "second_order",
                       "meta_args": {"variant": "per_task"}},
    "gessl_byol_aid_fd": {"objective": "byol", "meta": "gessl", "hypergrad": "aid_fd"},
    "gessl_meancov_detach": {"objective": "simclr", "meta": "gessl", "hypergrad": "second_order",
                             "meta_args": {"stats": "meancov", "g_detach": True, "cov_rank": 4}},
    "gessl_mae": {"objective": "mae", "backbone": "vit_tiny", "meta": "gessl", "hypergrad": "second_order"},
    "tc2_no_bilevel": {"objective": "simclr", "meta": "tc2", "meta_args": {"variant": "no_bilevel"}},
    "tc2_no_lv_ssl": {"objective": "simclr", "meta": "tc2", "hypergrad": "aid_cg",
                      "meta_args": {"variant": "no_lv", "query_loss": "ssl"}},
    "tc2_byol": {"objective": "byol", "meta": "tc2", "hypergrad": "second_order"},
    "mcr_no_bilevel": {"objective": "simclr", "meta": "mcr", "meta_args": {"variant": "no_bilevel"}},
    "mcr_first_order_mixup": {"objective": "simclr", "meta": "mcr", "hypergrad": "first_order",
                              "meta_args": {"fusion": "mixup"}},
    "mcr_byol_embedding": {"objective": "byol", "meta": "mcr", "hypergrad": "aid_fd",
                           "meta_args": {"fusion": "embedding", "detach_target": False}},
}


# the engine options the reference was recorded with; #24 changed the defaults (fd_r 0.01 -> 1e-4, CG damping
# 0 -> 1/inner_lr, Neumann step inner_lr -> 1/λ̂): the golden file keeps checking the same computations.  The
# Neumann case is GeSSL's (inner_lr 0.1).
PINNED = {"aid_fd": {"fd_r": 0.01}, "aid_cg": {"cg_damping": 0.0}, "aid_neumann": {"neumann_alpha": 0.1}}

# tiny heads (the objectives' defaults are 2048-4096 wide)
HEADS = {"simclr": {"proj_hidden": 32, "proj_dim": 16},
         "moco_v2": {"proj_hidden": 32, "proj_dim": 16, "queue_size": 64},
         "byol": {"proj_hidden": 32, "proj_dim": 16, "pred_hidden": 32},
         "simsiam": {"proj_hidden": 32, "proj_dim": 16},
         "dino": {"out_dim": 32, "hidden_dim": 32, "bottleneck_dim": 16},
         "swav": {"proj_hidden": 32, "proj_dim": 16, "n_prototypes": 10},
         "barlow_twins": {"proj_hidden": 32, "proj_dim": 32},
         "vicreg": {"proj_hidden": 32, "proj_dim": 32},
         "mae": {"decoder_dim": 16, "decoder_depth": 1, "decoder_heads": 2}}
TINY_META = {"gessl": {"g_hidden": 16}, "tc2": {"fv_hidden": 8, "fw_hidden": 8}}
TINY_BACKBONE = {"conv4": {"width": WIDTH}, "vit_tiny": {"dim": 16, "depth": 1, "heads": 2}}


def all_cases() -> dict[str, dict]:
    """The cases with tiny networks (other backbone options, such as channels_last, kept)."""
    out = {}
    for name, o in {**cases(), **EXTRA}.items():
        assert o["objective"] in HEADS, f"{name}: add tiny heads for {o['objective']}"
        backbone = o.get("backbone", "conv4")
        out[name] = {**o, "backbone_args": {**o.get("backbone_args", {}), **TINY_BACKBONE[backbone]},
                     "objective_args": {**HEADS[o["objective"]], **o.get("objective_args", {})}}
        if o.get("meta") in TINY_META:
            out[name]["meta_args"] = {**TINY_META[o["meta"]], **o.get("meta_args", {})}
        if o.get("hypergrad") in PINNED:  # the engines' options of the reference, pinned (their defaults changed)
            out[name]["hypergrad_args"] = {**PINNED[o["hypergrad"]], **o.get("hypergrad_args", {})}
        if o.get("meta") == "gessl" and o.get("hypergrad") in FIRST_ORDER_ENGINES:  # g untrained on purpose (#24)
            out[name]["meta_args"] = {**out[name]["meta_args"], "allow_untrained_meta": True}
    return out


def _flat_state(state, prefix: str = "") -> dict[str, torch.Tensor]:
    """The floating-point tensors of a (nested) state dict, by dotted path."""
    out = {}
    if isinstance(state, dict):
        for k, v in state.items():
            out.update(_flat_state(v, f"{prefix}{k}."))
    elif isinstance(state, (list, tuple)):
        for i, v in enumerate(state):
            out.update(_flat_state(v, f"{prefix}{i}."))
    elif isinstance(state, torch.Tensor) and state.is_floating_point():
        out[prefix.rstrip(".")] = state.detach().cpu().clone()
    return out


def record(overrides: dict) -> dict:
    """The step's gradients (network, meta-parameters), logs and the meta-method's state after it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg, dev, net, meta = build64(overrides, BATCH, "cpu", size=SIZE)
        logs = step64(net, meta, views64(cfg, meta, BATCH, size=SIZE), dev)
    finally:
        torch.set_num_threads(threads)
    grad = lambda p: (p.grad if p.grad is not None else torch.zeros_like(p)).detach().cpu().clone()
    return {"net": {n: grad(p) for n, p in net.named_parameters()},
            "meta": [grad(p) for p in meta.parameters()],
            "state": {k: v for k, v in _flat_state(meta.state_dict()).items() if not k.startswith("teacher.")},
            "logs": {k: float(v) for k, v in logs.items()}}


@pytest.fixture(scope="module")
def golden() -> dict:
    return torch.load(GOLDEN, weights_only=False)


def _close(name: str, got: torch.Tensor, ref: torch.Tensor, rtol: float = RTOL, atol: float = 0.0) -> None:
    assert got.shape == ref.shape and got.dtype == ref.dtype, f"{name}: {got.shape}/{got.dtype} vs {ref.shape}"
    scale = float(ref.norm())
    err = float((got - ref).norm())
    limit = rtol * scale + atol if scale > 0 or atol > 0 else rtol
    assert err <= limit, f"{name}: differs by {err:.3e} (norm {scale:.3e}, allowed {limit:.3e})"


def test_golden_covers_every_case(golden):
    assert sorted(golden) == sorted(all_cases())


@pytest.mark.parametrize("name", sorted(all_cases()))
def test_golden_gradients(name, golden):
    got, ref = record(all_cases()[name]), golden[name]
    rtol = RTOL_CASE.get(name, RTOL)
    total = float(torch.cat([g.flatten() for g in [*ref["net"].values(), *ref["meta"]]]).norm())
    assert sorted(got["net"]) == sorted(ref["net"])
    for k in ref["net"]:
        _close(f"{name}: grad {k}", got["net"][k], ref["net"][k], rtol, FLOOR * total)
    assert len(got["meta"]) == len(ref["meta"])
    for i, (a, b) in enumerate(zip(got["meta"], ref["meta"])):
        _close(f"{name}: meta grad {i}", a, b, rtol, FLOOR * total)
    assert sorted(got["state"]) == sorted(ref["state"])
    for k in ref["state"]:
        _close(f"{name}: state {k}", got["state"][k], ref["state"][k], rtol)
    assert sorted(got["logs"]) == sorted(ref["logs"])
    for k, v in ref["logs"].items():
        same = math.isnan(v) and math.isnan(got["logs"][k])
        assert same or got["logs"][k] == pytest.approx(v, rel=rtol, abs=rtol), f"{name}: log {k}"
    all_grads = torch.cat([g.flatten() for g in [*got["net"].values(), *got["meta"]]])
    assert all_grads.norm() > 0, f"{name}: zero gradient - the comparison would be vacuous"


@pytest.mark.parametrize("name", sorted(n for n in all_cases() if n.endswith("_channels_last")))
def test_channels_last_computes_the_same_step(name):
    """channels_last is a memory format, not a formula: the NHWC step's gradients equal its contiguous twin's
    (measured on this recording: at most 1.3e-14 of the case's gradient norm) - computed here, on this CPU."""
    got, ref = record(all_cases()[name]), record(all_cases()[name.removesuffix("_channels_last")])
    total = float(torch.cat([g.flatten() for g in [*ref["net"].values(), *ref["meta"]]]).norm())
    assert total > 0
    for k in ref["net"]:
        _close(f"{name}: grad {k}", got["net"][k], ref["net"][k], RTOL, FLOOR * total)
    for i, (a, b) in enumerate(zip(got["meta"], ref["meta"], strict=True)):
        _close(f"{name}: meta grad {i}", a, b, RTOL, FLOOR * total)


def test_the_comparison_catches_a_small_change(golden):
    """The tolerances are far below a real change: 1e-8 relative on one weight's gradient, or a gradient that
    should be ~0 moved by 1e-9 of the case's norm, both fail."""
    ref = golden["simclr"]["net"]
    total = float(torch.cat([g.flatten() for g in ref.values()]).norm())
    k = max(ref, key=lambda n: float(ref[n].norm()))
    with pytest.raises(AssertionError, match="differs by"):
        _close(k, ref[k] * (1 + 1e-8), ref[k], RTOL, FLOOR * total)
    bump = torch.zeros_like(ref[k])
    bump.view(-1)[0] = 1e-9 * total
    with pytest.raises(AssertionError, match="differs by"):
        _close(k, ref[k] + bump, ref[k], RTOL, FLOOR * total)
    _close(k, ref[k].clone(), ref[k], RTOL, FLOOR * total)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    GOLDEN.parent.mkdir(exist_ok=True)
    if "--add-missing" in sys.argv:  # a new case: record it, keep every recorded reference as it is
        ref = torch.load(GOLDEN, weights_only=False)
        new = sorted(set(all_cases()) - set(ref))
        ref.update({name: record(all_cases()[name]) for name in new})
        torch.save(dict(sorted(ref.items())), GOLDEN)
        print(f"added {new}")
    else:
        torch.save({name: record(o) for name, o in sorted(all_cases().items())}, GOLDEN)
    print(f"wrote {GOLDEN} ({GOLDEN.stat().st_size / 1024:.0f} KiB)")
