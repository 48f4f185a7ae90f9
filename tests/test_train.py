"""Tests for harness.engine.train.fine_tune: the schedule the optimizer really holds, freezing,
optimizer resets, determinism, divergence, the report callback and bad settings.

Expected numbers come from FINETUNE_SEMANTICS.md, re-implemented here (not from
harness.engine.schedule), and are compared with what the optimizer holds when it steps.
"""
from __future__ import annotations

import math
import re

import pytest
import torch
from torch import nn

from conftest import needs_fashion, tiny_recipe_dict
from harness.engine import train as train_mod
from harness.errors import HarnessError
from harness.engine.recipe import Recipe
from harness.engine.train import fine_tune

pytestmark = needs_fashion

STEPS_PER_EPOCH = 6          # tiny recipe: 2 classes x 24 train images, batch 8
N_GROUPS = 3                 # resnet18: early, late, head
NORM = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm, nn.LayerNorm)


# --- the reference formula (FINETUNE_SEMANTICS.md), written out independently -----------

def ref_cos(a: float, b: float, x: float) -> float:
    return a + (1 - math.cos(math.pi * x)) * (b - a) / 2


def ref_two_part(pos: float, a: float, m: float, e: float, p: float) -> float:
    if pos < p:
        return ref_cos(a, m, pos / p)
    return ref_cos(m, e, (pos - p) / (1 - p))


def ref_lr(s: int, T: int, lr_max: float, div: float, div_final: float, pct: float) -> float:
    return ref_two_part(s / T, lr_max / div, lr_max, lr_max / div_final, pct)


def ref_mom(s: int, T: int, pct: float) -> float:
    return ref_two_part(s / T, 0.95, 0.85, 0.95, pct)


def ref_expected_schedule() -> list[tuple[list[float], float]]:
    """(lr per group, beta1) at every global step of the tiny recipe's two stages."""
    stages = [
        # stage 1: freeze, slice(2e-3) -> body max/10, head max; div 25, pct 0.99, 1 epoch
        dict(peaks=[2e-3 / 10, 2e-3 / 10, 2e-3], div=25, div_final=1e5, pct=0.99, epochs=1),
        # stage 2: unfreeze, slice(1e-5, 1e-3) geometric; div 5, div_final 1e5, pct 0.3, 2 epochs
        dict(peaks=[1e-5 * (1e-3 / 1e-5) ** (g / (N_GROUPS - 1)) for g in range(N_GROUPS)],
             div=5, div_final=1e5, pct=0.3, epochs=2),
    ]
    out = []
    for st in stages:
        T = st["epochs"] * STEPS_PER_EPOCH
        for s in range(T):
            lrs = [ref_lr(s, T, p, st["div"], st["div_final"], st["pct"]) for p in st["peaks"]]
            out.append((lrs, ref_mom(s, T, st["pct"])))
    return out


def test_reference_formula_reproduces_the_worked_example():
    """Guards the reference above: the doc's resnet18 example, 10 steps per epoch."""
    # phase 1: slice(2e-3) -> body 2e-4, head 2e-3, div 25, pct 0.99, T = 10
    body = [ref_lr(s, 10, 2e-4, 25, 1e5, 0.99) for s in range(3)]
    assert body == pytest.approx([8.0e-06, 1.279317e-05, 2.669405e-05], rel=1e-6)
    assert [ref_lr(s, 10, 2e-3, 25, 1e5, 0.99) for s in range(3)] == pytest.approx(
        [10 * b for b in body], rel=1e-12)
    assert [ref_mom(s, 10, 0.99) for s in range(3)] == pytest.approx([0.95, 0.947504, 0.940264], rel=1e-6)
    # phase 2: base_lr 1e-3, slice(1e-5, 1e-3), div 5, pct 0.3, T = 20
    g0 = [ref_lr(s, 20, 1e-5, 5, 1e5, 0.3) for s in (0, 1, 2, 19)]
    assert g0 == pytest.approx([2.0e-06, 2.535898e-06, 4.0e-06, 1.254593e-07], rel=1e-6)
    assert [ref_mom(s, 20, 0.3) for s in range(3)] == pytest.approx([0.95, 0.943301, 0.925], rel=1e-5)


