"""Free probes (harness/engine/probe.py): a head-only stage on a truly frozen body, without
augmentation, trains the head on cached body features, with the uncached run's numbers."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import needs_fashion, tiny_recipe_dict
from harness.engine import data as data_mod
from harness.engine import probe
from harness.engine.groups import set_trainable
from harness.engine.models import build_model
from harness.engine.recipe import Recipe
from harness.engine.train import fine_tune
from harness.errors import HarnessError

pytestmark = pytest.mark.usefixtures("one_thread")   # see conftest.one_thread

HEAD = {"epochs": 2, "train": "head", "lr": {"max": 2e-2}, "pct_start": 0.3, "div": 25}
ALL = {"epochs": 1, "train": "all", "lr": {"min": 1e-5, "max": 1e-3}, "pct_start": 0.3, "div": 5}


def _recipe(arch="resnet18", head="fastai", stages=(HEAD,), train_bn=False, augment=False) -> Recipe:
    return Recipe.from_dict(tiny_recipe_dict(
        model={"arch": arch, "head": head, "train_bn": train_bn},
        data={"augment": augment}, stages=[dict(s) for s in stages]))


@pytest.fixture(autouse=True)
def _fresh_cache(monkeypatch):
    monkeypatch.delenv(probe.ENV, raising=False)
    probe.CACHE.clear()
    yield
    probe.CACHE.clear()


def _run(recipe, workspace, mode=None, monkeypatch=None):
    if mode is not None:
        monkeypatch.setenv(probe.ENV, mode)
    result = fine_tune(recipe, workspace=workspace)
    if mode is not None:
        monkeypatch.delenv(probe.ENV)
    assert result.ok, result.status
    return result


def _val_logits(result, recipe, workspace) -> torch.Tensor:
    val = data_mod.load_dataset(recipe.data, workspace, recipe.seed).val
    model = result.model.eval()
    with torch.no_grad():
        return torch.cat([model(x) for x, _ in data_mod.eval_batches(val, 16, model.input_stats)])


def _assert_same_run(a, b, logits_a, logits_b):
    assert [e.val_accuracy for e in a.epochs] == [e.val_accuracy for e in b.epochs]
    assert a.test_accuracy == b.test_accuracy
    assert a.lrs == b.lrs and a.moms == b.moms and a.stage_starts == b.stage_starts
    for ea, eb in zip(a.epochs, b.epochs):
        assert ea.train_loss == pytest.approx(eb.train_loss, rel=1e-5)
        assert ea.val_loss == pytest.approx(eb.val_loss, rel=1e-5)
    rel = (logits_a - logits_b).abs().max() / logits_b.abs().max()
    assert rel <= 1e-5, f"logits differ by {float(rel):.2e} relative"


# --- the split forward ---------------------------------------------------------------------

@pytest.mark.parametrize("arch,head", [("resnet18", "fastai"), ("resnet18", "linear"),
                                       ("timm/test_resnet", "fastai"), ("timm/test_resnet", "linear"),
                                       ("timm/test_convnext", "fastai"), ("timm/test_vit", "fastai"),
                                       ("timm/test_vit", "linear")])
def test_head_forward_of_features_is_the_forward(arch, head):
    torch.manual_seed(0)
    model = build_model(arch, 3, "none", head, 3, 32)
    x = torch.randn(4, 3, 32, 32)
    model.eval()
    assert torch.equal(model.head_forward(model.features(x)), model(x))
    if head == "linear" and arch.startswith("timm/"):
        assert torch.equal(model(x), model.net(x))            # timm's own forward, unchanged
    model.train()                                              # dropout: the same draws
    torch.manual_seed(1)
    split = model.head_forward(model.features(x))
    torch.manual_seed(1)
    assert torch.equal(split, model(x))


# --- train_bn: false is truly frozen --------------------------------------------------------

def _bn_stats(model, head_prefixes) -> list[torch.Tensor]:
    return [m.running_mean.clone() for n, m in model.named_modules()
            if isinstance(m, nn.BatchNorm2d) and not n.startswith(head_prefixes)]


@pytest.mark.parametrize("arch,head_prefix", [("resnet18", "2"), ("timm/test_resnet", "head")])
@pytest.mark.parametrize("train_bn", [False, True])
def test_frozen_body_batchnorm_moves_only_with_train_bn(arch, head_prefix, train_bn):
    torch.manual_seed(0)
    model = build_model(arch, 3, "none", "fastai", 3, 32)
    model.train()
    set_trainable(model, 1, train_bn)
    before = _bn_stats(model, head_prefix)
    assert before
    model.eval()
    model.train()                        # as evaluate() leaves it
    model(torch.randn(4, 3, 32, 32)).sum().backward()
    moved = [not torch.equal(a, b) for a, b in zip(before, _bn_stats(model, head_prefix))]
    assert all(moved) if train_bn else not any(moved)
    head = model[2] if arch == "resnet18" else model.head
    assert head.training and all(m.training for m in head.modules())   # the head trains as before
    set_trainable(model, 3, train_bn)    # unfrozen: every module follows the model again
    assert all(m.training for m in model.modules())


# --- which stages qualify -----------------------------------------------------------------------

def test_only_a_head_stage_on_a_truly_frozen_body_without_augmentation_qualifies(monkeypatch):
    head, = _recipe().stages
    last_two, = _recipe(stages=[{**HEAD, "train": {"last": 2}}]).stages
    assert probe.qualifies(_recipe(), head, 3)
    assert not probe.qualifies(_recipe(train_bn=True), head, 3)
    assert not probe.qualifies(_recipe(augment=True), head, 3)
    assert not probe.qualifies(_recipe(), _recipe(stages=[ALL]).stages[0], 3)
    assert not probe.qualifies(_recipe(), last_two, 3)
    monkeypatch.setenv(probe.ENV, "off")
    assert not probe.qualifies(_recipe(), head, 3)
    monkeypatch.setenv(probe.ENV, "sometimes")
    with pytest.raises(HarnessError, match="HARNESS_FEATURE_CACHE: 'sometimes' is not one of memory, disk, off"):
        probe.cache_mode()


@needs_fashion
@pytest.mark.parametrize("change", [{"augment": True}, {"train_bn": True},
                                    {"stages": ({**HEAD, "epochs": 1, "train": {"last": 2}},)}])
def test_a_stage_that_does_not_qualify_never_computes_features(workspace, monkeypatch, change):
    calls = []
    real = probe.compute_features
    monkeypatch.setattr(probe, "compute_features", lambda *a: calls.append(1) or real(*a))
    _run(_recipe(**{"stages": ({**HEAD, "epochs": 1},), **change}), workspace)
    assert calls == [] and probe.CACHE.computed == 0 and not probe.CACHE.entries


@needs_fashion
def test_features_beyond_the_cache_budget_are_not_cached(workspace, monkeypatch):
    monkeypatch.setattr(probe.CACHE, "max_bytes", 1000)   # resnet18 at 16 px: 2 KB per image
    result = _run(_recipe(stages=({**HEAD, "epochs": 1},)), workspace)
    assert probe.CACHE.computed == 0 and not probe.CACHE.entries and result.val_accuracy is not None


# --- cached runs are the uncached ones ---------------------------------------------------------

@needs_fashion
@pytest.mark.parametrize("arch,head,stages", [
    ("resnet18", "fastai", (HEAD,)),                                  # head_only: the test split too
    ("timm/test_resnet", "linear", (HEAD, ALL, {**HEAD, "epochs": 1})),   # lp_ft, then a head stage on a new body
])
def test_cached_run_equals_the_uncached_run(workspace, monkeypatch, arch, head, stages):
    recipe = _recipe(arch, head, stages)
    off = _run(recipe, workspace, "off", monkeypatch)
    assert probe.CACHE.computed == 0
    cached = _run(recipe, workspace)
    probe_stages = sum(s["train"] == "head" for s in stages)
    assert probe.CACHE.computed == 2 * probe_stages + (stages[-1]["train"] == "head")   # train, val (, test)
    _assert_same_run(cached, off, _val_logits(cached, recipe, workspace), _val_logits(off, recipe, workspace))
    assert cached.test_accuracy is not None


@needs_fashion
def test_a_second_fine_tune_in_the_process_reuses_the_features(workspace):
    recipe = _recipe()
    first = _run(recipe, workspace)
    assert probe.CACHE.computed == 3                          # train, val, test
    hits = probe.CACHE.memory_hits                            # the features of epoch 2 (train, val)
    second = _run(recipe, workspace)
    # none computed again: every lookup is a hit (train and val in both epochs, test)
    assert (probe.CACHE.computed, probe.CACHE.memory_hits) == (3, hits + 5)
    _assert_same_run(second, first, _val_logits(second, recipe, workspace), _val_logits(first, recipe, workspace))
    # another seed draws other splits: other features
    _run(Recipe.from_dict({**recipe.to_dict(), "seed": 1}), workspace)
    assert probe.CACHE.computed == 6


@needs_fashion
def test_the_disk_cache_is_written_and_read_back(workspace, tmp_path, monkeypatch):
    recipe = _recipe()
    first = _run(recipe, tmp_path, "disk", monkeypatch)
    files = sorted((tmp_path / "cache" / "features").glob("*.pt"))
    assert len(files) == 3 and probe.CACHE.disk_writes == 3 and probe.CACHE.computed == 3
    assert not list((tmp_path / "cache" / "features").glob("*.tmp"))
    probe.CACHE.clear()                                    # a fresh process, as far as the cache goes
    second = _run(recipe, tmp_path, "disk", monkeypatch)
    assert (probe.CACHE.computed, probe.CACHE.disk_reads) == (0, 3)
    _assert_same_run(second, first, _val_logits(second, recipe, workspace), _val_logits(first, recipe, workspace))
    # damaged files are misses: computed again (no traceback) and rewritten
    files[0].write_bytes(b"not a torch file")
    files[1].write_bytes(files[1].read_bytes()[:100])
    torch.save({"format": probe.FORMAT, "key": "another", "features": torch.zeros(1)}, files[2])
    probe.CACHE.clear()
    third = _run(recipe, tmp_path, "disk", monkeypatch)
    assert (probe.CACHE.computed, probe.CACHE.disk_reads, probe.CACHE.disk_writes) == (3, 0, 3)
    assert [e.val_accuracy for e in third.epochs] == [e.val_accuracy for e in first.epochs]
    probe.CACHE.clear()
    _run(recipe, tmp_path, "disk", monkeypatch)
    assert (probe.CACHE.computed, probe.CACHE.disk_reads) == (0, 3)
    # features already in memory are written when the disk cache is asked for later
    for f in files:
        f.unlink()
    _run(recipe, tmp_path, "disk", monkeypatch)
    assert probe.CACHE.computed == 0 and len(list((tmp_path / "cache" / "features").glob("*.pt"))) == 3


def test_the_memory_cache_evicts_the_oldest_beyond_its_bounds():
    cache = probe.FeatureCache(max_entries=2, max_bytes=3 * 400)
    for key in "abc":
        cache.put(key, torch.zeros(100))                  # 400 bytes each
    assert list(cache.entries) == ["b", "c"]
    assert cache.get("b") is not None and list(cache.entries) == ["c", "b"]
    cache.put("big", torch.zeros(301))                    # over the byte budget: never kept
    assert list(cache.entries) == ["c", "b"]
    cache.put("d", torch.zeros(200))
    assert list(cache.entries) == ["b", "d"] and cache.get("c") is None
