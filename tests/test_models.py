"""Tests for harness.engine.models: fastai's layer groups and head, freezing, param groups, checkpoints."""
from __future__ import annotations

import copy
import math
import urllib.error
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from harness.engine import models
from harness.errors import HarnessError
from harness.engine.groups import AdaptiveConcatPool2d, linear_head, param_groups, set_trainable
from harness.engine.models import TransferModel, build_model, load_body, read_checkpoint, save_checkpoint

NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm)


@pytest.fixture(scope="module")
def r18() -> TransferModel:
    """One resnet18 with the fastai head and 3 classes, shared by this module (read-mostly)."""
    torch.manual_seed(0)
    return build_model("resnet18", 3)


@pytest.fixture(scope="module")
def r18_linear(r18) -> TransferModel:
    """The same body with a plain linear head (built without a second torchvision model)."""
    return TransferModel("resnet18", [r18[0], r18[1], linear_head(512, 3)], ("early", "late", "head"))


def names(group: nn.Module) -> list[str]:
    return [n for n, _ in group.named_children()]


# --- layer groups ----------------------------------------------------------------------------

def test_the_archs_recipes_accept_are_the_archs_models_builds():
    """Recipe validation knows the torchvision archs by name alone (harness/engine/archs.py)."""
    from harness.engine.archs import TORCHVISION_ARCHS
    assert tuple(models.ARCHS) == TORCHVISION_ARCHS


def test_resnet18_groups_are_fastais_split(r18):
    assert len(r18) == 3
    assert names(r18[0]) == ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2"]
    assert names(r18[1]) == ["layer3", "layer4"]
    assert r18.group_names == ["early", "late", "head"]
    # the modules are the torchvision ones: stem conv is 7x7 stride 2, layer4 ends at 512 channels
    assert r18[0].conv1.kernel_size == (7, 7) and r18[0].conv1.stride == (2, 2)
    assert r18[1].layer4[-1].conv2.out_channels == 512
    assert r18.arch == "resnet18"


def test_no_torchvision_fc_or_avgpool_left(r18):
    all_names = [n for n, _ in r18.named_modules()]
    assert not any(n.endswith("fc") or n.endswith("avgpool") for n in all_names)
    # parameter count = resnet18 without its fc + our head
    tv = sum(p.numel() for n, p in torchvision.models.resnet18().named_parameters() if not n.startswith("fc."))
    head = 2 * 1024 + 1024 * 512 + 2 * 512 + 512 * 3   # BN(1024), Linear no bias, BN(512), Linear no bias
    assert sum(p.numel() for p in r18.parameters()) == tv + head


def test_param_groups_cover_every_parameter_exactly_once(r18):
    pgs = param_groups(r18, 0.01)
    ids = [id(p) for pg in pgs for p in pg["params"]]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in r18.parameters()}
    assert len(ids) == len(list(r18.parameters()))
    # every parameter sits in the param group of its own layer group
    for pg in pgs:
        own = {id(p) for p in r18[pg["layer_group"]].parameters()}
        assert {id(p) for p in pg["params"]} <= own
    assert sorted({pg["layer_group"] for pg in pgs}) == [0, 1, 2]


def _decay_of(model, wd):
    out = {}
    for pg in param_groups(model, wd):
        for p in pg["params"]:
            out[id(p)] = pg["weight_decay"]
    return out


@pytest.mark.parametrize("which", ["fastai", "linear"])
def test_no_weight_decay_on_norm_params_and_biases(r18, r18_linear, which):
    model = r18 if which == "fastai" else r18_linear
    wd = _decay_of(model, 0.05)
    n_bias = n_norm = n_weight = 0
    for m in model.modules():
        for name, p in m.named_parameters(recurse=False):
            if isinstance(m, NORMS):
                n_norm += 1
                assert wd[id(p)] == 0.0, (type(m).__name__, name)
            elif name == "bias":
                n_bias += 1
                assert wd[id(p)] == 0.0, (type(m).__name__, name)
            else:
                assert isinstance(m, (nn.Conv2d, nn.Linear)) and name == "weight"
                n_weight += 1
                assert wd[id(p)] == 0.05, (type(m).__name__, name)
    assert n_norm > 0 and n_weight > 0
    if which == "linear":
        assert n_bias == 1                       # the linear head's bias
        assert wd[id(model[2][2].bias)] == 0.0
        assert wd[id(model[2][2].weight)] == 0.05


