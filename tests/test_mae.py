import copy
import math
import pickle

import pytest
import torch

from bilevel_ssl.meta import SSLNet, SingleLevel
from bilevel_ssl.models import BACKBONES
from bilevel_ssl.objectives import make_objective
from bilevel_ssl.objectives.mae import MAE, mae_loss, mae_target
from bilevel_ssl.vit import ViT, n_keep, patchify, random_masking, unpatchify

SMALL_VIT = dict(dim=32, depth=2, heads=2)
SMALL_MAE = dict(decoder_dim=16, decoder_depth=1, decoder_heads=2)


def gen(seed):
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------------------ patches
@pytest.mark.parametrize("shape,p", [((2, 3, 28, 28), 4), ((2, 1, 28, 28), 7), ((3, 3, 8, 12), 4), ((1, 2, 6, 6), 1)])
def test_patchify_unpatchify_round_trip(shape, p):
    x = torch.randn(*shape, generator=gen(0))
    patches = patchify(x, p)
    gh, gw = shape[2] // p, shape[3] // p
    assert patches.shape == (shape[0], gh * gw, p * p * shape[1])
    assert torch.equal(unpatchify(patches, p, (gh, gw)), x)
    if gh == gw:
        assert torch.equal(unpatchify(patches, p), x)
    # layout: patch n = row-major cell (n // gw, n % gw), flattened as (row, col, channel)
    for n in (0, gh * gw - 1, gw // 2):
        r, c = divmod(n, gw)
        cell = x[:, :, r * p:(r + 1) * p, c * p:(c + 1) * p].permute(0, 2, 3, 1).reshape(shape[0], -1)
        assert torch.equal(patches[:, n], cell)


def test_patchify_rejects_indivisible_size():
    with pytest.raises(ValueError, match="patch_size=5"):
        patchify(torch.zeros(1, 3, 28, 28), 5)


# ------------------------------------------------------------------------------------------------ masking
@pytest.mark.parametrize("n,ratio", [(49, 0.75), (49, 0.5), (64, 0.75), (10, 0.9), (16, 0.3)])
def test_random_masking_keeps_round_n_and_restores(n, ratio):
    b, d = 6, 5
    tokens = torch.randn(b, n, d, generator=gen(1))
    noise = torch.rand(b, n, generator=gen(2))
    kept, mask, ids_restore = random_masking(tokens, ratio, noise)
    k = round(n * (1 - ratio))
    assert n_keep(n, ratio) == k
    assert kept.shape == (b, k, d)
    assert (mask.sum(1) == n - k).all()  # exactly k visible per sample
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    if math.comb(n, k) > 1000:  # a different subset per sample (collisions are likely only among few subsets)
        assert len({tuple(m.tolist()) for m in mask}) == b
    ids_shuffle = noise.argsort(dim=1)
    for i in range(b):
        # the kept patches are the k lowest-noise ones, and the mask marks exactly the others
        lowest = set(ids_shuffle[i, :k].tolist())
        assert {j for j in range(n) if mask[i, j] == 0} == lowest
        assert torch.equal(kept[i], tokens[i, ids_shuffle[i, :k]])
        # ids_restore inverts the shuffle
        assert torch.equal(ids_shuffle[i][ids_restore[i]], torch.arange(n))
    shuffled = torch.gather(tokens, 1, ids_shuffle[..., None].expand(b, n, d))
    assert torch.equal(torch.gather(shuffled, 1, ids_restore[..., None].expand(b, n, d)), tokens)


def test_n_keep_edges():
    assert n_keep(10, 0.9) == 1  # int(10 * (1 - 0.9)) would be 0 (floating point)
    assert n_keep(49, 0.01) == 48  # a positive ratio always masks at least one patch
    assert n_keep(49, 0.0) == 49
    with pytest.raises(ValueError, match="mask_ratio"):
        n_keep(49, 1.0)


def test_forward_masked_shapes_and_ignores_masked_pixels():
    torch.manual_seed(0)
    vit = ViT(3, 28, 4, **SMALL_VIT)
    x = torch.rand(4, 3, 28, 28, generator=gen(3))
    noise = torch.rand(4, 49, generator=gen(4))
    latent, mask, ids_restore = vit.forward_masked(x, 0.75, noise)
    assert latent.shape == (4, 1 + 12, 32) and mask.shape == (4, 49) and ids_restore.shape == (4, 49)
    # the encoder sees only visible patches: repainting the masked ones leaves the latent unchanged
    pix_mask = unpatchify(mask[..., None].expand(4, 49, 16 * 3), 4).bool()
    x2 = torch.where(pix_mask, torch.rand(4, 3, 28, 28, generator=gen(5)), x)
    assert not torch.equal(x, x2)
    latent2, mask2, _ = vit.forward_masked(x2, 0.75, noise)
    assert torch.equal(mask, mask2)
    torch.testing.assert_close(latent2, latent)
    # ... while repainting a visible patch changes it
    x3 = torch.where(~pix_mask, torch.rand(4, 3, 28, 28, generator=gen(6)), x)
    assert not torch.allclose(vit.forward_masked(x3, 0.75, noise)[0], latent)


# ------------------------------------------------------------------------------------------------ loss
def reference_mae_loss(pred, target, mask):
    """He et al. (2022) §3: MSE in pixel space, averaged over the masked patches only (explicit loops)."""
    total, count = 0.0, 0
    for b in range(pred.shape[0]):
        for n in range(pred.shape[1]):
            if mask[b, n] == 1:
                d = pred.shape[2]
                total += sum((pred[b, n, j].item() - target[b, n, j].item()) ** 2 for j in range(d)) / d
                count += 1
    return total / count


def test_mae_loss_matches_reference_and_ignores_visible():
    pred = torch.randn(3, 10, 6, generator=gen(7), requires_grad=True)
    target = torch.randn(3, 10, 6, generator=gen(8))
    mask = (torch.rand(3, 10, generator=gen(9)) < 0.7).float()
    loss = mae_loss(pred, target, mask)
    assert loss.item() == pytest.approx(reference_mae_loss(pred.detach(), target, mask), rel=1e-5)
    # changing the prediction on visible patches does not change the loss ...
    noisy = torch.where(mask[..., None].bool(), pred.detach(), pred.detach() + 5 * torch.randn(3, 10, 6, generator=gen(10)))
    assert mae_loss(noisy, target, mask).item() == pytest.approx(loss.item(), rel=1e-6)
    # ... and gives them zero gradient
    loss.backward()
    assert (pred.grad[mask == 0] == 0).all() and (pred.grad[mask == 1] != 0).any()
    assert mae_loss(target, target, mask).item() == 0.0
    with pytest.raises(ValueError, match="mask"):
        mae_loss(pred, target, mask[:, :5])


def test_norm_pix_target_is_standardised_per_patch():
    x = torch.rand(4, 3, 28, 28, generator=gen(11))
    t = mae_target(x, 4, norm_pix=True)
    assert t.shape == (4, 49, 48)
    torch.testing.assert_close(t.mean(-1), torch.zeros(4, 49), atol=1e-5, rtol=0)
    torch.testing.assert_close(t.var(-1), torch.ones(4, 49), atol=1e-3, rtol=0)  # unbiased var, as MAE's code
    assert torch.equal(mae_target(x, 4, norm_pix=False), patchify(x, 4))


# ------------------------------------------------------------------------------------------------ backbone
def test_vit_forward_shape_and_errors():
    torch.manual_seed(0)
    vit = ViT(in_channels=3, image_size=28, patch_size=4, **SMALL_VIT)
    x = torch.rand(5, 3, 28, 28, generator=gen(12))
    h = vit(x)
    assert h.shape == (5, 32) and vit.feature_dim == 32 and torch.isfinite(h).all()
    assert vit.feature_dim.patch_size == 4 and vit.feature_dim.in_channels == 3
    assert vit.grid == (7, 7) and vit.spec["name"] == "vit_tiny" and vit.spec["patch_size"] == 4
    for clone in (copy.deepcopy(vit.feature_dim), pickle.loads(pickle.dumps(vit.feature_dim))):
        assert clone == 32 and clone.patch_size == 4 and clone.in_channels == 3
    # no dropout: train and eval (fast path) give the same features
    with torch.no_grad():
        train_h = vit(x)
        eval_h = vit.eval()(x)
    torch.testing.assert_close(eval_h, train_h, atol=1e-5, rtol=1e-4)
    assert ViT(1, 28, 7, **SMALL_VIT)(torch.rand(2, 1, 28, 28)).shape == (2, 32)
    assert vit(torch.rand(2, 3, 32, 32)).shape == (2, 32)  # fixed sin-cos embedding: any divisible size works
    assert ViT().feature_dim == 128  # tiny defaults
    with pytest.raises(ValueError, match=r"image_size=28.*patch_size=5"):
        ViT(3, image_size=28, patch_size=5)
    with pytest.raises(ValueError, match="patch_size=4"):
        vit(torch.rand(2, 3, 30, 30))
    with pytest.raises(ValueError, match="heads"):
        ViT(3, 28, 4, dim=36, heads=8)


# ------------------------------------------------------------------------------------------------ objective
def test_mae_options_and_heads():
    obj = make_objective("mae", mask_ratio=0.6, decoder_dim=16, decoder_depth=1, decoder_heads=2)
    assert (obj.mask_ratio, obj.n_views, obj.norm_pix_loss) == (0.6, 1, True)
    assert (MAE().mask_ratio, MAE().norm_pix_loss) == (0.75, True)
    for bad in ({"mask_ratio": 0.0}, {"mask_ratio": 1.0}, {"decoder_depth": 0}, {"decoder_dim": 18}):
        with pytest.raises(ValueError):
            MAE(**bad)
    with pytest.raises(ValueError, match="unknown option"):
        make_objective("mae", patch_size=4)  # the patch size is the backbone's
    heads = MAE(**SMALL_MAE).heads(ViT(1, 28, 7, **SMALL_VIT).feature_dim)
    assert set(heads) == {"projector", "decoder"} and isinstance(heads["projector"], torch.nn.Identity)
    assert heads["decoder"].pred.out_features == 7 * 7 * 1
    assert MAE(**SMALL_MAE).heads(32, patch_size=2, in_channels=3)["decoder"].pred.out_features == 12
    with pytest.raises(ValueError, match="ViT"):
        MAE().heads(256)  # a conv feature size carries no patch geometry


def small_net(seed=0):
    torch.manual_seed(seed)
    vit = ViT(3, 28, 4, **SMALL_VIT)
    obj = MAE(**SMALL_MAE)
    return obj, SSLNet(vit, obj.heads(vit.feature_dim))


def test_outputs_contract_and_global_rng_masks():
    obj, net = small_net()
    x = torch.rand(8, 3, 28, 28, generator=gen(13))
    torch.manual_seed(123)
    (out,) = obj.outputs(net, x, 1)
    assert out["pred"].shape == out["target"].shape == (8, 49, 48)
    assert out["mask"].shape == (8, 49) and (out["mask"].sum(1) == 49 - 12).all()
    assert out["h"].shape == out["z"].shape == (8, 32) and torch.equal(out["h"], out["z"])
    torch.testing.assert_close(out["target"], mae_target(x, 4, True))
    torch.manual_seed(123)
    assert torch.equal(obj.outputs(net, x, 1)[0]["mask"], out["mask"])  # masks come from torch's global RNG
    assert not torch.equal(obj.outputs(net, x, 1)[0]["mask"], out["mask"])
    assert obj.loss([out], None).item() == pytest.approx(mae_loss(out["pred"], out["target"], out["mask"]).item())


def test_end_to_end_single_level_grads_and_descent():
    obj, net = small_net()
    meta = SingleLevel(obj, net)
    assert meta.teacher is None
    x = torch.rand(8, 3, 28, 28, generator=gen(14))
    logs = meta.compute_grads(net, [x])
    assert torch.isfinite(torch.tensor(logs["loss"]))
    for name, p in net.named_parameters():  # encoder (incl. class token) and decoder (incl. mask token)
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert net.backbone.patch_embed.weight.grad.abs().sum() > 0
    assert net.heads["decoder"].mask_token.grad.abs().sum() > 0
    meta.after_step(net, 0.1)

    def loss_at_fixed_mask():
        torch.manual_seed(999)
        with torch.no_grad():
            return obj.loss(obj.outputs(net, x, 1), None).item()

    before = loss_at_fixed_mask()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    torch.manual_seed(0)
    for _ in range(15):
        opt.zero_grad(set_to_none=True)
        meta.compute_grads(net, [x])
        opt.step()
        meta.after_step(net, 0.5)
    after = loss_at_fixed_mask()
    assert after < before - 0.05, (before, after)


# ------------------------------------------------------------------------------------------------ trainer
needs_vit = pytest.mark.skipif("vit_tiny" not in BACKBONES, reason="vit_tiny not registered in models.make_backbone")


def mae_cfg(**kw):
    from bilevel_ssl.config import TrainConfig

    base = dict(objective="mae", backbone="vit_tiny", epochs=2, batch_size=32, optimizer="adamw", lr=1e-3,
                weight_decay=0.05, progress=False, backbone_args=SMALL_VIT, objective_args=SMALL_MAE)
    return TrainConfig(**{**base, **kw})


@needs_vit
def test_trainer_smoke_and_encoder_round_trip(tiny, tmp_path):
    from bilevel_ssl.config import ConfigError
    from bilevel_ssl.models import load_encoder
    from bilevel_ssl.trainer import ENCODER, train

    res = train(mae_cfg(), tiny, tmp_path)
    assert len(res.history) == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in res.history)
    enc = load_encoder(tmp_path / ENCODER)
    x = tiny.images[:4].float() / 255
    res.backbone.eval()
    with torch.no_grad():
        torch.testing.assert_close(enc(x), res.backbone(x))
    with pytest.raises(ConfigError, match="vit_tiny"):
        mae_cfg(backbone="conv4", backbone_args={})


class Interrupt(Exception):
    pass


@needs_vit
def test_trainer_resume_reproduces_masks(tiny, tmp_path):
    from bilevel_ssl.trainer import train

    full = train(mae_cfg(epochs=3, checkpoint_every=1), tiny, tmp_path / "full")

    def stop(epoch, record):
        if epoch == 1:
            raise Interrupt

    with pytest.raises(Interrupt):
        train(mae_cfg(epochs=3, checkpoint_every=1), tiny, tmp_path / "resumed", callbacks=(stop,))
    torch.manual_seed(12345)  # the global RNG (masks) must come from the checkpoint, not from here
    resumed = train(mae_cfg(epochs=3, checkpoint_every=1), tiny, tmp_path / "resumed")
    assert [r["loss"] for r in resumed.history] == [r["loss"] for r in full.history]
