"""timm backbones: any timm/<name> builds, groups from its own blocks, trains end to end."""
from __future__ import annotations

import shutil

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from conftest import needs_fashion, template_store, tiny_recipe_dict
from harness.cli import main
from harness.errors import HarnessError
from harness.engine.groups import describe_groups, param_groups, set_trainable
from harness.engine.models import build_model
from harness.engine.recipe import Recipe
from harness.engine.timm_models import merge_blocks
from harness.engine.train import fine_tune

pytestmark = pytest.mark.usefixtures("one_thread")   # see conftest.one_thread

# tiny random-init members of each family (< 3 M parameters each)
FAMILIES = {
    "resnet": "timm/test_resnet",
    "efficientnet": "timm/test_efficientnet",
    "convnext": "timm/test_convnext",
    "vit": "timm/test_vit",
    "regnet": "timm/regnetx_002",
    "mobilenet": "timm/mobilenetv3_small_050",
}


def _names(members) -> list[str]:
    return [n for n, _, _ in members]


@pytest.mark.parametrize("head", ["fastai", "linear"])
@pytest.mark.parametrize("family", FAMILIES)
def test_every_parameter_lands_in_exactly_one_group(family, head):
    torch.manual_seed(0)
    model = build_model(FAMILIES[family], 4, "none", head, groups=3, image_size=32)
    members = model.group_members()
    assert len(members) == 3 and model.group_names == ["early", "late", "head"]
    names = [n for g in members for n in _names(g)]
    assert len(names) == len(set(names))                     # no parameter twice
    assert set(names) == {n for n, _ in model.named_parameters()}   # none left out
    assert all(members), "an empty layer group"
    # the head group is the new head (fastai) or the model's own classifier, reset to 4 classes
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 4)
    if head == "linear":
        cls = model.net.get_classifier()
        assert {id(p) for _, p, _ in members[-1]} == {id(p) for p in cls.parameters()}
    else:
        assert all(n.startswith("head.") for n in _names(members[-1]))


@pytest.mark.parametrize("family", FAMILIES)
def test_frozen_groups_get_no_gradient(family):
    torch.manual_seed(0)
    model = build_model(FAMILIES[family], 3, "none", "fastai", groups=4, image_size=32)
    members = model.group_members()
    set_trainable(model, 2, train_bn=False)                  # the last body group and the head
    model(torch.randn(4, 3, 32, 32)).sum().backward()
    for g, group in enumerate(members):
        for name, p, _ in group:
            if g < 2:
                assert p.grad is None and not p.requires_grad, name
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for _, p, _ in members[2])
    assert all(p.grad is not None for _, p, _ in members[3])
    # train_bn keeps a frozen group's norm layers training, as fastai's freeze does
    model.zero_grad(set_to_none=True)
    set_trainable(model, 1, train_bn=True)
    norms = [p for _, p, norm in members[0] if norm]
    others = [p for _, p, norm in members[0] if not norm]
    assert norms and all(p.requires_grad for p in norms) and not any(p.requires_grad for p in others)


def test_timm_resnet18_gets_the_torchvision_resnet18_split():
    torch.manual_seed(0)
    tv = build_model("resnet18", 3)
    tm = build_model("timm/resnet18", 3, image_size=32)

    def body_names(model, strip):
        return [{n.split(".", strip)[-1] for n, _, _ in g} for g in model.group_members()[:2]]
    # torchvision's names are '<group>.<module>...', timm's 'net.<module>...'
    assert body_names(tv, 1) == body_names(tm, 1)
    assert [r["parameters"] for r in describe_groups(tv)][:2] == [r["parameters"] for r in describe_groups(tm)][:2]


def test_merge_blocks_is_contiguous_and_balanced_by_block_count():
    assert merge_blocks(5, 2) == [range(0, 3), range(3, 5)]     # resnet: stem, layer1, layer2 | layer3, layer4
    assert merge_blocks(8, 3) == [range(0, 3), range(3, 6), range(6, 8)]
    assert merge_blocks(4, 4) == [range(i, i + 1) for i in range(4)]
    for n in range(1, 15):
        for k in range(1, n + 1):
            runs = merge_blocks(n, k)
            assert [b for r in runs for b in r] == list(range(n))
            assert max(map(len, runs)) - min(map(len, runs)) <= 1 and min(map(len, runs)) >= 1