# --- one instrumented run of the tiny recipe, shared by several tests -------------------

class Instrumented:
    """What one fine_tune of the tiny recipe did, seen from inside the optimizer."""

    def __init__(self):
        self.optimizers: list[torch.optim.Optimizer] = []
        self.steps: list[dict] = []          # one entry per optimizer.step(), in order
        self.initial: dict[str, torch.Tensor] = {}
        self.after_epoch: dict[int, dict[str, torch.Tensor]] = {}
        self.reports: list[tuple[int, float | None]] = []
        self.model = None
        self.result = None


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def instrumented(workspace) -> Instrumented:
    torch.set_num_threads(2)
    rec = Instrumented()
    real_make_optimizer, real_build_model = train_mod.make_optimizer, train_mod.build_model

    def build_model(*args, **kwargs):
        model = real_build_model(*args, **kwargs)
        rec.model = model
        rec.initial = _snapshot(model)
        return model

    def make_optimizer(*args, **kwargs):
        opt = real_make_optimizer(*args, **kwargs)
        index = len(rec.optimizers)
        rec.optimizers.append(opt)

        def pre_step(optimizer, _args, _kwargs):
            rec.steps.append({
                "opt": index,
                "state_len": len(optimizer.state),
                "groups": [dict(layer_group=pg["layer_group"], lr=float(pg["lr"]),
                                beta1=float(pg["betas"][0]), beta2=float(pg["betas"][1]),
                                eps=pg["eps"], weight_decay=pg["weight_decay"])
                           for pg in optimizer.param_groups],
            })

        opt.register_step_pre_hook(pre_step)
        return opt

    def report(epoch, val_acc):
        rec.reports.append((epoch, val_acc))
        rec.after_epoch[epoch] = _snapshot(rec.model)

    recipe = Recipe.from_dict(tiny_recipe_dict())
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_mod, "make_optimizer", make_optimizer)
        mp.setattr(train_mod, "build_model", build_model)
        rec.result = fine_tune(recipe, report=report, workspace=workspace)
    return rec


def test_instrumented_run_is_ok(instrumented):
    r = instrumented.result
    assert r.status == "ok"
    assert len(instrumented.steps) == 3 * STEPS_PER_EPOCH
    assert r.stage_starts == [0, STEPS_PER_EPOCH]


def test_optimizer_holds_the_fastai_schedule_at_every_step(instrumented):
    expected = ref_expected_schedule()
    assert len(instrumented.steps) == len(expected) == 18
    for step, (rec, (lrs, mom)) in enumerate(zip(instrumented.steps, expected)):
        seen_groups = set()
        for pg in rec["groups"]:
            g = pg["layer_group"]
            seen_groups.add(g)
            assert pg["lr"] == pytest.approx(lrs[g], rel=1e-6), f"lr of group {g} at step {step}"
            assert pg["beta1"] == pytest.approx(mom, rel=1e-6), f"beta1 of group {g} at step {step}"
        assert seen_groups == set(range(N_GROUPS)), f"step {step}: groups {seen_groups}"


def test_stage_boundaries_restart_the_cycle(instrumented):
    steps = instrumented.steps
    head = lambda i: next(pg["lr"] for pg in steps[i]["groups"] if pg["layer_group"] == 2)  # noqa: E731
    early = lambda i: next(pg["lr"] for pg in steps[i]["groups"] if pg["layer_group"] == 0)  # noqa: E731
    # stage 1 starts at head max/25, stage 2 at max/5 (not the fine_tune div of phase 1)
    assert head(0) == pytest.approx(2e-3 / 25, rel=1e-9)
    assert early(0) == pytest.approx(2e-4 / 25, rel=1e-9)
    assert early(STEPS_PER_EPOCH) == pytest.approx(1e-5 / 5, rel=1e-9)
    assert head(STEPS_PER_EPOCH) == pytest.approx(1e-3 / 5, rel=1e-9)
    # momentum restarts at 0.95 at each stage
    assert steps[0]["groups"][0]["beta1"] == pytest.approx(0.95, rel=1e-12)
    assert steps[STEPS_PER_EPOCH]["groups"][0]["beta1"] == pytest.approx(0.95, rel=1e-12)


