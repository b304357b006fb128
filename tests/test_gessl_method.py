"""The GeSSL meta-method: wiring of support/query, the hypergradient it produces, BatchNorm policy, variants,
config errors, and training through the trainer."""

import pytest
import torch
import torch.nn as nn
from torch.func import functional_call

from bilevel_ssl.config import ConfigError, TrainConfig
from bilevel_ssl.gessl import GeSSL, cosine_distance_matrix, disc_loss
from bilevel_ssl.meta import SSLNet
from bilevel_ssl.models import make_backbone
from bilevel_ssl.objectives import make_objective, nt_xent
from bilevel_ssl.trainer import CHECKPOINT, train


class TinyBackbone(nn.Module):
    """A BatchNorm-free backbone so that a hand-unrolled reference is exact."""

    def __init__(self, d_in=12, d=6):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(d_in, 10), nn.Tanh(), nn.Linear(10, d))
        self.feature_dim = d
        self.spec = {"name": "tiny", "in_channels": 3}

    def forward(self, x):
        return self.net(x)


def tiny_setup(hypergrad="second_order", m=2, **meta_args):
    torch.manual_seed(0)
    cfg = TrainConfig(meta="gessl", hypergrad=hypergrad, batch_size=8, progress=False,
                      objective_args={"temperature": 0.5, "proj_hidden": 5, "proj_dim": 4},
                      meta_args={"m": m, "inner_lr": 0.3, **meta_args})
    objective = make_objective("simclr", **cfg.objective_args)
    head = nn.ModuleDict({"projector": nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4))})
    net = SSLNet(TinyBackbone(), head)
    method = GeSSL(objective, net, cfg)
    views = [torch.randn(8, 3, 2, 2) for _ in range(3)]
    return cfg, net, method, views


def reference_grads(cfg, net, method, views):
    """Eq. 4-5 written out by hand: one inner SGD step with create_graph, outer loss at θ', autograd to θ and φ."""
    x1, x2, anchor = views
    gcfg = method.cfg
    names = [n for n, _ in net.named_parameters()]
    theta = [p for _, p in net.named_parameters()]
    phi = list(method.g.parameters())
    m, n = gcfg.m, 8 // gcfg.m

    def fwd(params, x):
        return functional_call(net, dict(zip(names, params)), (x,))

    def ssl(params, xa, xb):
        za, zb = fwd(params, xa)["z"], fwd(params, xb)["z"]
        return torch.stack([nt_xent(za[l * n:(l + 1) * n], zb[l * n:(l + 1) * n], 0.5) for l in range(m)]).mean()

    h1, ha = fwd(theta, x1)["h"], fwd(theta, anchor)["h"]
    u, v = h1.reshape(m, n, -1), ha.reshape(m, n, -1)
    a = functional_call(method.g, dict(zip([k for k, _ in method.g.named_parameters()], phi)), (u, v))
    inner = ssl(theta, x1, anchor) + gcfg.mu * disc_loss(cosine_distance_matrix(u, v), a, k=gcfg.k).mean()
    grads = torch.autograd.grad(inner, theta, create_graph=True)
    adapted = [t - gcfg.inner_lr * g for t, g in zip(theta, grads)]
    outer = ssl(adapted, x2, anchor)
    return torch.autograd.grad(outer, theta + phi)


def test_second_order_step_equals_hand_unrolled_eq4_eq5():
    # note: the method forwards support views in one concatenated pass; without BatchNorm that equals two passes
    cfg, net, method, views = tiny_setup()
    method.compute_grads(net, views)
    ref = reference_grads(cfg, net, method, views)
    got = [p.grad for _, p in net.named_parameters()] + [p.grad for p in method.g.parameters()]
    for r, g in zip(ref, got):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)
    assert sum(float(g.abs().sum()) for g in got[-len(list(method.g.parameters())):]) > 0  # g learns


@pytest.mark.parametrize("engine", ["first_order", "momentum_proxy"])
def test_first_order_engines_give_g_exactly_zero_gradient(engine):
    cfg, net, method, views = tiny_setup(hypergrad=engine, allow_untrained_meta=True)
    logs = method.compute_grads(net, views)
    assert logs["g_grad_norm"] == 0.0
    assert all(torch.count_nonzero(p.grad) == 0 for p in method.g.parameters())
    assert any(torch.count_nonzero(p.grad) > 0 for p in net.parameters())


