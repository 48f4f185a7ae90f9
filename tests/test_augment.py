"""data.augment (none | flip | fastai | randaugment) and the evaluation transform (crop_pct):
determinism from the run's generator, the ranges of every random parameter, flip's stream as
before, the eval crop as timm's, crop_pct resolved from the weights."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from PIL import Image, ImageEnhance, ImageOps

from harness.engine import data
from harness.engine.data import fastai_aug, randaugment
from harness.engine.data.augment import resized_crop_boxes
from harness.engine.data.resize import eval_transform, resize, stored_size
from harness.engine.recipe import DataConfig, Recipe
from harness.errors import HarnessError
from tests.conftest import needs_fashion, tiny_recipe_dict

AUGMENTS = ("none", "flip", "fastai", "randaugment")
STATS = data.InputStats()


def _images(n=16, c=3, px=20, seed=0) -> torch.Tensor:
    return torch.randint(0, 256, (n, c, px, px), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def _split(stored: int | None = 24, size: int = 20, c: int = 3) -> data.Split:
    return data.Split(_images(16, c), torch.arange(16) % 2, size, stored)


def _epoch(split, augment, seed):
    return list(data.train_batches(split, 8, torch.Generator().manual_seed(seed), augment))


def _unnormalised(x: torch.Tensor) -> torch.Tensor:
    mean, std = torch.tensor(STATS.mean).view(1, 3, 1, 1), torch.tensor(STATS.std).view(1, 3, 1, 1)
    return x * std + mean


@pytest.mark.parametrize("augment", AUGMENTS)
@pytest.mark.parametrize("channels", [1, 3])
def test_every_augment_is_bitwise_reproducible_from_the_seed(augment, channels):
    split = _split(c=channels)
    a, b, other = _epoch(split, augment, 3), _epoch(split, augment, 3), _epoch(split, augment, 4)
    assert all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b))
    for images, _ in a:   # normalised float32, three channels, the output size, pixels in [0, 1]
        assert images.shape == (8, 3, 20, 20) and images.dtype == torch.float32
        pixels = _unnormalised(images)
        assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5
    if augment != "none":   # another seed: other draws (the order of the images differs too)
        assert not all(torch.equal(x[0], y[0]) for x, y in zip(a, other))


def test_augment_none_trains_on_the_evaluation_images():
    split = _split()
    (images, labels), = _epoch(data.Split(split.x[:8], split.y[:8], 20, 24), "none", 0)[:1]
    order = data.train_indices(8, 8, torch.Generator().manual_seed(0), torch.device("cpu"))
    evaluated = next(data.eval_batches(data.Split(split.x[:8], split.y[:8], 20, 24), 8))[0]
    assert torch.equal(images, evaluated[next(order)])


def _crop_flip_before(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """data.augment: true as it was before augment became a choice (commit 6e0316e)."""
    b, _, h, w = x.shape
    pad = min(h, w) // 8
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    top = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
    left = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
    flip = torch.rand(b, generator=generator) < 0.5
    rows = top[:, None] + torch.arange(h)
    cols = left[:, None] + torch.where(flip[:, None], torch.arange(w).flip(0), torch.arange(w))
    out = padded[torch.arange(b)[:, None, None], :, rows[:, :, None], cols[:, None, :]]
    return out.permute(0, 3, 1, 2).contiguous()


def test_flip_without_an_eval_crop_is_the_crop_flip_of_before_bitwise():
    x = _images(16, 1, 28)
    split = data.Split(x, torch.arange(16), 20, 20)
    new = _epoch(split, "flip", 5)
    gen = torch.Generator().manual_seed(5)
    for idx, (images, _) in zip(data.train_indices(16, 8, gen, torch.device("cpu")), new):
        expected = _crop_flip_before(data.normalize(resize(x[idx], 20)), gen)
        assert torch.equal(images, expected)


def test_flip_from_a_larger_stored_image_is_a_window_of_it_maybe_mirrored():
    x = _images(16, 3, 12)
    (images, _), _ = _epoch(data.Split(x, torch.arange(16), 8, 12), "flip", 1)
    windows = data.normalize(x).unfold(2, 8, 1).unfold(3, 8, 1)   # [B,3,5,5,8,8]
    idx = next(data.train_indices(16, 8, torch.Generator().manual_seed(1), torch.device("cpu")))
    flipped = 0
    for img, k in zip(images, idx):
        cand = windows[k].permute(1, 2, 0, 3, 4).reshape(25, 3, 8, 8)
        plain = any(torch.equal(img, c) for c in cand)
        mirrored = any(torch.equal(img.flip(-1), c) for c in cand)
        assert plain or mirrored
        flipped += mirrored and not plain
    assert 0 < flipped < 8


def test_evaluation_resizes_to_the_stored_size_then_centre_crops():
    x = _images(4, 3, 28)
    split = data.Split(x, torch.arange(4), 224, 256)     # crop_pct 0.875
    expected = TF.center_crop(resize(x, 256), [224, 224])
    assert torch.equal(data.raw_images(split, slice(None)), expected)
    assert torch.equal(next(data.eval_batches(split, 4))[0], data.normalize(expected))
    # stored == size: the resize alone, as before crop_pct
    assert torch.equal(data.raw_images(data.Split(x, torch.arange(4), 32, 32), slice(None)), resize(x, 32))


def test_stored_size_is_timms_scale_size():
    assert stored_size(DataConfig(image_size=224, crop_pct=0.875)) == 256
    assert stored_size(DataConfig(image_size=224, crop_pct=224 / 232)) == 232   # 231.99999999999997
    assert stored_size(DataConfig(image_size=32)) == 32
    assert eval_transform(DataConfig(image_size=224, crop_pct=0.875)) == "resize 256, centre crop 224 (crop_pct 0.875)"


# --- the random parameters' ranges ------------------------------------------------------------

@pytest.mark.parametrize("min_scale", [0.35, 0.08])
def test_resized_crop_boxes_cover_the_area_range_and_stay_inside(min_scale):
    boxes = resized_crop_boxes(4096, torch.Generator().manual_seed(0), torch.device("cpu"), min_scale)
    area, aspect = boxes.width * boxes.height, boxes.width / boxes.height
    assert area.min() >= min_scale - 1e-6 and area.max() <= 1 + 1e-6
    assert area.min() < min_scale + 0.02 and area.max() > 0.95
    assert aspect.min() >= 3 / 4 - 1e-5 and aspect.max() <= 4 / 3 + 1e-5
    assert (boxes.left >= 0).all() and (boxes.top >= 0).all()
    assert (boxes.left + boxes.width <= 1 + 1e-6).all() and (boxes.top + boxes.height <= 1 + 1e-6).all()


def test_fastai_draws_stay_within_fastais_defaults():
    d = fastai_aug.draw_fastai(8192, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert d.degrees.abs().max() <= 10 and d.degrees.abs().max() > 9.9
    assert d.zoom.min() >= 1 and d.zoom.max() <= 1.1
    assert d.warp.abs().max() <= 0.2 and d.warp.abs().max() > 0.199
    assert d.brightness.min() >= 0.4 and d.brightness.max() <= 0.6
    assert d.contrast.min() >= 0.8 - 1e-6 and d.contrast.max() <= 1.25 + 1e-6
    for applied, p in (((d.degrees != 0).float(), 0.75), ((d.zoom != 1).float(), 0.75),
                       ((d.brightness != 0.5).float(), 0.75), (d.flip.float(), 0.5)):
        assert abs(applied.mean() - p) < 0.03


def test_fastai_affine_map_rotates_at_most_10_degrees_and_zooms_at_most_1_1():
    d = fastai_aug.draw_fastai(4096, torch.Generator().manual_seed(1), torch.device("cpu"))
    m = fastai_aug.affine_matrices(d)[:, :2, :2]
    m[:, 0] *= torch.where(d.flip, -1.0, 1.0)[:, None]        # undo the flip
    angle = torch.rad2deg(torch.atan2(m[:, 0, 1], m[:, 0, 0]))
    scale = torch.sqrt(torch.det(m))                            # output -> input: 1 / zoom
    assert angle.abs().max() <= 10 + 1e-4 and angle.abs().max() > 9.9
    assert scale.min() >= 1 / 1.1 - 1e-6 and scale.max() <= 1 + 1e-6


def test_fastai_warp_takes_the_moved_corners_to_the_corners():
    d = fastai_aug.draw_fastai(64, torch.Generator().manual_seed(2), torch.device("cpu"))
    h = fastai_aug.warp_homographies(d.warp)
    x_t, y_t = d.warp[:, 0], d.warp[:, 1]
    moved = torch.stack([torch.stack([-1 - y_t, -1 - x_t], 1), torch.stack([1 + y_t, -1 + x_t], 1)], 1)
    mapped = torch.cat([moved, torch.ones(64, 2, 1)], -1) @ h.transpose(1, 2)
    corners = mapped[..., :2] / mapped[..., 2:]
    assert torch.allclose(corners, torch.tensor([[-1., -1.], [1., -1.]]).expand(64, 2, 2), atol=1e-5)


def test_fastai_rotation_of_a_line_is_what_was_drawn():
    size = 65
    img = torch.zeros(1, 1, size, size, dtype=torch.uint8)
    img[..., size // 2, :] = 255                                 # a horizontal line through the centre
    d = fastai_aug.draw_fastai(1, torch.Generator().manual_seed(0), torch.device("cpu"))
    d = fastai_aug.FastaiDraw(fastai_aug.Boxes(*(torch.tensor([v]) for v in (0., 0., 1., 1.))), torch.tensor([False]),
                              torch.tensor([10.0]), torch.ones(1), torch.full((1, 2), 0.5), torch.zeros(1, 2),
                              torch.full((1,), 0.5), torch.ones(1))
    out = F.grid_sample(img.float(), fastai_aug.fastai_grid(d, size), align_corners=False)[0, 0]
    ys, xs = torch.nonzero(out > 127, as_tuple=True)
    slope = np.polyfit(xs.numpy(), ys.numpy(), 1)[0]
    assert abs(abs(math.degrees(math.atan(slope))) - 10) < 1.0


# --- randaugment's ops against PIL --------------------------------------------------------------

def _pil(x: torch.Tensor) -> Image.Image:
    return Image.fromarray(x.permute(1, 2, 0).numpy().astype(np.uint8), "RGB")


def _tensor(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(img)).permute(2, 0, 1).float()


def test_randaugment_pixel_ops_match_pil():
    x = _images(3, 3, 24, seed=4).float()
    x[1] = (x[1] * 0.5 + 40).round()                             # a narrower range, for autocontrast
    for i in range(3):
        pil = _pil(x[i])
        assert torch.equal(randaugment.equalize(x[i:i + 1])[0], _tensor(ImageOps.equalize(pil)))
        assert torch.equal(randaugment.autocontrast(x[i:i + 1])[0], _tensor(ImageOps.autocontrast(pil)))
        assert torch.equal(randaugment.posterize(x[i:i + 1], torch.tensor([9.0]))[0], _tensor(ImageOps.posterize(pil, 3)))
        assert torch.equal(randaugment.solarize(x[i:i + 1], torch.tensor([230.0]))[0], _tensor(ImageOps.solarize(pil, 230)))
        for name, enhancer in (("Brightness", ImageEnhance.Brightness), ("Color", ImageEnhance.Color),
                               ("Contrast", ImageEnhance.Contrast), ("Sharpness", ImageEnhance.Sharpness)):
            ours = randaugment.enhance(x[i:i + 1], torch.tensor([randaugment.OPS.index(name)]), torch.tensor([1.72]))
            assert (ours[0] - _tensor(enhancer(pil).enhance(1.72))).abs().max() <= 1, name


def test_randaugment_translate_moves_by_0_045_per_magnitude_and_fills():
    x = _images(1, 3, 20, seed=5).float()
    kind = torch.tensor([randaugment.OPS.index("TranslateXRel")])
    fill = torch.tensor([124.0, 116.0, 104.0]).view(1, 3, 1, 1)
    out = randaugment.geometric(x, kind, torch.tensor([10.0]), torch.tensor([1.0]), fill)[0]
    assert torch.equal(out[:, :, :11], x[0, :, :, 9:])           # 0.45 of 20 px: 9 px to the left
    assert torch.equal(out[:, :, 11:], fill[0].expand(3, 20, 9))


def test_randaugment_layer_applies_about_half_the_ops_and_clips_the_magnitude():
    x = _images(512, 3, 16, seed=6)
    out = randaugment.rand_augment(x, 16, torch.Generator().manual_seed(0), (124, 116, 104))
    assert out.shape == (512, 3, 16, 16) and torch.equal(out, out.round()) and out.min() >= 0 and out.max() <= 255
    gen = torch.Generator().manual_seed(0)
    m = (randaugment.MAGNITUDE + randaugment.MAGNITUDE_STD * torch.randn(100000, generator=gen)).clamp(0, 10)
    assert m.max() <= 10 and abs(m.mean() - 9) < 0.01


# --- the recipe: crop_pct from the weights, probe, bad values -----------------------------------

def _recipe(data_cfg: dict, model: dict | None = None) -> Recipe:
    return Recipe.from_dict({"data": data_cfg, "model": model or {}, "stages": [{"epochs": 1, "lr": 1e-3}]})


def test_crop_pct_follows_the_weights_above_64_px():
    assert _recipe({"image_size": 224}, {"arch": "timm/vit_small_patch16_224", "weights": "imagenet"}).data.crop_pct == 0.9
    assert _recipe({"image_size": 224}, {"arch": "timm/tf_efficientnet_lite0", "weights": "imagenet"}).data.crop_pct == 0.875
    assert _recipe({"image_size": 224}, {"arch": "resnet18", "weights": "imagenet"}).data.crop_pct == 224 / 256
    assert _recipe({"image_size": 224}, {"arch": "resnet50", "weights": "imagenet"}).data.crop_pct == 224 / 232
    assert _recipe({"image_size": 224}, {"arch": "resnet18", "weights": "none"}).data.crop_pct == 1.0
    assert _recipe({"image_size": 64}, {"arch": "resnet18", "weights": "imagenet"}).data.crop_pct == 1.0
    assert _recipe({"image_size": 128, "crop_pct": 0.5}, {"weights": "imagenet"}).data.crop_pct == 0.5


def test_an_exported_recipe_names_crop_pct_and_round_trips():
    recipe = _recipe({"image_size": 224}, {"arch": "resnet50", "weights": "imagenet"})
    assert "crop_pct: 0.9655172413793104" in recipe.to_yaml()
    again = Recipe.from_dict(recipe.to_dict())
    assert again == recipe and again.to_yaml() == recipe.to_yaml()


@pytest.mark.parametrize("field, value, says", [("augment", "maybe", "data.augment"), ("crop_pct", 1.5, "data.crop_pct"),
                                                 ("crop_pct", "wide", "data.crop_pct")])
def test_bad_values_are_one_line_naming_the_field(field, value, says):
    with pytest.raises(HarnessError) as e:
        _recipe({field: value})
    assert says in str(e.value) and "\n" not in str(e.value)


def test_a_bad_arch_is_reported_by_its_field_not_the_crop_pct_lookup():
    with pytest.raises(HarnessError, match="model.arch"):
        _recipe({"image_size": 224}, {"arch": "timm/no_such_net", "weights": "imagenet"})


def test_a_probe_stage_still_needs_augment_none():
    from harness.engine import probe
    for augment, expected in (("none", True), ("flip", False), ("fastai", False), ("randaugment", False)):
        recipe = Recipe.from_dict(tiny_recipe_dict(data={"augment": augment}, model={"train_bn": False}))
        assert probe.qualifies(recipe, recipe.stages[0], 3) is (expected and probe.cache_mode() != "off")


# --- a whole fine-tune ---------------------------------------------------------------------------

@needs_fashion
@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("augment", ["fastai", "randaugment"])
def test_a_fine_tune_with_augmentation_replays_bitwise_on_the_cpu(augment, workspace):
    from harness.engine.train import fine_tune
    recipe = Recipe.from_dict(tiny_recipe_dict(data={"augment": augment, "crop_pct": 0.8, "train_per_class": 16},
                                               stages=[{"epochs": 1, "lr": 1e-3}]))
    a, b = fine_tune(recipe, workspace=workspace), fine_tune(recipe, workspace=workspace)
    assert a.ok and [(e.train_loss, e.val_loss, e.val_accuracy) for e in a.epochs] == \
        [(e.train_loss, e.val_loss, e.val_accuracy) for e in b.epochs]
    for (name, x), (_, y) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        assert torch.equal(x, y), name


def test_an_image_folder_is_stored_at_image_size_over_crop_pct(tmp_path, workspace):
    from tests.shipped import make_image_folder
    root = make_image_folder(tmp_path / "folder")
    recipe = Recipe.from_dict(tiny_recipe_dict(data={"dataset": "imagefolder", "root": str(root), "classes": None,
                                                     "train_per_class": None, "image_size": 16, "crop_pct": 0.8}))
    ds = data.load_dataset(recipe.data, workspace, 0)
    assert ds.train.x.shape[-2:] == (20, 20) and (ds.val.size, ds.val.stored) == (16, 20)
    images, _ = next(data.eval_batches(ds.val, 4))
    assert images.shape[-2:] == (16, 16)
    assert torch.equal(data.raw_images(ds.val, slice(0, 4)), TF.center_crop(ds.val.x[:4], [16, 16]))


class _RecordingTracker:
    """Takes whatever tracked_fine_tune logs; keeps the params."""
    def __init__(self):
        self.params: dict = {}

    def log_params(self, params):
        self.params.update(params)

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


def test_a_run_records_its_eval_transform_before_training(monkeypatch):
    from harness import jobs

    class Stop(Exception):
        pass

    def training_starts(*args, **kwargs):   # the params are logged by now: the run need not train
        raise Stop
    monkeypatch.setattr(jobs, "fine_tune", training_starts)
    recipe = Recipe.from_dict(tiny_recipe_dict(data={"crop_pct": 0.8}))
    tracker = _RecordingTracker()
    with pytest.raises(Stop):
        jobs.tracked_fine_tune(recipe, tracker)
    assert tracker.params["data.eval_transform"] == "resize 20, centre crop 16 (crop_pct 0.8)"
    assert tracker.params["data.crop_pct"] == "0.8"