def test_result_lrs_and_moms_are_what_the_optimizer_held(instrumented):
    r = instrumented.result
    assert len(r.lrs) == len(r.moms) == len(instrumented.steps)
    for step, rec in enumerate(instrumented.steps):
        for pg in rec["groups"]:
            assert r.lrs[step][pg["layer_group"]] == pytest.approx(pg["lr"], rel=1e-12)
            assert r.moms[step] == pytest.approx(pg["beta1"], rel=1e-12)


def test_optimizer_state_is_reset_at_every_stage(instrumented):
    opts = instrumented.optimizers
    assert len(opts) == 2 and opts[0] is not opts[1]
    by_opt = [[s for s in instrumented.steps if s["opt"] == i] for i in range(2)]
    assert [len(b) for b in by_opt] == [STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH]
    # each optimizer starts with no Adam moments; the hook does see state once it exists
    assert by_opt[0][0]["state_len"] == 0
    assert by_opt[1][0]["state_len"] == 0
    assert by_opt[0][1]["state_len"] > 0
    assert by_opt[1][1]["state_len"] > 0
    # the stage-2 optimizer is only used after stage 1's steps
    assert [s["opt"] for s in instrumented.steps] == [0] * STEPS_PER_EPOCH + [1] * 2 * STEPS_PER_EPOCH


def test_optimizer_is_adamw_with_fastai_settings(instrumented):
    model = instrumented.model
    # which parameters must not decay: every normalisation parameter and every bias
    no_decay, group_of = set(), {}
    for g, group in enumerate(model):
        for module in group.modules():
            for name, p in module.named_parameters(recurse=False):
                group_of[id(p)] = g
                if isinstance(module, NORM) or name == "bias":
                    no_decay.add(id(p))
    assert no_decay, "the model has norm layers, so some parameters must be no-decay"

    for i, opt in enumerate(instrumented.optimizers):
        assert isinstance(opt, torch.optim.AdamW)
        in_opt = set()
        for pg in opt.param_groups:
            assert pg["eps"] == pytest.approx(1e-5, rel=1e-12)
            assert pg["betas"][1] == pytest.approx(0.99, rel=1e-12)
            kinds = {id(p) in no_decay for p in pg["params"]}
            assert len(kinds) == 1, "a param group mixes decay and no-decay parameters"
            expected_wd = 0.0 if kinds.pop() else 0.01
            assert pg["weight_decay"] == pytest.approx(expected_wd, abs=1e-15)
            for p in pg["params"]:
                # the LR of layer group g is applied to the parameters of model[g]
                assert group_of[id(p)] == pg["layer_group"]
                in_opt.add(id(p))
        trainable = {id(p) for p in model.parameters() if p.requires_grad}
        assert trainable <= in_opt, f"optimizer {i} misses trainable parameters"
        assert not opt.defaults.get("amsgrad", False)


def _conv_weights(model: nn.Module, groups) -> list[str]:
    names = []
    for g in groups:
        for mod_name, module in model[g].named_modules():
            if isinstance(module, nn.Conv2d):
                names.append(f"{g}.{mod_name}.weight")
    return names


def test_body_gets_gradients_after_the_stage_change(instrumented):
    convs = _conv_weights(instrumented.model, (0, 1))
    assert len(convs) == 20   # resnet18 body: conv1, 8 basic blocks x 2, 3 downsample convs
    initial, after_stage1, final = (instrumented.initial, instrumented.after_epoch[1],
                                    instrumented.after_epoch[3])
    for k in convs:
        assert torch.equal(initial[k], after_stage1[k]), f"{k} moved while frozen"
        assert not torch.equal(after_stage1[k], final[k]), f"{k} did not train after unfreeze"
    # and the final model returned is the one reported on
    final_model = instrumented.result.model.state_dict()
    assert all(torch.equal(final_model[k], final[k]) for k in convs)


