"""GeSSL building blocks (bilevel_ssl.gessl) against loop implementations of the paper's equations."""

import math

import pytest
import torch

from bilevel_ssl.gessl import (
    K,
    MU,
    GeSSLConfig,
    ThresholdNet,
    cosine_distance_matrix,
    disc_loss,
    disc_loss_hard,
    make_tasks,
)


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ---------------------------------------------------------------- references (loops over the paper's indices)


def ref_distance(u, v):
    """d_j^i = 1 - cos(f(x1_j), f(anchor_i)) as a nested list [i][j] (GeSSL Eq. 2)."""
    return [[1.0 - (u[j] @ v[i]).item() / (u[j].norm() * v[i].norm()).item() for j in range(len(u))]
            for i in range(len(v))]


def ref_eq3(d, a, k):
    """GeSSL Eq. 3 literally: sum_i sum_j [w * d + (1 - w) * (-d)], w = 1 / (1 + exp(-k (a_i - d_ij)))."""
    total = 0.0
    for i in range(len(d)):
        for j in range(len(d[i])):
            w = 1.0 / (1.0 + math.exp(-k * (a[i] - d[i][j])))
            total += w * d[i][j] + (1.0 - w) * (-d[i][j])
    return total


def ref_eq2(d, a):
    total = 0.0
    for i in range(len(d)):
        for j in range(len(d[i])):
            total += d[i][j] if d[i][j] <= a[i] else -d[i][j]
    return total


# ---------------------------------------------------------------- tasks


def test_make_tasks_partitions_the_batch():
    idx = make_tasks(32, 8)
    assert idx.shape == (8, 4) and idx.dtype == torch.long
    assert torch.equal(idx.flatten(), torch.arange(32))
    shuffled = make_tasks(32, 4, generator=torch.Generator().manual_seed(0))
    assert shuffled.shape == (4, 8)
    assert torch.equal(shuffled.flatten().sort().values, torch.arange(32))  # each image in exactly one task
    assert not torch.equal(shuffled.flatten(), torch.arange(32))


@pytest.mark.parametrize("m", [5, 0, 32, 2.0, True])
def test_make_tasks_rejects_bad_m(m):
    with pytest.raises(ValueError) as err:
        make_tasks(32, m)
    msg = str(err.value)
    assert "m" in msg and "32" in msg and "1, 2, 4, 8, 16" in msg


# ---------------------------------------------------------------- distances


def test_cosine_distance_matrix_matches_loop():
    u, v = _randn(5, 7, seed=1), _randn(5, 7, seed=2)
    d = cosine_distance_matrix(u, v)
    assert d.shape == (5, 5)
    torch.testing.assert_close(d, torch.tensor(ref_distance(u, v), dtype=torch.float64))
    # row i = anchor i: scaling one anchor changes nothing, moving anchor 0 onto support sample 3 zeroes d[0, 3]
    v2 = v.clone()
    v2[0] = 4.0 * u[3]
    d2 = cosine_distance_matrix(u, v2)
    assert d2[0, 3].item() == pytest.approx(0.0, abs=1e-12)
    torch.testing.assert_close(d2[1:], d[1:])
    # rectangular and batched over tasks
    assert cosine_distance_matrix(_randn(6, 7), _randn(4, 7)).shape == (4, 6)
    ub, vb = _randn(3, 5, 7, seed=3), _randn(3, 5, 7, seed=4)
    db = cosine_distance_matrix(ub, vb)
    for l in range(3):
        torch.testing.assert_close(db[l], cosine_distance_matrix(ub[l], vb[l]))
    assert ((db >= -1e-12) & (db <= 2 + 1e-12)).all()


# ---------------------------------------------------------------- Eq. 2 / Eq. 3


@pytest.mark.parametrize("k", [1.0, K, 100.0])
def test_disc_loss_matches_eq3_loop(k):
    n = 6
    d = cosine_distance_matrix(_randn(n, 4, seed=5), _randn(n, 4, seed=6))
    a = torch.rand(n, generator=torch.Generator().manual_seed(7), dtype=torch.float64) * 2
    ref = ref_eq3(d.tolist(), a.tolist(), k)
    assert disc_loss(d, a, k, reduction="sum").item() == pytest.approx(ref, rel=1e-10)
    assert disc_loss(d, a, k).item() == pytest.approx(ref / n**2, rel=1e-10)  # default: mean over the n^2 terms
    assert disc_loss(d, a, k, reduction="none").shape == (n, n)
    # batched over tasks: one value per task
    db, ab = torch.stack([d, d.flip(0)]), torch.stack([a, a.flip(0)])
    per_task = disc_loss(db, ab, k)
    assert per_task.shape == (2,)
    assert per_task[1].item() == pytest.approx(ref_eq3(d.flip(0).tolist(), a.flip(0).tolist(), k) / n**2, rel=1e-10)


def test_disc_loss_hard_matches_eq2_loop_and_large_k_limit():
    n = 5
    d = cosine_distance_matrix(_randn(n, 3, seed=8), _randn(n, 3, seed=9))
    # thresholds at least 1e-3 away from every distance of their row
    a = torch.tensor([0.3, 0.8, 1.0, 1.4, 1.9], dtype=torch.float64)
    gap = (d - a[:, None]).abs().min().item()
    assert gap > 1e-3
    hard = disc_loss_hard(d, a, reduction="sum").item()
    assert hard == pytest.approx(ref_eq2(d.tolist(), a.tolist()), rel=1e-12)
    errors = [abs(disc_loss(d, a, k, reduction="sum").item() - hard) for k in (10.0, 100.0, 1e4, 1e7)]
    assert errors[0] > errors[1] > errors[2]  # converges as k grows
    assert errors[-1] < 1e-9  # k -> infinity recovers Eq. 2
    # the tie d_ij = a_i: Eq. 2 pulls (<=), Eq. 3 sits at w = 1/2, a zero term
    tie = torch.tensor([[0.5]], dtype=torch.float64)
    assert disc_loss_hard(tie, torch.tensor([0.5], dtype=torch.float64)).item() == 0.5
    assert disc_loss(tie, torch.tensor([0.5], dtype=torch.float64), 1e6).item() == 0.0


def test_disc_loss_gradient_pulls_below_threshold_pushes_above():
    a = torch.tensor([0.6, 0.6], dtype=torch.float64, requires_grad=True)
    d = torch.tensor([[0.2, 1.2], [0.3, 0.9]], dtype=torch.float64, requires_grad=True)  # left: d < a, right: d > a
    gd, ga = torch.autograd.grad(disc_loss(d, a, K, reduction="sum"), (d, a))
    assert (gd[:, 0] > 0).all()  # descent lowers d: pulls the pair together
    assert (gd[:, 1] < 0).all()  # descent raises d: pushes the pair apart
    torch.testing.assert_close(gd, torch.tensor([[1.0, -1.0], [1.0, -1.0]], dtype=torch.float64), atol=0.02, rtol=0)
    # Eq. 3 gives the thresholds a gradient: dL/da_i = sum_j 2 k d_ij w (1 - w) > 0
    assert (ga > 0).all()
    w = torch.sigmoid(K * (a.detach()[:, None] - d.detach()))
    torch.testing.assert_close(ga, (2 * K * d.detach() * w * (1 - w)).sum(1))
    # ... Eq. 2 does not: its gate is a comparison, a is not even in the graph (the paper's reason for Eq. 3)
    d2 = d.detach().requires_grad_(True)
    gd2, ga2 = torch.autograd.grad(disc_loss_hard(d2, a, reduction="sum"), (d2, a), allow_unused=True)
    assert ga2 is None
    torch.testing.assert_close(gd2, torch.tensor([[1.0, -1.0], [1.0, -1.0]], dtype=torch.float64))


def test_disc_loss_input_checks():
    d = torch.zeros(3, 3)
    with pytest.raises(ValueError, match="reduction.*allowed: mean, sum, none"):
        disc_loss(d, torch.zeros(3), reduction="avg")
    with pytest.raises(ValueError, match="one threshold per row"):
        disc_loss(d, torch.zeros(2))
    with pytest.raises(ValueError, match="k must be > 0"):
        disc_loss(d, torch.zeros(3), k=0.0)


# ---------------------------------------------------------------- g


@pytest.mark.parametrize("stats", ["meanvar", "meancov"])
def test_threshold_net_shapes_range_and_permutation_invariance(stats):
    torch.manual_seed(0)
    g = ThresholdNet(8, stats=stats, hidden=16, cov_rank=4).double()
    u, v = _randn(6, 8, seed=10), _randn(6, 8, seed=11)
    a = g(u, v)
    assert a.shape == (6,)
    assert ((a > 0) & (a < 2)).all()
    perm = torch.randperm(6, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(g(u[perm], v), a)  # order of the support samples j is irrelevant
    torch.testing.assert_close(g(u, v[perm]), a[perm])  # anchors are equivariant
    # batched over tasks, no loop over anchors or tasks
    ub, vb = _randn(3, 6, 8, seed=12), _randn(3, 6, 8, seed=13)
    ab = g(ub, vb)
    assert ab.shape == (3, 6)
    torch.testing.assert_close(ab[2], g(ub[2], vb[2]))
    n_features = 16 if stats == "meanvar" else 8 + 10
    assert g.statistics(u, v).shape == (6, n_features)


def test_threshold_net_meanvar_statistics_match_difference_set():
    dim, n = 5, 7
    g = ThresholdNet(dim).double()
    u, v = _randn(n, dim, seed=14), _randn(n, dim, seed=15)
    un, vn = u / u.norm(dim=1, keepdim=True), v / v.norm(dim=1, keepdim=True)
    feats = g.statistics(u, v)
    for i in range(n):
        diffs = torch.stack([un[j] - vn[i] for j in range(n)])  # the set {f(x1_j) - f(anchor_i)}_j
        mean, var = diffs.mean(0), diffs.var(0, unbiased=False)
        torch.testing.assert_close(feats[i], torch.cat([mean * math.sqrt(dim), var * dim]))


def test_threshold_net_meancov_statistics_match_difference_set():
    dim, n, r = 6, 5, 3
    g = ThresholdNet(dim, stats="meancov", cov_rank=r).double()
    u, v = _randn(n, dim, seed=16), _randn(n, dim, seed=17)
    un, vn = u / u.norm(dim=1, keepdim=True), v / v.norm(dim=1, keepdim=True)
    feats = g.statistics(u, v)
    rows, cols = torch.triu_indices(r, r)
    for i in range(n):
        diffs = un - vn[i]
        cov = torch.cov(diffs.T, correction=0)  # dim x dim covariance of the difference set
        reduced = (g.proj.T @ cov @ g.proj)[rows, cols]
        torch.testing.assert_close(feats[i], torch.cat([diffs.mean(0) * math.sqrt(dim), reduced * dim]))


@pytest.mark.parametrize("stats", ["meanvar", "meancov"])
def test_threshold_net_initial_threshold_is_mean_distance(stats):
    torch.manual_seed(0)
    g = ThresholdNet(16, stats=stats).double()
    u, v = _randn(2, 8, 16, seed=18), _randn(2, 8, 16, seed=19)
    mean_dist = cosine_distance_matrix(u, v).mean(-1)
    torch.testing.assert_close(g(u, v), mean_dist, atol=0.02, rtol=0)
    plain = ThresholdNet(16, stats=stats, residual=False).double()
    torch.testing.assert_close(plain(u, v), torch.ones(2, 8, dtype=torch.float64), atol=0.02, rtol=0)


@pytest.mark.parametrize("stats", ["meanvar", "meancov"])
def test_gradients_reach_threshold_net(stats):
    torch.manual_seed(0)
    g = ThresholdNet(8, stats=stats, hidden=16, cov_rank=4, detach_input=True).double()
    u, v = _randn(2, 6, 8, seed=20).requires_grad_(True), _randn(2, 6, 8, seed=21).requires_grad_(True)
    loss = disc_loss(cosine_distance_matrix(u, v), g(u, v), k=K)  # L_disc(f, g, S_l) of the m = 2 tasks
    assert loss.shape == (2,)
    loss.sum().backward()
    for name, p in g.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    # the embeddings get gradient through the distances only (g's input is detached with detach_input) ...
    u2, v2 = u.detach().clone().requires_grad_(True), v.detach().clone().requires_grad_(True)
    g(u2, v2).sum().backward()
    assert u2.grad is None and v2.grad is None
    # ... and through g's statistics too without it (the default, as GeSSL's g_detach: False)
    g_through = ThresholdNet(8, stats=stats, hidden=16, cov_rank=4).double()
    assert not g_through.detach_input
    g_through(u2, v2).sum().backward()
    assert u2.grad is not None and u2.grad.abs().sum() > 0


def test_threshold_net_rejects_bad_arguments():
    with pytest.raises(ValueError, match="stats.*allowed: meanvar, meancov"):
        ThresholdNet(8, stats="cov")
    with pytest.raises(ValueError, match="hidden"):
        ThresholdNet(8, hidden=0)
    with pytest.raises(ValueError, match=r"expected u \(\.\.\., n, 8\)"):
        ThresholdNet(8)(torch.randn(4, 7), torch.randn(4, 7))


# ---------------------------------------------------------------- config


def test_config_defaults_and_net():
    cfg = GeSSLConfig()
    assert (cfg.mu, cfg.k, cfg.m, cfg.inner_steps) == (MU, K, 8, 1) == (0.7, 30.0, 8, 1)
    assert (cfg.stats, cfg.reduction) == ("meanvar", "mean")
    assert cfg.g_detach is False and not cfg.threshold_net(8).detach_input  # Eq. 4 literally (see docstring)
    g = GeSSLConfig(stats="meancov", cov_rank=4).threshold_net(8)
    assert isinstance(g, ThresholdNet) and g.stats == "meancov" and g.proj.shape == (8, 4)


@pytest.mark.parametrize("key, value, match", [
    ("mu", -0.1, "^meta_args.mu: must be a finite number >= 0, got -0.1$"),
    ("k", 0.0, "^meta_args.k: must be a finite number > 0"),
    ("m", 0, "^meta_args.m: must be an integer >= 1"),
    ("inner_steps", 0, "^meta_args.inner_steps: must be an integer >= 1"),
    ("inner_lr", 0.0, "^meta_args.inner_lr: must be a finite number > 0"),
    ("inner_lr", float("nan"), "^meta_args.inner_lr: must be a finite number > 0, got nan"),
    ("stats", "cov", "^meta_args.stats: unknown value 'cov'; allowed: meanvar, meancov$"),
    ("reduction", "none", "^meta_args.reduction: unknown value 'none'; allowed: mean, sum$"),
    ("m", 2.5, "^meta_args.m: must be an integer >= 1, got float 2.5"),
    ("mu", "0.7", "^meta_args.mu: must be a finite number >= 0, got str '0.7'"),
    ("g_detach", 1, "^meta_args.g_detach: must be true or false, got int 1"),
])
def test_config_validation(key, value, match):
    with pytest.raises(ValueError, match=match):
        GeSSLConfig(**{key: value})
    GeSSLConfig(mu=0, k=1)  # ints are fine for float fields; mu = 0 switches L_disc off