# --- the head -----------------------------------------------------------------------------

def test_concat_pool_is_max_then_mean():
    x = torch.tensor([[[[1.0, 2.0], [3.0, 6.0]],
                       [[-1.0, -3.0], [0.0, 0.0]]]])          # 1 x 2 x 2 x 2
    out = AdaptiveConcatPool2d()(x)
    assert out.shape == (1, 4, 1, 1)
    assert out.flatten().tolist() == [6.0, 0.0, 3.0, -1.0]   # max c0, max c1, mean c0, mean c1


def test_fastai_head_structure(r18):
    head = r18[2]
    types = [type(m) for m in head]
    assert types == [AdaptiveConcatPool2d, nn.Flatten, nn.BatchNorm1d, nn.Dropout, nn.Linear, nn.ReLU,
                     nn.BatchNorm1d, nn.Dropout, nn.Linear]
    nf = 512
    assert head[2].num_features == 2 * nf
    assert head[3].p == 0.25
    assert (head[4].in_features, head[4].out_features, head[4].bias) == (2 * nf, 512, None)
    assert head[6].num_features == 512
    assert head[7].p == 0.5
    assert (head[8].in_features, head[8].out_features, head[8].bias) == (512, 3, None)


def test_fastai_head_init(r18):
    head = r18[2]
    for bn in (head[2], head[6]):
        assert torch.all(bn.weight == 1.0)
        assert torch.allclose(bn.bias, torch.full_like(bn.bias, 1e-3))
    # kaiming_normal_ with fan_in: std = sqrt(2 / fan_in) (fan_out would give sqrt(2/512))
    w = head[4].weight
    assert w.mean().abs().item() < 2e-3
    assert w.std().item() == pytest.approx(math.sqrt(2 / 1024), rel=0.03)


def test_forward_shapes(r18, r18_linear):
    x = torch.randn(2, 3, 32, 32)
    r18.eval(), r18_linear.eval()
    with torch.no_grad():
        assert r18(x).shape == (2, 3)
        assert r18_linear(x).shape == (2, 3)
        assert r18[1](r18[0](x)).shape == (2, 512, 1, 1)


def test_linear_head_structure():
    head = linear_head(64, 5)
    assert [type(m) for m in head] == [nn.AdaptiveAvgPool2d, nn.Flatten, nn.Linear]
    assert (head[2].in_features, head[2].out_features) == (64, 5)
    assert torch.all(head[2].bias == 0)
    out = head(torch.randn(3, 64, 2, 2))
    assert out.shape == (3, 5)


# --- freezing -----------------------------------------------------------------------------

def _flags(model, g, norm: bool) -> set[bool]:
    """requires_grad flags of group g's norm (norm=True) or non-norm parameters."""
    out = set()
    for m in model[g].modules():
        if isinstance(m, NORMS) == norm:
            out |= {p.requires_grad for p in m.parameters(recurse=False)}
    return out


def test_freeze_head_only_keeps_batchnorm_training(r18):
    set_trainable(r18, 1, train_bn=True)
    try:
        for g in (0, 1):
            assert _flags(r18, g, norm=False) == {False}, g
            assert _flags(r18, g, norm=True) == {True}, g
        assert all(p.requires_grad for p in r18[2].parameters())
        assert not r18[0].conv1.weight.requires_grad and r18[0].bn1.weight.requires_grad
    finally:
        set_trainable(r18, 3)


def test_freeze_head_only_without_train_bn_freezes_batchnorm(r18):
    set_trainable(r18, 1, train_bn=False)
    try:
        for g in (0, 1):
            assert not any(p.requires_grad for p in r18[g].parameters()), g
        assert all(p.requires_grad for p in r18[2].parameters())
    finally:
        set_trainable(r18, 3)


