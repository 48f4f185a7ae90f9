"""Layer-wise LR decay (`llrd`, a stage's `layer_decay`): timm's own block assignment, the
peak LR of every parameter, and the per-group curves a run logs."""
from __future__ import annotations

from collections import Counter

import pytest
import timm
import torch
from timm.models import group_parameters
from timm.optim import param_groups_layer_decay

from conftest import needs_fashion, tiny_recipe_dict
from harness.engine.layer_decay import layer_ids, lr_scales
from harness.engine.models import build_model
from harness.engine.recipe import Recipe
from harness.engine.step import Hyper, train_step
from harness.engine.train import fine_tune, make_optimizer
from harness.sweep.strategies import llrd

pytestmark = pytest.mark.usefixtures("one_thread")   # see conftest.one_thread

LR, DECAY = 1e-3, 0.75


def llrd_recipe(arch: str, head: str, **stage) -> Recipe:
    d = tiny_recipe_dict(model={"arch": arch, "head": head})
    d["stages"] = [llrd(1, lr=LR, layer_decay=DECAY, **stage)[0].model_dump(mode="json")]
    return Recipe.from_dict(d)


def peak_lrs(model, recipe: Recipe) -> dict[str, float]:
    """Each parameter's LR in the optimizer after one real step at the stage's peak."""
    stage = recipe.stages[0]
    opt = make_optimizer(model, stage, recipe, torch.device("cpu"))
    x, y = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1])
    train_step(model, opt, x, y, Hyper(stage.peak_lrs(model.n_groups), 0.9, 0.99))
    lr_of = {id(p): pg["lr"] for pg in opt.param_groups for p in pg["params"]}
    return {n: lr_of[id(p)] for n, p in model.named_parameters()}


def timm_scales(net) -> dict[int, float]:
    """timm's own lr_scale per parameter (by identity), as timm's fine-tuning recipe sets it."""
    return {id(p): pg["lr_scale"] for pg in param_groups_layer_decay(net, layer_decay=DECAY) for p in pg["params"]}


@pytest.mark.parametrize("arch", ["timm/test_vit", "timm/test_convnext", "timm/test_efficientnet", "timm/test_resnet"])
def test_every_parameters_peak_lr_is_timms_lr_scale_times_lr(arch):
    """With the model's own (reset) classifier, the model is timm's: every parameter's peak LR
    is timm's param_groups_layer_decay lr_scale times lr."""
    torch.manual_seed(0)
    model = build_model(arch, 4, "none", "linear", groups=3, image_size=32)
    scales = timm_scales(model.net)
    lrs = peak_lrs(model, llrd_recipe(arch, "linear"))
    assert len(lrs) == len(scales)
    for name, p in model.named_parameters():
        assert lrs[name] == pytest.approx(LR * scales[id(p)], rel=1e-12), name
    assert max(scales.values()) == 1.0 and len(set(scales.values())) > 3   # decayed, the classifier at lr


@pytest.mark.parametrize("arch", ["timm/test_vit", "timm/test_convnext"])
def test_the_fastai_head_sits_where_timms_classifier_would(arch):
    """Under the fastai head the body keeps timm's blocks (timm's model with its classifier,
    parameter by parameter) and the new head is the top block, at lr."""
    torch.manual_seed(0)
    model = build_model(arch, 4, "none", "fastai", groups=3, image_size=32)
    reference = timm.create_model(arch.removeprefix("timm/"), num_classes=4,
                                  **({"img_size": 32} if "vit" in arch else {}))
    scales = timm_scales(reference)
    by_name = {n: scales[id(p)] for n, p in reference.named_parameters()}
    lrs = peak_lrs(model, llrd_recipe(arch, "fastai"))
    for name in lrs:
        want = 1.0 if name.startswith("head.") else by_name[name.removeprefix("net.")]
        assert lrs[name] == pytest.approx(LR * want, rel=1e-12), name


@pytest.mark.parametrize("arch", ["resnet18", "efficientnet_b0", "convnext_tiny"])
def test_torchvision_archs_get_the_blocks_timm_gives_the_same_architecture(arch):
    """No group_matcher on a torchvision model: its blocks, read off the module tree, are
    timm's for the same architecture (compared as parameter counts per block, body only)."""
    ours = build_model(arch, 4, "none", "fastai", groups=3)
    ids = layer_ids(ours)
    sizes = dict(ours.named_parameters())
    head = max(ids.values())
    assert {n for n, i in ids.items() if i == head} == {n for n, _ in ours[-1].named_parameters(prefix="2")}
    body = Counter()
    for n, i in ids.items():
        if i != head:
            body[i] += sizes[n].numel()
    ref = timm.create_model(arch, num_classes=0)
    classifier = ref.pretrained_cfg.get("classifier", "fc")
    ref_ids = group_parameters(ref, ref.group_matcher(coarse=False), reverse=True)
    ref_sizes = dict(ref.named_parameters())
    theirs = Counter()
    for n, i in ref_ids.items():
        if not n.startswith((classifier, "head.")):
            theirs[i] += ref_sizes[n].numel()
    assert [body[i] for i in sorted(body)] == [theirs[i] for i in sorted(theirs)]


def test_scales_are_decay_to_the_depth_below_the_head():
    model = build_model("resnet18", 4, "none", "fastai", groups=3)
    scales = lr_scales(model, 0.5)
    assert scales["0.conv1.weight"] == scales["0.bn1.weight"] == 0.5 ** 9      # the stem, 9 blocks below
    assert scales["1.layer4.1.conv2.weight"] == 0.5 and scales["2.2.weight"] == 1.0
    assert set(lr_scales(model, 1.0).values()) == {1.0}


@needs_fashion
def test_a_run_logs_each_groups_fastest_and_slowest_block(workspace):
    """lr/<group> is the group's top block (what the optimizer holds for it), lr/<group>/min
    its bottom one, for the groups whose blocks differ: a handful of curves, not one per block."""
    d = tiny_recipe_dict(data={"test_per_class": 4})   # the test split is not looked at here
    d["stages"] = [llrd(1, lr=LR, layer_decay=DECAY)[0].model_dump(mode="json")]

    class Steps:
        def __init__(self):
            self.series: dict[str, list[float]] = {}

        def log_steps(self, first_step, series):
            for k, v in series.items():
                self.series.setdefault(k, []).extend(v)

        def log_epoch(self, epoch, values):
            pass

    tracker = Steps()
    result = fine_tune(Recipe.from_dict(d), tracker, workspace)
    lrs = tracker.series
    assert set(k for k in lrs if k.startswith("lr/")) == {"lr/early", "lr/late", "lr/head", "lr/early/min", "lr/late/min"}
    head = lrs["lr/head"]
    # resnet18: stem + 8 blocks + head; early = stem, layer1, layer2 (blocks 0-4), late = layer3, layer4 (5-8)
    for key, depth in (("lr/early", 5), ("lr/early/min", 9), ("lr/late", 1), ("lr/late/min", 4)):
        assert lrs[key] == pytest.approx([h * DECAY ** depth for h in head], rel=1e-12), key
    assert [row[0] for row in result.lrs] == lrs["lr/early"]