@pytest.mark.parametrize("engine", ["first_order", "momentum_proxy"])
def test_an_engine_that_leaves_g_untrained_is_refused_before_training(engine):
    """#24: g with exactly zero gradient is never silent - check_config (run by TrainConfig) refuses, naming the
    key, the engine, why and the fix; the flag lets an ablation that means it through."""
    with pytest.raises(ValueError) as err:
        TrainConfig(meta="gessl", hypergrad=engine, batch_size=8, meta_args={"m": 2})
    msg = str(err.value)
    for part in ("hypergrad", repr(engine), "exactly zero gradient", "first-order engines drop", "second_order",
                 "aid_fd", "allow_untrained_meta: true"):
        assert part in msg, (part, msg)
    TrainConfig(meta="gessl", hypergrad=engine, batch_size=8, meta_args={"m": 2, "allow_untrained_meta": True})
    TrainConfig(meta="gessl", hypergrad=engine, batch_size=8, meta_args={"m": 2, "variant": "joint"})  # g trained
    with pytest.raises(ValueError, match="allow_untrained_meta"):
        TrainConfig(meta="gessl", batch_size=8, meta_args={"m": 2, "allow_untrained_meta": "yes"})


def test_support_and_query_see_the_right_views():
    cfg, net, method, views = tiny_setup()
    x1, x2, anchor = views
    theta = [p for p in net.parameters()]
    phi = list(method.g.parameters())
    inner, outer, _ = method._losses(net, x1, x2, anchor, None)
    inner_other_x1, outer_other_x1, _ = method._losses(net, x1 * 0 + 1, x2, anchor, None)
    assert outer(theta, phi).item() == outer_other_x1(theta, phi).item()  # query ignores x1
    assert inner(theta, phi).item() != inner_other_x1(theta, phi).item()  # support uses x1
    inner_x2, _, _ = method._losses(net, x1, x2 * 3, anchor, None)
    assert inner(theta, phi).item() == inner_x2(theta, phi).item()  # support ignores x2


def test_batchnorm_running_stats_advance_once_per_step_whatever_the_engine():
    torch.manual_seed(0)
    cfg = TrainConfig(meta="gessl", hypergrad="aid_fd", batch_size=8, meta_args={"m": 2}, progress=False,
                      objective_args={"proj_hidden": 8, "proj_dim": 4})
    objective = make_objective("simclr", **cfg.objective_args)
    backbone = make_backbone("conv4", 3, width=4)
    net = SSLNet(backbone, objective.heads(backbone.feature_dim))
    method = GeSSL(objective, net, cfg)
    bn = net.backbone.features[1]
    before = bn.running_mean.clone()
    method.compute_grads(net, [torch.rand(8, 3, 28, 28) for _ in range(3)])
    assert int(bn.num_batches_tracked) == 1  # aid_fd evaluated the inner loss 3 times, on buffer copies
    assert not torch.equal(bn.running_mean, before)


@pytest.mark.parametrize("variant", ["joint", "per_task"])
def test_ablation_variants_run_and_train_g(variant):
    _, net, method, views = tiny_setup(variant=variant)
    logs = method.compute_grads(net, views)
    assert torch.isfinite(torch.tensor(logs["loss"])) and logs["g_grad_norm"] > 0


def test_per_task_with_one_task_equals_bilevel():
    _, net, method, views = tiny_setup(m=1)
    method.compute_grads(net, views)
    a = [p.grad.clone() for p in net.parameters()]
    _, net2, method2, _ = tiny_setup(m=1, variant="per_task")
    method2.compute_grads(net2, views)
    for x, y in zip(a, [p.grad for p in net2.parameters()]):
        torch.testing.assert_close(x, y)


BAD = [
    ({"meta_args": {"m": 5}}, r"meta_args.m / batch_size: 5 does not divide the batch size 32"),
    ({"meta_args": {"variant": "two_stage"}}, r"variant: unknown value 'two_stage'; allowed: bilevel, joint, per_task"),
    ({"meta_args": {"mu": -1.0}}, r"meta_args.mu: must be a finite number >= 0"),
    ({"meta_args": {"lambda": 1.0}}, r"unknown gessl option\(s\) \['lambda'\]; allowed: mu, k, m"),
    ({"hypergrad_args": {"fd_r": 0.1}}, r"fd_r"),
]


@pytest.mark.parametrize("bad,message", BAD)
def test_bad_gessl_params_rejected_before_compute(bad, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**{"meta": "gessl", "batch_size": 32, **bad})


@pytest.mark.parametrize("objective,args", [("simclr", {"proj_hidden": 16, "proj_dim": 8}),
                                            ("byol", {"proj_hidden": 16, "proj_dim": 8})])
def test_trains_through_the_trainer_and_resumes_exactly(tiny, tmp_path, objective, args):
    cfg = TrainConfig(objective=objective, objective_args=args, meta="gessl", meta_args={"m": 4}, epochs=2,
                      batch_size=32, backbone_args={"width": 8}, lr=0.05, checkpoint_every=1, progress=False)
    full = train(cfg, tiny, tmp_path / "full")
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in full.history)

    def stop(epoch, record):
        if epoch == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(cfg, tiny, tmp_path / "resumed", callbacks=(stop,))
    resumed = train(cfg, tiny, tmp_path / "resumed")
    assert [r["loss"] for r in resumed.history] == [r["loss"] for r in full.history]
    g_full = torch.load(tmp_path / "full" / CHECKPOINT, weights_only=False)["meta"]["g"]
    g_res = torch.load(tmp_path / "resumed" / CHECKPOINT, weights_only=False)["meta"]["g"]
    assert all(torch.equal(g_full[k], g_res[k]) for k in g_full)