def test_more_groups_give_finer_lrs_and_more_gradual_stages(workspace):
    from harness.sweep.strategies import stages_for
    model = build_model("timm/test_vit", 3, "none", "fastai", groups=5, image_size=32)
    assert model.group_names == ["body1", "body2", "body3", "body4", "head"]
    pgs = param_groups(model, 0.01)
    assert sorted({pg["layer_group"] for pg in pgs}) == [0, 1, 2, 3, 4]
    stages = stages_for("gradual", 10, n_groups=5)
    assert [s.trainable_groups(5) for s in stages] == [1, 2, 3, 4, 5] and sum(s.epochs for s in stages) == 10


def test_vit_position_embedding_and_class_token_are_not_decayed():
    model = build_model("timm/test_vit", 3, "none", "fastai", image_size=32)
    decayed = {id(p) for pg in param_groups(model, 0.05) if pg["weight_decay"] > 0 for p in pg["params"]}
    params = dict(model.named_parameters())
    assert id(params["net.pos_embed"]) not in decayed and id(params["net.cls_token"]) not in decayed
    assert id(params["net.blocks.0.attn.qkv.weight"]) in decayed


def test_vit_fastai_head_reads_the_pooled_pre_logits():
    model = build_model("timm/test_vit", 3, "none", "fastai", image_size=32)
    assert model.mode == "pooled"
    assert isinstance(model.head[0], nn.BatchNorm1d) and model.head[0].num_features == model.net.num_features
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    assert torch.equal(model(x), model.head(model.net.forward_head(model.net.forward_features(x), pre_logits=True)))


def test_convnext_fastai_head_drops_the_models_own_head_norm():
    model = build_model("timm/test_convnext", 3, "none", "fastai", image_size=32)
    assert model.mode == "map"
    assert not any(n.startswith("net.head.") for n, _ in model.named_parameters())
    linear = build_model("timm/test_convnext", 3, "none", "linear", image_size=32)
    assert any(n.startswith("net.head.norm.") for n, _ in linear.named_parameters())   # there it is body


def test_too_many_groups_names_the_block_count():
    with pytest.raises(HarnessError, match=r"model\.groups: 9 .* timm/test_resnet has 5 blocks \(at most 6 groups"):
        build_model("timm/test_resnet", 3, "none", "fastai", groups=9, image_size=32)


def test_an_image_too_small_for_the_model_is_one_line():
    with pytest.raises(HarnessError, match=r"data\.image_size: 8 px does not fit timm/test_convnext"):
        build_model("timm/test_convnext", 3, "none", "fastai", image_size=8)


@pytest.mark.parametrize("arch, match", [
    ("timm/resnett18", r"unknown timm architecture 'resnett18' \(closest: timm/resnet18"),
    ("regnetx_002", r"did you mean 'timm/regnetx_002'"),
])
def test_unknown_arch_names_the_closest_timm_names(arch, match):
    with pytest.raises(HarnessError, match=match):
        Recipe.from_dict(tiny_recipe_dict(model={"arch": arch}))


def test_groups_other_than_3_need_a_timm_arch():
    with pytest.raises(HarnessError, match=r"model\.groups: resnet18 has fastai's 3-group split"):
        Recipe.from_dict(tiny_recipe_dict(model={"arch": "resnet18", "groups": 4}))
    with pytest.raises(HarnessError, match=r"stages\[1\]\.train: last 3 exceeds the 2 layer groups"):
        Recipe.from_dict(tiny_recipe_dict(model={"arch": "timm/test_resnet", "groups": 2},
                                          stages=[{"epochs": 1, "train": "head", "lr": 1e-3},
                                                  {"epochs": 1, "train": {"last": 3}, "lr": 1e-3}]))


def test_input_statistics_follow_the_weights_config():
    vit = build_model("timm/test_vit", 3, "none", image_size=32)
    assert vit.input_stats.mean == (0.5, 0.5, 0.5) and vit.input_stats.std == (0.5, 0.5, 0.5)
    r = build_model("timm/regnetx_002", 3, "none", image_size=32)      # pycls weights: ImageNet's
    assert r.input_stats.mean == pytest.approx((0.485, 0.456, 0.406))


