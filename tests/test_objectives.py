import math

import pytest
import torch

from bilevel_ssl.objectives import OBJECTIVES, make_objective, nt_xent


def reference_nt_xent(z1, z2, tau):
    """Chen et al. (2020) Algorithm 1, written as loops over the 2N anchors."""
    z = torch.cat([z1, z2]).double()
    n2 = z.shape[0]
    n = n2 // 2
    sim = [[(z[i] @ z[k] / (z[i].norm() * z[k].norm())).item() for k in range(n2)] for i in range(n2)]
    total = 0.0
    for i in range(n2):
        pos = (i + n) % n2
        denom = sum(math.exp(sim[i][k] / tau) for k in range(n2) if k != i)
        total += -math.log(math.exp(sim[i][pos] / tau) / denom)
    return total / n2


@pytest.mark.parametrize("tau", [0.1, 0.5, 1.0])
def test_nt_xent_matches_reference(tau):
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    assert nt_xent(z1, z2, tau).item() == pytest.approx(reference_nt_xent(z1, z2, tau), rel=1e-5)


def test_nt_xent_properties():
    g = torch.Generator().manual_seed(1)
    z1, z2 = torch.randn(8, 4, generator=g), torch.randn(8, 4, generator=g)
    assert nt_xent(z1, z2).item() == pytest.approx(nt_xent(z2, z1).item(), rel=1e-6)  # symmetric
    assert nt_xent(3 * z1, 0.5 * z2).item() == pytest.approx(nt_xent(z1, z2).item(), rel=1e-5)  # scale-free
    aligned = torch.eye(8)  # positives identical, negatives orthogonal: the optimum's neighbourhood
    assert nt_xent(aligned, aligned).item() < nt_xent(z1, z2).item()
    # collapse: all embeddings equal -> loss = log(2N - 1)
    same = torch.ones(8, 4)
    assert nt_xent(same, same).item() == pytest.approx(math.log(15), rel=1e-6)


def test_nt_xent_shape_error():
    with pytest.raises(ValueError, match="equal shape"):
        nt_xent(torch.randn(4, 3), torch.randn(5, 3))


def test_registry_errors_name_choices():
    assert make_objective("simclr", temperature=0.2).temperature == 0.2
    with pytest.raises(ValueError, match="allowed: " + ", ".join(OBJECTIVES)):
        make_objective("simclr++")
