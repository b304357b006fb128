import pytest

from bilevel_ssl.config import ConfigError, TrainConfig
from bilevel_ssl.trainer import train

BAD = [
    ({"objective": "simclr2"}, r"objective: unknown value 'simclr2'; allowed: simclr"),
    ({"meta": "maml"}, r"meta: unknown value 'maml'; allowed: none, gessl"),
    ({"meta_args": {"m": 4}}, r"meta_args: meta-method 'none' takes no options, got \['m'\]"),
    ({"hypergrad_args": {"fd_r": 0.1}}, r"hypergrad_args: only bi-level meta-methods use a hypergradient engine"),
    ({"hypergrad": "implicit"}, r"hypergrad: unknown value 'implicit'; allowed: second_order, first_order, aid_fd"),
    ({"backbone": "vit"}, r"backbone: unknown value 'vit'; allowed: conv4, resnet18, resnet50"),
    ({"augment": "svhn"}, r"augment: unknown value 'svhn'; allowed: cifar, stl10, imagenet, mnist, mnistm"),
    ({"optimizer": "lbfgs"}, r"optimizer: unknown value 'lbfgs'; allowed: sgd, adam, adamw"),
    ({"schedule": "step"}, r"schedule: unknown value 'step'; allowed: cosine, constant"),
    ({"device": "tpu"}, r"device: unknown value 'tpu'; allowed: cpu, cuda, auto"),
    ({"lr": 0.0}, r"lr: must be a finite number > 0, got 0.0"),
    ({"lr": -0.1}, r"lr: must be a finite number > 0"),
    ({"lr": "1e-3"}, r"lr: must be a finite number > 0, got str '1e-3' \(YAML 1.1 reads 1e-3 as a string"),
    ({"epochs": 2.5}, r"epochs: must be an integer >= 1, got float 2.5"),
    ({"epochs": True}, r"epochs: must be an integer >= 1, got bool True"),
    ({"batch_size": 1}, r"batch_size: must be an integer >= 2 \(an SSL loss compares the samples of a batch\)"),
    ({"momentum": float("nan")}, r"momentum: must be a finite number >= 0, got nan"),
    ({"meta_args": [1]}, r"meta_args: must be a dict, got list \[1\]"),
    ({"objective_args": {"temperature": 0}}, r"objective_args: objective simclr: temperature must be > 0"),
    ({"objective_args": {"tau": 0.1}}, r"objective_args: objective simclr: unknown option\(s\) \['tau'\]; allowed: temperature"),
    ({"weight_decay": -1e-4}, r"weight_decay: must be a finite number >= 0"),
    ({"warmup_epochs": 10, "epochs": 10}, r"warmup_epochs: must be < epochs"),
    ({"backbone_args": {"depth": 3}}, r"backbone_args: unknown option\(s\) \['depth'\] for conv4; allowed: width, pool_size"),
    ({"lr_max": 0.1}, r"unknown key\(s\) \['lr_max'\]; allowed: objective, meta"),
    ({"meta": "gessl", "batch_size": 60, "meta_args": {"m": 8}},
     r"meta_args.m / batch_size: 8 does not divide the batch size 60; .* allowed: 1, 2, 3, 4, 5, 6, 10"),
    ({"meta": "gessl", "batch_size": 16, "meta_args": {"m": 16}}, r"meta_args.m / batch_size: .*need >= 2"),
    ({"meta": "gessl", "meta_args": {"variant": "maml"}}, r"meta_args.variant: unknown value 'maml'; allowed: bilevel"),
    ({"meta": "gessl", "meta_args": {"alpha": 0.1}}, r"meta_args: unknown gessl option\(s\) \['alpha'\]; allowed: mu"),
    ({"meta": "gessl", "hypergrad_args": {"cg_iters": 3}},
     r"hypergrad_args: unknown second_order option\(s\) \['cg_iters'\]; allowed: \(none\)"),
    ({"meta": "gessl", "objective": "simclr", "objective_args": {"temperature": -1.0}}, r"objective_args: .*temperature"),
    ({"objective": "mae"}, r"backbone: objective mae needs one of vit_tiny, got 'conv4'"),
    ({"augment_args": {"rotation": 0.5}}, r"augment_args: unknown field\(s\) \['rotation'\]; allowed: crop_scale"),
    ({"augment_args": {"flip_p": 1.5}}, r"augment_args: AugmentConfig.flip_p must be in \[0, 1\]"),
    ({"amp": True}, r"amp: mixed precision is for device cuda .* allowed with device cpu: false"),
    ({"sync_bn": True, "meta": "gessl"}, r"sync_bn: only for meta 'none'"),
]


@pytest.mark.parametrize("params,message", BAD, ids=[next(iter(p)) for p, _ in BAD])
def test_bad_params_are_rejected_with_key_and_allowed_values(params, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig.from_dict(params)


def test_ints_are_valid_floats_and_roundtrip():
    cfg = TrainConfig.from_dict({"lr": 1, "epochs": 3})
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg


def test_batch_larger_than_data_rejected_before_compute(tiny):
    with pytest.raises(ConfigError, match=r"batch_size: 512 is larger than the 96 training images"):
        train(TrainConfig(batch_size=512, progress=False), tiny)


def test_cuda_requested_without_gpu(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="device: 'cuda' was asked for"):
        TrainConfig(device="cuda").resolved_device()
    assert TrainConfig(device="auto").resolved_device() == "cpu"


def test_missing_dataset_offline_names_the_folder_and_files(tmp_path, monkeypatch):
    import urllib.request

    from bilevel_ssl.data import DatasetUnavailable, load_dataset

    def offline(*a, **k):
        raise OSError("offline")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(DatasetUnavailable, match=rf"dataset 'cifar10' is not under {tmp_path}.*Put the files there"):
        load_dataset("cifar10", root=str(tmp_path))