def test_aid_fd_matches_second_order_in_float64_and_stop_gradient_in_g_breaks_that():
    """Why GeSSLConfig.g_detach defaults to False: with a stop-gradient inside the inner objective the engines
    differentiate different maps (see GeSSLConfig's docstring)."""
    torch.set_default_dtype(torch.float64)
    try:
        rel = {}
        for detach in (False, True):
            _, net, method, views = tiny_setup(g_detach=detach)
            method.compute_grads(net, views)
            exact = [p.grad.clone() for p in net.parameters()]
            _, net2, method2, _ = tiny_setup(hypergrad="aid_fd", g_detach=detach)
            method2.engine = type(method2.engine)(fd_r=1e-4)
            method2.compute_grads(net2, views)
            rel[detach] = max(float((p.grad - e).abs().max() / e.abs().max())
                              for p, e in zip(net2.parameters(), exact))
    finally:
        torch.set_default_dtype(torch.float32)
    assert rel[False] < 1e-5 and rel[True] > 0.1, rel


def test_generative_objective_mae_two_maskings_of_one_anchor():
    torch.manual_seed(0)
    cfg = TrainConfig(objective="mae", backbone="vit_tiny", meta="gessl", meta_args={"m": 2}, batch_size=8,
                      backbone_args={"dim": 32, "depth": 1, "heads": 2, "image_size": 28},
                      objective_args={"decoder_dim": 16, "decoder_depth": 1, "decoder_heads": 2})
    from bilevel_ssl.trainer import build_net

    net, objective = build_net(cfg, 3, 28)
    method = GeSSL(objective, net, cfg)
    assert method.n_views == 1
    x = torch.rand(8, 3, 28, 28)
    inner, outer, _ = method._losses(net, x, x, x, None)
    theta, phi = list(net.parameters()), list(method.g.parameters())
    assert inner(theta, phi).item() == inner(theta, phi).item()  # one mask per step, however often evaluated
    assert outer(theta, phi).item() != inner(theta, phi).item()  # query uses the other masking
    logs = method.compute_grads(net, [x])
    assert torch.isfinite(torch.tensor(logs["loss"])) and logs["g_grad_norm"] > 0
    assert all(p.grad is not None for p in net.backbone.parameters())


SMALL = {"simclr": {"proj_hidden": 16, "proj_dim": 8}, "moco_v2": {"proj_hidden": 16, "proj_dim": 8, "queue_size": 32},
         "byol": {"proj_hidden": 16, "proj_dim": 8, "pred_hidden": 16}, "simsiam": {"proj_hidden": 16, "proj_dim": 8},
         "dino": {"out_dim": 32, "hidden_dim": 16, "bottleneck_dim": 8},
         "barlow_twins": {"proj_hidden": 16, "proj_dim": 16}, "vicreg": {"proj_hidden": 16, "proj_dim": 16},
         "swav": {"proj_hidden": 16, "proj_dim": 8, "n_prototypes": 4},
         "mae": {"decoder_dim": 16, "decoder_depth": 1, "decoder_heads": 2}}


@pytest.mark.parametrize("objective", list(SMALL))
def test_gessl_wraps_every_objective_of_the_zoo(objective):
    from bilevel_ssl.objectives import OBJECTIVES
    from bilevel_ssl.trainer import build_net

    assert set(SMALL) == set(OBJECTIVES)
    vit = objective == "mae"
    cfg = TrainConfig(objective=objective, objective_args=SMALL[objective], meta="gessl", meta_args={"m": 2},
                      batch_size=8, backbone="vit_tiny" if vit else "conv4",
                      backbone_args={"dim": 16, "depth": 1, "heads": 2} if vit else {"width": 4})
    torch.manual_seed(0)
    net, obj = build_net(cfg, 3, 28)
    method = GeSSL(obj, net, cfg)
    logs = method.compute_grads(net, [torch.rand(8, 3, 28, 28) for _ in range(method.n_views)])
    assert torch.isfinite(torch.tensor(logs["loss"]))
    assert logs["g_grad_norm"] > 0  # second order: g learns through θ'(θ, φ)
    method.after_step(net, 0.5)  # teacher EMA / objective state after the outer step


@pytest.mark.parametrize("engine,key", [("aid_cg", "cg_residual"), ("aid_neumann", "neumann_growth"),
                                        ("aid_fd", "fd_check_error")])
@pytest.mark.parametrize("variant", ["bilevel", "per_task"])
def test_engine_quality_is_in_the_step_logs(engine, key, variant):
    """#24: the engine's own quality measure reaches the step's log dict (per_task: the worst of the m calls)."""
    import warnings

    cfg, net, method, views = tiny_setup(hypergrad=engine, variant=variant)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        logs = method.compute_grads(net, views)
    assert key in logs and logs[key] >= 0 and logs[key] < float("inf")