def test_report_is_called_once_per_epoch_with_global_epochs(instrumented):
    r = instrumented.result
    assert [e for e, _ in instrumented.reports] == [1, 2, 3]
    assert [a for _, a in instrumented.reports] == [e.val_accuracy for e in r.epochs]
    assert all(a is not None and 0.0 <= a <= 1.0 for _, a in instrumented.reports)
    assert [e.epoch for e in r.epochs] == [1, 2, 3]
    assert [e.stage for e in r.epochs] == [0, 1, 1]


# --- freezing ---------------------------------------------------------------------------

def _head_only_run(workspace, train_bn: bool):
    recipe = Recipe.from_dict(tiny_recipe_dict(
        model={"train_bn": train_bn},
        stages=[{"epochs": 1, "train": "head", "lr": {"max": 2e-3}, "pct_start": 0.99, "div": 25}]))
    snaps = {}
    real_build_model = train_mod.build_model

    def build_model(*args, **kwargs):
        model = real_build_model(*args, **kwargs)
        snaps["initial"] = _snapshot(model)
        return model

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_mod, "build_model", build_model)
        result = fine_tune(recipe, workspace=workspace)
    assert result.status == "ok"
    return result.model, snaps["initial"], result.model.state_dict()


def _bn_modules(model, groups):
    return [(f"{g}.{name}", m) for g in groups for name, m in model[g].named_modules()
            if isinstance(m, nn.BatchNorm2d)]


@pytest.mark.parametrize("train_bn", [True, False])
def test_head_only_stage_freezes_body_and_its_batchnorm_only_without_train_bn(workspace, train_bn):
    model, initial, final = _head_only_run(workspace, train_bn)
    convs = _conv_weights(model, (0, 1))
    assert convs
    for k in convs:
        assert torch.equal(initial[k], final[k]), f"frozen conv {k} changed"

    bns = _bn_modules(model, (0, 1))
    assert bns
    for prefix, _ in bns:
        for p in ("weight", "bias"):
            changed = not torch.equal(initial[f"{prefix}.{p}"], final[f"{prefix}.{p}"])
            assert changed == train_bn, f"{prefix}.{p} changed={changed} with train_bn={train_bn}"
        # train_bn: frozen groups' running statistics keep updating (train mode, as fastai's);
        # without it the frozen groups are truly frozen (eval mode, fastai's BnFreeze): fixed
        moved = not torch.equal(initial[f"{prefix}.running_mean"], final[f"{prefix}.running_mean"])
        assert moved == train_bn, f"{prefix}.running_mean moved={moved} with train_bn={train_bn}"
        assert int(final[f"{prefix}.num_batches_tracked"]) == (STEPS_PER_EPOCH if train_bn else 0)

    head_linears = [f"2.{n}.weight" for n, m in model[2].named_modules() if isinstance(m, nn.Linear)]
    assert head_linears
    for k in head_linears:
        assert not torch.equal(initial[k], final[k]), f"head {k} did not train"


# --- determinism ----------------------------------------------------------------------

def _fingerprint(result):
    return ([e.train_loss for e in result.epochs], [e.val_loss for e in result.epochs],
            [e.val_accuracy for e in result.epochs], result.test_accuracy)


def test_same_seed_is_bitwise_reproducible_and_another_seed_is_not(workspace):
    a = fine_tune(Recipe.from_dict(tiny_recipe_dict()), workspace=workspace)
    b = fine_tune(Recipe.from_dict(tiny_recipe_dict()), workspace=workspace)
    c = fine_tune(Recipe.from_dict(tiny_recipe_dict(seed=1)), workspace=workspace)
    assert a.ok and b.ok and c.ok
    assert _fingerprint(a) == _fingerprint(b)
    sa, sb, sc = a.model.state_dict(), b.model.state_dict(), c.model.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert [e.train_loss for e in a.epochs] != [e.train_loss for e in c.epochs]
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


# --- divergence -------------------------------------------------------------------------