@needs_fashion
@pytest.mark.parametrize("family", FAMILIES)
def test_two_phase_recipe_trains_end_to_end(family, workspace):
    recipe = Recipe.from_dict(tiny_recipe_dict(
        model={"arch": FAMILIES[family], "groups": 3},
        data={"image_size": 32, "train_per_class": 16, "batch_size": 8}))
    result = fine_tune(recipe, workspace=workspace)
    assert result.ok and len(result.epochs) == 3
    assert result.group_names == ["early", "late", "head"]
    assert all(len(row) == 3 for row in result.lrs)
    # stage 1 trains the head at slice(2e-3): body groups at max/10, then discriminative
    assert result.lrs[result.stage_starts[1] + 3][0] < result.lrs[result.stage_starts[1] + 3][2]
    assert 0.0 <= result.val_accuracy <= 1.0 and result.test_accuracy is not None


@needs_fashion
def test_timm_body_checkpoint_round_trips_with_its_input_statistics(tmp_path):
    from harness.engine.models import save_checkpoint
    torch.manual_seed(0)
    src = build_model("timm/test_vit", 3, "none", "linear", image_size=32)
    save_checkpoint(src, tmp_path / "b.pt", {"note": "x"})
    # a body saved under the linear head loads under the fastai head too
    dst = build_model("timm/test_vit", 5, str(tmp_path / "b.pt"), "fastai", image_size=32)
    body = {k: v for k, v in dst.body_state_dict().items()}
    assert all(torch.equal(body[k], v) for k, v in src.body_state_dict().items() if k in body)
    assert dst.input_stats == src.input_stats


def _groups_command(tmp_path, workspace, model: dict):
    import yaml
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe_dict(model=model, data={"image_size": 32})))
    return CliRunner().invoke(main, ["groups", str(path), "--workspace", str(workspace)])


@needs_fashion
def test_groups_command_prints_each_group(tmp_path, workspace):
    result = _groups_command(tmp_path, workspace, {"arch": "timm/test_efficientnet", "groups": 4})
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith("timm/test_efficientnet: 4 layer groups")
    rows = lines[2:]
    assert [r.split()[0] for r in rows] == ["body1", "body2", "body3", "head"]
    model = build_model("timm/test_efficientnet", 2, "none", "fastai", groups=4, image_size=32)
    counts = [int(r.split()[1].replace(",", "")) for r in rows]
    assert counts == [d["parameters"] for d in describe_groups(model)]
    assert "conv_stem" in rows[0] and "head (new)" in rows[3]


@needs_fashion
def test_groups_command_refuses_too_many_groups_in_one_line(tmp_path, workspace):
    result = _groups_command(tmp_path, workspace, {"arch": "timm/test_resnet", "groups": 12})
    assert result.exit_code == 2
    assert result.stderr.splitlines() == [result.stderr.strip()] and "has 5 blocks" in result.stderr


@needs_fashion
def test_offline_imagenet_request_without_cache_is_one_line_and_writes_nothing(tmp_path, tmp_path_factory,
                                                                              monkeypatch):
    import yaml
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe_dict(model={"arch": "timm/test_resnet", "weights": "imagenet"},
                                                    data={"image_size": 32})))
    db = tmp_path / "mlflow.db"
    shutil.copyfile(template_store(tmp_path_factory), db)
    result = CliRunner().invoke(main, ["train", str(path), "--workspace", str(tmp_path / "ws"),
                                       "--tracking-uri", f"sqlite:///{db}"])
    assert result.exit_code == 2, result.output
    line, = result.stderr.splitlines()
    assert line.startswith("error: model.weights:") and str(tmp_path / "hf") in line
    assert "models--timm--test_resnet" in line and "timm.create_model(" in line
    from mlflow.tracking import MlflowClient
    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    assert not client.search_experiments(filter_string="name = 'harness-train'") or \
        not client.search_runs([client.get_experiment_by_name("harness-train").experiment_id])


def test_lite0_imagenet_builds_offline_with_its_weights_and_statistics():
    from harness.engine.timm_weights import pretrained_net
    model = build_model("timm/tf_efficientnet_lite0", 5, "imagenet", "fastai", image_size=64)
    ref = pretrained_net("tf_efficientnet_lite0").state_dict()
    body = model.body_state_dict()
    shared = [k for k in body if k.removeprefix("net.") in ref]
    assert len(shared) == len(body) and len(shared) > 200           # the whole body, every tensor
    assert all(torch.equal(body[k], ref[k.removeprefix("net.")]) for k in shared)
    assert model.input_stats.mean == (0.5, 0.5, 0.5) and model.input_stats.std == (0.5, 0.5, 0.5)
