"""Barlow Twins, VICReg (objectives/redundancy.py) and SwAV (objectives/clustering.py): each loss against a
reference written here with loops over entries, the properties that matter, and an end-to-end smoke run."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from bilevel_ssl.config import TrainConfig
from bilevel_ssl.meta import SSLNet
from bilevel_ssl.models import MLPHead
from bilevel_ssl.objectives import make_objective
from bilevel_ssl.objectives.clustering import Prototypes, SwAV, sinkhorn_knopp, swav_loss
from bilevel_ssl.objectives.redundancy import (BarlowTwins, VICReg, barlow_twins_loss, cross_correlation,
                                               vicreg_loss, vicreg_terms)
from bilevel_ssl.trainer import build_net, train


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def hadamard(n):
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)])
    return h


# ------------------------------------------------------------------ Barlow Twins


def reference_barlow(z1, z2, lambd):
    """Zbontar et al. (2021) Eqs. 1-2 with mean-centred embeddings, as loops over the matrix entries."""
    a, b = z1.double().tolist(), z2.double().tolist()
    n, d = len(a), len(a[0])
    ca = [[a[k][i] - sum(a[m][i] for m in range(n)) / n for i in range(d)] for k in range(n)]
    cb = [[b[k][j] - sum(b[m][j] for m in range(n)) / n for j in range(d)] for k in range(n)]
    total = 0.0
    for i in range(d):
        for j in range(d):
            num = sum(ca[k][i] * cb[k][j] for k in range(n))
            den = math.sqrt(sum(ca[k][i] ** 2 for k in range(n))) * math.sqrt(sum(cb[k][j] ** 2 for k in range(n)))
            c = num / den
            total += (1 - c) ** 2 if i == j else lambd * c ** 2
    return total


@pytest.mark.parametrize("lambd", [0.0051, 0.5])
def test_barlow_matches_reference(lambd):
    z1, z2 = randn(10, 5, seed=1), randn(10, 5, seed=2) * 3 + 1
    ref = reference_barlow(z1, z2, lambd)
    assert barlow_twins_loss(z1, z2, lambd, eps=0.0).item() == pytest.approx(ref, rel=1e-5)
    # the default BatchNorm epsilon (1e-5 on variances of order 1-10) changes the value only slightly
    assert barlow_twins_loss(z1, z2, lambd).item() == pytest.approx(ref, rel=1e-3)


def test_barlow_cross_correlation_is_pearson():
    z1, z2 = randn(12, 4, seed=3), randn(12, 4, seed=4)
    c = cross_correlation(z1, z2, eps=0.0)
    for i in range(4):
        for j in range(4):
            ref = torch.corrcoef(torch.stack([z1[:, i], z2[:, j]]))[0, 1]
            assert c[i, j].item() == pytest.approx(ref.item(), abs=1e-5)


def test_barlow_properties():
    z1, z2 = randn(16, 6, seed=5), randn(16, 6, seed=6)
    assert barlow_twins_loss(z1, z2).item() == pytest.approx(barlow_twins_loss(z2, z1).item(), rel=1e-6)
    # invariant to per-unit affine rescaling (the batch normalisation)
    scale, shift = torch.linspace(0.5, 4, 6), torch.linspace(-2, 2, 6)
    assert barlow_twins_loss(z1 * scale + shift, z2, eps=0.0).item() == pytest.approx(
        barlow_twins_loss(z1, z2, eps=0.0).item(), rel=1e-5)
    # perfectly decorrelated identical embeddings: zero-mean orthogonal Hadamard columns -> C = I -> loss ~ 0
    z = hadamard(16)[:, 1:9] * 2.5
    assert torch.allclose(cross_correlation(z, z), torch.eye(8), atol=1e-5)
    assert barlow_twins_loss(z, z).item() < 1e-8
    # fully redundant identical embeddings (every unit the same signal): C = all ones -> loss = λ d(d-1)
    col = randn(16, 1, seed=7)
    same = col.repeat(1, 8)
    assert barlow_twins_loss(same, same, 0.0051).item() == pytest.approx(0.0051 * 8 * 7, rel=1e-4)
    # not divided by d: the same per-unit correlation structure on twice the units gives twice the on-diagonal sum
    noisy = hadamard(16)[:, 1:9] + 0.3 * randn(16, 8, seed=8)
    on1 = barlow_twins_loss(hadamard(16)[:, 1:9], noisy, lambd=0.0)
    on2 = barlow_twins_loss(torch.cat([hadamard(16)[:, 1:9]] * 2, 1), torch.cat([noisy] * 2, 1), lambd=0.0)
    assert on2.item() == pytest.approx(2 * on1.item(), rel=1e-5)


def test_barlow_objective_heads_and_loss():
    obj = make_objective("barlow_twins", proj_hidden=12, proj_dim=10)
    assert isinstance(obj, BarlowTwins) and obj.lambd == 0.0051 and obj.n_views == 2
    heads = obj.heads(7)
    linears = [m for m in heads["projector"].modules() if isinstance(m, nn.Linear)]
    bns = [m for m in heads["projector"].modules() if isinstance(m, nn.BatchNorm1d)]
    assert [(m.in_features, m.out_features) for m in linears] == [(7, 12), (12, 12), (12, 10)] and len(bns) == 2
    z1, z2 = randn(8, 10, seed=9), randn(8, 10, seed=10)
    out = [{"h": z1, "z": z1}, {"h": z2, "z": z2}]
    assert obj.loss(out, None).item() == pytest.approx(barlow_twins_loss(z1, z2, 0.0051).item())
    assert obj.state_dict() == {}
    with pytest.raises(ValueError, match="lambd must be >= 0"):
        BarlowTwins(lambd=-1.0)
    with pytest.raises(ValueError, match="proj_dim must be > 0"):
        BarlowTwins(proj_dim=0)


# ------------------------------------------------------------------ VICReg


def reference_vicreg(z1, z2, lam, mu, nu, gamma=1.0, eps=1e-4):
    """Bardes et al. (2022) Eqs. 1-6 as explicit sums over entries."""
    a, b = z1.double().tolist(), z2.double().tolist()
    n, d = len(a), len(a[0])
    inv = sum((a[k][j] - b[k][j]) ** 2 for k in range(n) for j in range(d)) / (n * d)
    var = cov = 0.0
    for z in (a, b):
        mean = [sum(z[k][j] for k in range(n)) / n for j in range(d)]
        for j in range(d):
            std = math.sqrt(sum((z[k][j] - mean[j]) ** 2 for k in range(n)) / (n - 1) + eps)
            var += max(0.0, gamma - std) / d
        for i in range(d):
            for j in range(d):
                if i != j:
                    c_ij = sum((z[k][i] - mean[i]) * (z[k][j] - mean[j]) for k in range(n)) / (n - 1)
                    cov += c_ij ** 2 / d
    return lam * inv + mu * var + nu * cov, (inv, var, cov)


@pytest.mark.parametrize("coeffs", [(25.0, 25.0, 1.0), (1.0, 2.0, 3.0)])
def test_vicreg_matches_reference(coeffs):
    z1, z2 = randn(9, 6, seed=11) * 0.7, randn(9, 6, seed=12) * 1.5 + 0.5  # stds below and above γ = 1
    ref, (inv, var, cov) = reference_vicreg(z1, z2, *coeffs)
    assert vicreg_loss(z1, z2, *coeffs).item() == pytest.approx(ref, rel=1e-5)
    terms = vicreg_terms(z1, z2)
    assert [t.item() for t in terms] == pytest.approx([inv, var, cov], rel=1e-5)
    assert var > 0 and cov > 0  # both hinge branches and the covariance are exercised


def test_vicreg_properties():
    z1, z2 = randn(16, 5, seed=13), randn(16, 5, seed=14)
    assert vicreg_loss(z1, z2).item() == pytest.approx(vicreg_loss(z2, z1).item(), rel=1e-6)
    # collapse: every embedding the same vector -> invariance 0, covariance 0, variance term μ·2·(γ - sqrt(ε))
    const = randn(1, 5, seed=15).repeat(16, 1)
    inv, var, cov = vicreg_terms(const, const)
    assert inv.item() == 0 and cov.item() == 0
    assert vicreg_loss(const, const).item() == pytest.approx(25.0 * 2 * (1.0 - math.sqrt(1e-4)), rel=1e-6)
    assert vicreg_loss(const, const, gamma=2.0, eps=1e-2).item() == pytest.approx(25.0 * 2 * (2.0 - 0.1), rel=1e-6)
    # decorrelated, identical embeddings with std >= γ: every term vanishes
    z = hadamard(16)[:, 1:6] * 2.0
    assert vicreg_loss(z, z).item() == pytest.approx(0.0, abs=1e-6)


def test_vicreg_objective_heads_and_loss():
    obj = make_objective("vicreg", proj_hidden=12, proj_dim=10)
    assert isinstance(obj, VICReg) and (obj.inv_coeff, obj.var_coeff, obj.cov_coeff) == (25.0, 25.0, 1.0)
    assert (obj.gamma, obj.eps) == (1.0, 1e-4)
    linears = [m for m in obj.heads(7)["projector"].modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(7, 12), (12, 12), (12, 10)]
    z1, z2 = randn(8, 10, seed=16), randn(8, 10, seed=17)
    out = [{"z": z1}, {"z": z2}]
    assert obj.loss(out, None).item() == pytest.approx(vicreg_loss(z1, z2).item())
    assert VICReg(cov_coeff=0.0).cov_coeff == 0.0  # term ablations allowed
    with pytest.raises(ValueError, match="var_coeff must be >= 0"):
        VICReg(var_coeff=-1.0)


# ------------------------------------------------------------------ SwAV


def reference_sinkhorn(scores, eps, iters):
    """The Sinkhorn-Knopp iteration of Caron et al. (2020), loops over entries, in float64."""
    s = scores.double().tolist()
    b, k = len(s), len(s[0])
    q = [[math.exp(s[i][j] / eps) for i in range(b)] for j in range(k)]  # (K, B)
    tot = sum(map(sum, q))
    q = [[v / tot for v in row] for row in q]
    for _ in range(iters):
        q = [[v / sum(row) / k for v in row] for row in q]
        col = [sum(q[j][i] for j in range(k)) for i in range(b)]
        q = [[q[j][i] / col[i] / b for i in range(b)] for j in range(k)]
    return torch.tensor([[q[j][i] * b for j in range(k)] for i in range(b)], dtype=torch.float64)


def cosine_scores(b, k, seed):
    return F.normalize(randn(b, 6, seed=seed), dim=1) @ F.normalize(randn(k, 6, seed=seed + 100), dim=1).T


@pytest.mark.parametrize("iters", [1, 3, 10])
def test_sinkhorn_matches_reference(iters):
    s = cosine_scores(12, 5, seed=20)
    torch.testing.assert_close(sinkhorn_knopp(s, 0.05, iters).double(), reference_sinkhorn(s, 0.05, iters),
                               rtol=1e-4, atol=1e-6)


def test_sinkhorn_marginals():
    b, k = 32, 8
    s = cosine_scores(b, k, seed=21)
    q3 = sinkhorn_knopp(s, 0.05, 3)
    assert (q3 >= 0).all()
    torch.testing.assert_close(q3.sum(1), torch.ones(b))  # each sample's code is a distribution, exactly
    # the prototypes' totals approach B/K with the iterations; after 3 they are closer than the plain softmax's
    dev = lambda q: (q.sum(0) - b / k).abs().sum().item()
    assert dev(sinkhorn_knopp(s, 0.05, 1)) > dev(q3) > dev(sinkhorn_knopp(s, 0.05, 10))
    assert dev(q3) < dev(torch.softmax(s / 0.05, 1))
    q = sinkhorn_knopp(s, 0.05, 500)  # converged: equipartition exact
    torch.testing.assert_close(q.sum(1), torch.ones(b))
    torch.testing.assert_close(q.sum(0), torch.full((k,), b / k), rtol=1e-4, atol=1e-4)
    # entropic OT solution has the form diag(u) exp(S/ε) diag(v): log Q - S/ε is a sum of row and column terms
    m = q.double().log() - s.double() / 0.05
    resid = m - m.mean(1, keepdim=True) - m.mean(0, keepdim=True) + m.mean()
    assert resid.abs().max().item() < 1e-3
    # the shift before exp does not matter: adding a constant to all scores gives the same codes
    torch.testing.assert_close(sinkhorn_knopp(s + 0.7, 0.05, 3), q3)
    with pytest.raises(ValueError, match="n_iters"):
        sinkhorn_knopp(s, 0.05, 0)


def reference_swav(s1, s2, tau, eps, iters):
    q1, q2 = reference_sinkhorn(s1, eps, iters).tolist(), reference_sinkhorn(s2, eps, iters).tolist()
    a, b = s1.double().tolist(), s2.double().tolist()

    def ce(scores, codes):
        total = 0.0
        for row, q in zip(scores, codes):
            log_z = math.log(sum(math.exp(v / tau) for v in row))
            total += -sum(qk * (v / tau - log_z) for qk, v in zip(q, row))
        return total / len(scores)

    return 0.5 * (ce(b, q1) + ce(a, q2))


@pytest.mark.parametrize("tau", [0.1, 0.5])
def test_swav_loss_matches_reference(tau):
    s1, s2 = cosine_scores(10, 4, seed=22), cosine_scores(10, 4, seed=23)
    assert swav_loss(s1, s2, tau).item() == pytest.approx(reference_swav(s1, s2, tau, 0.05, 3), rel=1e-5)


def test_swav_symmetric_and_codes_carry_no_gradient():
    s1, s2 = cosine_scores(16, 5, seed=24), cosine_scores(16, 5, seed=25)
    assert swav_loss(s1, s2).item() == pytest.approx(swav_loss(s2, s1).item(), rel=1e-6)
    s1r, s2r = s1.clone().requires_grad_(), s2.clone().requires_grad_()
    q = sinkhorn_knopp(s1r)
    assert not q.requires_grad and q.grad_fn is None
    swav_loss(s1r, s2r).backward()
    # with the codes constant, d/ds1 of ½·CE(softmax(s1/τ), q2) is ½ (softmax(s1/τ) - q2) / (τ B): nothing flows
    # through the Sinkhorn step of either view
    b, tau = 16, 0.1
    expected = 0.5 * (torch.softmax(s1 / tau, 1) - sinkhorn_knopp(s2)) / (tau * b)
    torch.testing.assert_close(s1r.grad, expected, rtol=1e-4, atol=1e-6)


def test_prototypes_are_used_normalised():
    torch.manual_seed(0)
    proto = Prototypes(6, 4)
    assert isinstance(proto, nn.Linear) and proto.bias is None
    torch.testing.assert_close(proto.weight.norm(dim=1), torch.ones(4))  # unit rows at initialisation
    x = F.normalize(randn(5, 6, seed=26), dim=1)
    s = proto(x)
    with torch.no_grad():
        proto.weight.mul_(torch.tensor([[3.0], [0.5], [2.0], [7.0]]))  # drifted norms: same scores
    torch.testing.assert_close(proto(x), s)
    torch.testing.assert_close(s, x @ F.normalize(proto.weight, dim=1).T)
    # also with functional parameters (bi-level inner steps)
    w = 5 * randn(4, 6, seed=27)
    torch.testing.assert_close(torch.func.functional_call(proto, {"weight": w}, (x,)), x @ F.normalize(w, dim=1).T)
    # the gradient of a row with unit norm is tangent to the sphere
    proto2 = Prototypes(6, 4)
    proto2(x).pow(2).sum().backward()
    radial = (proto2.weight.grad * proto2.weight).sum(1)
    assert radial.abs().max().item() < 1e-5


def test_swav_objective_in_sslnet():
    obj = make_objective("swav", proj_hidden=12, proj_dim=8, n_prototypes=5)
    assert isinstance(obj, SwAV)
    assert (obj.temperature, obj.epsilon, obj.sinkhorn_iters) == (0.1, 0.05, 3)
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Flatten(), nn.Linear(12, 7))
    net = SSLNet(backbone, obj.heads(7))
    assert isinstance(net.heads["projector"], MLPHead)
    x = randn(20, 12, seed=28)
    outs = obj.outputs(net, x, 2)
    s = outs[0]["s"]
    ref = F.normalize(outs[0]["z"], dim=1) @ F.normalize(net.heads["prototypes"].weight, dim=1).T
    torch.testing.assert_close(s, ref)
    assert s.abs().max().item() <= 1 + 1e-6  # cosine scores
    loss = obj.loss(outs, None)
    assert loss.item() == pytest.approx(swav_loss(outs[0]["s"], outs[1]["s"]).item())
    loss.backward()
    assert net.heads["prototypes"].weight.grad.abs().sum() > 0
    obj.update_state([{k: v.detach() for k, v in o.items()} for o in outs], None)  # no-op, no state
    assert obj.state_dict() == {}
    with pytest.raises(KeyError, match="prototypes"):
        obj.loss([{"z": s}, {"z": s}], None)


# ------------------------------------------------------------------ end to end


SMALL = {"barlow_twins": {"proj_hidden": 32, "proj_dim": 32},
         "vicreg": {"proj_hidden": 32, "proj_dim": 32},
         "swav": {"proj_hidden": 32, "proj_dim": 16, "n_prototypes": 10}}


@pytest.mark.parametrize("name", list(SMALL))
def test_trains_end_to_end(name, tiny):
    # lr 0.05 as in test_trainer: with plain SGD at the default lr 0.3, VICReg's unnormalised loss (λ = μ = 25, and a
    # covariance term quartic in z) diverges within a few steps on this data
    cfg = TrainConfig(objective=name, epochs=2, batch_size=32, lr=0.05, backbone_args={"width": 16}, progress=False,
                      objective_args=SMALL[name])
    res = train(cfg, tiny)
    assert len(res.history) == 2
    assert all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in res.history)
    init, _ = build_net(cfg, tiny.channels, tiny.images.shape[-1])  # the same initial weights (seeded)
    trained = res.net.state_dict()
    for key in ("heads.projector.net.0.weight", "heads.prototypes.weight"):
        if key in init.state_dict():
            assert not torch.allclose(init.state_dict()[key], trained[key]), key
    assert ("heads.prototypes.weight" in trained) == (name == "swav")
