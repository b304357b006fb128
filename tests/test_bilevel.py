"""The base of the bi-level meta-methods (bilevel_ssl.bilevel): the Joint one-stage engine, the one door to a
method's own modules (parameters, device, checkpoint state) and the shared task-split check."""

import pytest
import torch

from bilevel_ssl.bench import _setup
from bilevel_ssl.bilevel import BiLevelMethod, Joint
from bilevel_ssl.gessl import GeSSLConfig
from bilevel_ssl.meta import allowed_n_tasks, check_n_tasks

TINY = {"backbone_args": {"width": 4}, "objective_args": {"proj_hidden": 8, "proj_dim": 4}}
OWN = {"gessl": ["g"], "tc2": ["f_v", "f_w"], "mcr": ["compmod"]}


def test_joint_is_the_gradient_of_the_summed_losses_at_the_same_point():
    theta = [torch.tensor([1.0, -2.0], dtype=torch.float64, requires_grad=True)]
    phi = [torch.tensor([0.5], dtype=torch.float64, requires_grad=True)]
    inner = lambda t, p: (p[0] * t[0] ** 2).sum()
    outer = lambda t, p: (t[0] ** 3).sum()  # no φ: its gradient comes from the inner loss alone
    hg = Joint()(inner, outer, theta, phi, inner_lr=0.1)
    ref = torch.autograd.grad(inner(theta, phi) + outer(theta, phi), theta + phi)
    torch.testing.assert_close(hg.theta_grads[0], ref[0], rtol=0, atol=0)
    torch.testing.assert_close(hg.phi_grads[0], ref[1], rtol=0, atol=0)
    assert hg.logs["outer_loss"] == pytest.approx(-7.0)
    assert theta[0].grad is None and phi[0].grad is None  # nothing written: the caller sets .grad


@pytest.mark.parametrize("meta", sorted(OWN))
def test_own_modules_are_the_one_door(meta):
    overrides = {"objective": "simclr", "meta": meta, **TINY}
    _, _, net, method, _ = _setup(overrides, 16, "cpu", 3, 16)
    assert isinstance(method, BiLevelMethod)
    own = [p for name in OWN[meta] for p in getattr(method, name).parameters()]
    assert [id(p) for p in method.meta_parameters()] == [id(p) for p in own]
    # TC² updates f_v, f_w itself (stage 1): the trainer's optimizer must not see them
    assert method.parameters() == ([] if meta == "tc2" else method.meta_parameters())
    state = method.state_dict()
    assert set(OWN[meta]) | {"engine", "teacher", "objective"} == set(state)
    _, _, _, fresh, _ = _setup({**overrides, "seed": 1}, 16, "cpu", 3, 16)
    assert any(not torch.equal(a, b) for a, b in zip(fresh.meta_parameters(), method.meta_parameters()))
    fresh.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(fresh.meta_parameters(), method.meta_parameters()))
    method.to(torch.float64)
    assert all(p.dtype == torch.float64 for p in method.meta_parameters())


def test_options_are_parsed_once_into_the_methods_dataclass():
    _, _, _, method, _ = _setup({"objective": "simclr", "meta": "gessl", "meta_args": {"variant": "joint"}, **TINY},
                                16, "cpu", 3, 16)
    assert isinstance(method.cfg, GeSSLConfig) and method.cfg.variant == "joint" and method.one_stage
    with pytest.raises(ValueError, match=r"^meta_args: unknown gessl option\(s\) \['mue'\]; allowed: mu, k, m"):
        GeSSLConfig.from_meta_args({"mue": 1.0})


def test_one_task_split_check():
    assert allowed_n_tasks(12) == [1, 2, 3, 4, 6] and allowed_n_tasks(12, min_tasks=2) == [2, 3, 4, 6]
    check_n_tasks(12, 6)
    for n, why in ((5, "5 does not divide the batch size 12"), (12, "12 leaves 1 image per task"),
                   (0, "must be >= 1, got 0"), (2.0, "must be an integer, got float 2.0")):
        with pytest.raises(ValueError, match=rf"^key: {why}.* allowed: 1, 2, 3, 4, 6$"):
            check_n_tasks(12, n, key="key")
    with pytest.raises(ValueError, match=r"^n_tasks: must be >= 2, got 1.* allowed: 2, 3, 4, 6$"):
        check_n_tasks(12, 1, min_tasks=2)