class RecordingTracker:
    def __init__(self):
        self.steps: list[tuple[int, dict]] = []
        self.epochs: list[tuple[int, dict]] = []

    def log_steps(self, first_step, series):
        self.steps.append((first_step, {k: list(v) for k, v in series.items()}))

    def log_epoch(self, epoch, values):
        self.epochs.append((epoch, dict(values)))


def test_non_finite_loss_ends_the_run_as_diverged_without_raising(workspace):
    # lr 1e6 on every group: the train loss becomes NaN within the first epoch
    recipe = Recipe.from_dict(tiny_recipe_dict(stages=[{"epochs": 2, "train": "all", "lr": 1e6}]))
    tracker, reports = RecordingTracker(), []
    result = fine_tune(recipe, tracker, report=lambda e, a: reports.append(e), workspace=workspace)
    match = re.fullmatch(r"diverged at step (\d+)", result.status)
    assert match, result.status
    k = int(match.group(1))
    assert 0 <= k < STEPS_PER_EPOCH
    assert not result.ok
    assert result.test_accuracy is None
    assert result.epochs == [] and reports == []          # no epoch completed
    # the diverged epoch's curve was still logged, with the non-finite loss at step k
    assert len(tracker.steps) == 1
    first, series = tracker.steps[0]
    assert first == 0 and len(series["train/loss"]) == STEPS_PER_EPOCH
    assert all(math.isfinite(v) for v in series["train/loss"][:k])
    assert not math.isfinite(series["train/loss"][k])
    assert not any("test/accuracy" in values for _, values in tracker.epochs)