def test_train_last_two_unfreezes_group_one(r18):
    set_trainable(r18, 1)
    set_trainable(r18, 2)
    try:
        assert all(p.requires_grad for g in (1, 2) for p in r18[g].parameters())
        assert _flags(r18, 0, norm=False) == {False}
        assert _flags(r18, 0, norm=True) == {True}
    finally:
        set_trainable(r18, 3)


def test_unfreeze_all_trains_everything(r18):
    set_trainable(r18, 1, train_bn=False)
    set_trainable(r18, 3)
    assert all(p.requires_grad for p in r18.parameters())


def test_frozen_body_gets_no_gradient_but_bn_does(r18):
    set_trainable(r18, 1)
    try:
        r18.train()
        r18.zero_grad(set_to_none=True)
        r18(torch.randn(2, 3, 32, 32)).sum().backward()
        assert r18[0].conv1.weight.grad is None
        assert r18[0].bn1.weight.grad is not None
        assert r18[2][8].weight.grad is not None
    finally:
        r18.zero_grad(set_to_none=True)
        set_trainable(r18, 3)


# --- checkpoints ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def saved(r18, tmp_path_factory):
    """A resnet18 checkpoint whose body differs from any fresh init (every float tensor +0.5)."""
    src = copy.deepcopy(r18)
    with torch.no_grad():
        for v in src.state_dict().values():
            if v.is_floating_point():
                v.add_(0.5)
    path = tmp_path_factory.mktemp("ckpt") / "sub" / "body.pt"
    save_checkpoint(src, path, {"note": "test"})
    return src, path


def test_checkpoint_holds_body_only(saved):
    src, path = saved
    ckpt = read_checkpoint(path)
    assert ckpt["arch"] == "resnet18"
    assert ckpt["meta"] == {"note": "test"}
    assert set(ckpt["body"]) == {k for k in src.state_dict() if not k.startswith("2.")}
    assert not Path(str(path) + ".tmp").exists()


def test_checkpoint_loads_body_into_model_with_other_class_count(saved):
    src, path = saved
    model = build_model("resnet18", 5, weights=str(path))
    assert model[2][8].out_features == 5
    got, want = model.state_dict(), src.state_dict()
    body_keys = [k for k in want if not k.startswith("2.")]
    assert body_keys
    for k in body_keys:
        assert torch.equal(got[k], want[k]), k
    # the head is freshly initialised, not the saved model's
    assert not torch.equal(model[2][4].weight, src[2][4].weight)
    assert torch.all(model[2][2].weight == 1.0)
    assert torch.allclose(model[2][2].bias, torch.full_like(model[2][2].bias, 1e-3))


def test_checkpoint_of_other_arch_is_refused(saved):
    _, path = saved
    effnet = build_model("efficientnet_b0", 2)
    before = {k: v.clone() for k, v in effnet.state_dict().items()}
    with pytest.raises(HarnessError) as ei:
        load_body(effnet, path)
    msg = str(ei.value)
    assert "resnet18" in msg and "efficientnet_b0" in msg and "\n" not in msg
    assert all(torch.equal(before[k], v) for k, v in effnet.state_dict().items())


def test_missing_checkpoint_mentions_pretrain(tmp_path):
    with pytest.raises(HarnessError) as ei:
        build_model("resnet18", 2, weights=str(tmp_path / "nope.pt"))
    msg = str(ei.value)
    assert "pretrain" in msg and "nope.pt" in msg and "\n" not in msg


class Evil:
    """A class a weights_only load must refuse to unpickle."""

    def __init__(self):
        self.x = 1


@pytest.mark.parametrize("kind", ["tensor", "text", "dict without format", "custom class"])
def test_non_checkpoint_files_are_refused(r18, tmp_path, kind):
    path = tmp_path / "f.pt"
    if kind == "tensor":
        torch.save(torch.zeros(3), path)
    elif kind == "text":
        path.write_text("not a checkpoint\n")
    elif kind == "dict without format":
        torch.save({"arch": "resnet18", "body": {}}, path)
    else:
        torch.save({"format": models.CHECKPOINT_FORMAT, "arch": "resnet18", "body": {}, "meta": Evil()}, path)
    with pytest.raises(HarnessError) as ei:
        load_body(r18, path)
    assert str(path) in str(ei.value) and "\n" not in str(ei.value)