def test_lr_1e3_is_reported_as_diverged_not_raised(workspace):
    # lr 1e3 on every group: the train loss stays finite (~1e9) but the weights blow up,
    # and the validation loss after the first epoch is not finite
    recipe = Recipe.from_dict(tiny_recipe_dict(stages=[{"epochs": 2, "train": "all", "lr": 1e3}]))
    tracker = RecordingTracker()
    result = fine_tune(recipe, tracker, workspace=workspace)
    match = re.match(r"diverged at step (\d+)", result.status)
    assert match, result.status
    assert int(match.group(1)) < 2 * STEPS_PER_EPOCH
    assert not result.ok
    assert result.test_accuracy is None
    assert not any("test/accuracy" in values for _, values in tracker.epochs)
    # training stops at the end of the epoch in which it diverged
    k = int(match.group(1))
    assert len(result.lrs) == (k // STEPS_PER_EPOCH + 1) * STEPS_PER_EPOCH


# --- report callback, bad settings, devices ---------------------------------------------

class Prune(Exception):
    pass


def test_every_epoch_logs_the_val_scores_and_reports_the_studys_metric(workspace):
    """val/loss, accuracy, balanced accuracy and macro F1 every epoch; `report` gets the one
    named by `metric`; the test split's three scores and confusion matrix at the end; the
    last epoch's scores are the final model's on the val split."""
    from harness.engine.data import load_dataset
    from harness.engine.train import evaluate_split
    recipe = Recipe.from_dict(tiny_recipe_dict(data={"test_per_class": 20}))   # scoring 2,000 test images: most of the time
    tracker, reports = RecordingTracker(), []
    result = fine_tune(recipe, tracker, report=lambda e, v: reports.append(v), workspace=workspace,
                       metric="val/macro_f1")
    assert reports == [e.val_macro_f1 for e in result.epochs] and len(reports) == 3
    assert [result.val_metric(m) for m in ("val/accuracy", "val/balanced_accuracy", "val/loss")] == \
        [result.epochs[-1].val_accuracy, result.epochs[-1].val_balanced_accuracy, result.epochs[-1].val_loss]
    per_epoch = [values for _, values in tracker.epochs if "val/loss" in values]
    assert [set(v) for v in per_epoch] == [{"train/loss_epoch", "val/loss", "val/accuracy",
                                            "val/balanced_accuracy", "val/macro_f1"}] * 3
    assert [v["val/macro_f1"] for v in per_epoch] == reports
    ds = load_dataset(recipe.data, workspace, recipe.seed)
    final = evaluate_split(result.model, ds.val, 2 * recipe.data.batch_size, torch.device("cpu"))
    assert {f"val/{k}": v for k, v in final.metrics().items()} == {k: per_epoch[-1][k] for k in (
        "val/accuracy", "val/balanced_accuracy", "val/macro_f1")}
    test = result.test_score
    assert test.confusion.sum(1).tolist() == ds.test.y.bincount().tolist() and test.accuracy == result.test_accuracy
    assert tracker.epochs[-1][1] == {f"test/{k}": v for k, v in test.metrics().items()}


def test_exception_from_report_propagates_and_stops_training(workspace, monkeypatch):
    made = []
    real = train_mod.make_optimizer
    monkeypatch.setattr(train_mod, "make_optimizer", lambda *a, **k: made.append(1) or real(*a, **k))
    calls = []

    def report(epoch, acc):
        calls.append(epoch)
        raise Prune(f"pruned at {epoch}")

    with pytest.raises(Prune, match="pruned at 1"):
        fine_tune(Recipe.from_dict(tiny_recipe_dict()), report=report, workspace=workspace)
    assert calls == [1]
    assert len(made) == 1    # the second stage never started


def test_batch_size_larger_than_train_set_is_a_harness_error(workspace):
    recipe = Recipe.from_dict(tiny_recipe_dict(data={"batch_size": 64}))   # 48 train images
    with pytest.raises(HarnessError) as info:
        fine_tune(recipe, workspace=workspace)
    msg = str(info.value)
    assert "data.batch_size" in msg and "\n" not in msg


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
@pytest.mark.parametrize("where", ["recipe", "argument"])
def test_cuda_without_cuda_is_a_harness_error(workspace, where):
    from harness.engine.train import prepare
    with pytest.raises(HarnessError) as info:
        if where == "recipe":
            fine_tune(Recipe.from_dict(tiny_recipe_dict(device="cuda")), workspace=workspace)
        else:   # the override the LR finder passes down
            prepare(Recipe.from_dict(tiny_recipe_dict()), workspace, device="cuda")
    msg = str(info.value)
    assert "device" in msg and "\n" not in msg


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_tiny_recipe_trains_on_cuda(workspace):
    result = fine_tune(Recipe.from_dict(tiny_recipe_dict(device="cuda")), workspace=workspace)
    assert result.status == "ok"
    assert len(result.lrs) == 3 * STEPS_PER_EPOCH
    assert result.test_accuracy is not None and 0.0 <= result.test_accuracy <= 1.0
    assert next(result.model.parameters()).device.type == "cuda"


# --- out of memory ------------------------------------------------------------------------

def test_out_of_memory_in_a_step_is_a_failed_result_naming_the_batch_size(workspace, monkeypatch):
    real = torch.nn.functional.cross_entropy
    calls = []

    def cross_entropy(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:          # the third step: what the allocator raises on a GPU
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "cross_entropy", cross_entropy)
    tracker = RecordingTracker()
    result = fine_tune(Recipe.from_dict(tiny_recipe_dict()), tracker, workspace=workspace)
    assert result.status == "out of memory at batch size 8"
    assert not result.ok and result.test_accuracy is None
    assert len(result.lrs) == 3 and result.epochs == []


def test_other_runtime_errors_still_raise(workspace, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    monkeypatch.setattr(torch.nn.functional, "cross_entropy", boom)
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        fine_tune(Recipe.from_dict(tiny_recipe_dict()), workspace=workspace)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_real_cuda_out_of_memory_is_a_failed_result(workspace):
    # resnet50 at 512 px with 2048 images a batch needs far more than any GPU has
    total = torch.cuda.get_device_properties(0).total_memory
    d = tiny_recipe_dict(device="cuda", model={"arch": "resnet50"},
                         data={"image_size": 512, "batch_size": 2048, "train_per_class": 2048})
    result = fine_tune(Recipe.from_dict(d), workspace=workspace)
    assert result.status == "out of memory at batch size 2048", (result.status, total)
    assert torch.cuda.memory_allocated() < total // 4     # the memory was given back