def test_checkpoint_with_wrong_shapes_is_refused(r18, tmp_path):
    body = {k: v.clone() for k, v in r18.body_state_dict().items()}
    body["0.conv1.weight"] = torch.zeros(1)
    path = tmp_path / "bad.pt"
    torch.save({"format": models.CHECKPOINT_FORMAT, "arch": "resnet18", "body": body, "meta": {}}, path)
    with pytest.raises(HarnessError, match="0.conv1.weight"):
        load_body(r18, path)


def test_imagenet_offline_names_the_cache_path(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torchhome"))
    real = torchvision.models.get_model

    def offline(name, **kwargs):
        if kwargs.get("weights") is not None:
            raise urllib.error.URLError("no network")
        return real(name, **kwargs)

    monkeypatch.setattr(torchvision.models, "get_model", offline)
    with pytest.raises(HarnessError) as ei:
        build_model("resnet18", 2, weights="imagenet")
    msg = str(ei.value)
    hub = torch.hub.get_dir()
    assert hub.startswith(str(tmp_path))
    assert str(Path(hub) / "checkpoints") in msg
    assert "resnet18" in msg and "URLError" in msg and "\n" not in msg


# --- other families ---------------------------------------------------------------------------

def test_efficientnet_b0_groups_and_forward():
    model = build_model("efficientnet_b0", 4)
    assert len(model) == 3 and model.group_names == ["early", "late", "head"]
    # early = features[0:5]: stem (3->32) + MBConv stages 1-4 (1, 2, 2, 3 blocks, ending at 80 ch)
    early, late = model[0], model[1]
    assert len(early) == 5 and len(late) == 4
    assert early[0][0].in_channels == 3 and early[0][0].out_channels == 32
    assert [len(s) for s in early[1:]] == [1, 2, 2, 3]
    assert early[4][-1].block[-1][0].out_channels == 80
    # late = features[5:9]: stages 5-7 (3, 4, 1 blocks) + the final 1x1 conv 320 -> 1280
    assert [len(s) for s in late[:3]] == [3, 4, 1]
    assert late[3][0].in_channels == 320 and late[3][0].out_channels == 1280
    assert late[3][0].kernel_size == (1, 1)
    assert model[2][2].num_features == 2 * 1280
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 4)


def test_convnext_tiny_groups_and_forward():
    model = build_model("convnext_tiny", 4)
    assert len(model) == 3 and model.group_names == ["early", "late", "head"]
    early, late = model[0], model[1]
    assert len(early) == 4 and len(late) == 4
    # early = features[0:4]: stem (4x4 stride 4, 3->96), stage 1 (3 blocks), downsample 96->192,
    # stage 2 (3 blocks)
    assert early[0][0].kernel_size == (4, 4) and early[0][0].out_channels == 96
    assert len(early[1]) == 3 and len(early[3]) == 3
    assert (early[2][1].in_channels, early[2][1].out_channels) == (96, 192)
    # late = features[4:8]: downsample 192->384, stage 3 (9 blocks), downsample 384->768, stage 4 (3)
    assert (late[0][1].in_channels, late[0][1].out_channels) == (192, 384)
    assert len(late[1]) == 9 and len(late[3]) == 3
    assert (late[2][1].in_channels, late[2][1].out_channels) == (384, 768)
    assert model[2][2].num_features == 2 * 768
    # the classifier's LayerNorm went with the classifier: no LayerNorm in the head
    assert not any(isinstance(m, nn.LayerNorm) for m in model[2].modules())
    # LayerNorm2d is a LayerNorm: it keeps training when frozen and gets no weight decay
    set_trainable(model, 1)
    lns = [m for m in model[0].modules() if isinstance(m, nn.LayerNorm)]
    assert lns and all(p.requires_grad for m in lns for p in m.parameters())
    assert not model[0][0][0].weight.requires_grad
    wd = _decay_of(model, 0.01)
    assert all(wd[id(p)] == 0.0 for m in lns for p in m.parameters())
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 4)
