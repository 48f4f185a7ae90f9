"""Every shipped study (studies/*.yaml), shrunk by tests/shipped.py, runs end to end through
the command line: pretrain (when its weights are a `harness pretrain` checkpoint), sweep,
status, export, train the export, compare. A new shipped study is covered automatically.

The studies run through the command line only (subprocesses, and click's CliRunner for the
quick checks); the quick checks also read the strategy records and load the shrunk data."""
from __future__ import annotations

import csv
import re
from pathlib import Path

import pytest
import yaml

from conftest import needs_fashion
from harness.sweep.strategies import STRATEGIES
from shipped import (BATCH, DEFAULT_GROUPS, DEFAULT_IMAGE_SIZE, DEFAULT_VAL_FRACTION, EPOCHS, IMAGE_SIZE,
                     MIN_VAL_FRACTION, OFFLINE_IMAGENET, PER_CLASS, SEEDS, STUDIES, TEST_PER_CLASS, TRIALS, base_recipe,
                     harness_session, read_yaml, shipped_studies, shrink, tiny_timm)

# End to end, every one is slow (over ~20 s) on the shared 2-core CPU, one torch thread. What
# made them slow was work no assertion needs: scoring Fashion-MNIST's whole test split (1,000
# images per class) in `train` and in every compare run, random-init ConvNeXt-Tiny, and one
# process start per command; the shrink now scores 20 test images per class, swaps hub-weight
# timm archs for timm's tiny test models, and the commands share one process.


def _marks(study: Path) -> list:
    marks = []
    if (base_recipe(study).get("data") or {}).get("dataset", "fashion-mnist") == "fashion-mnist":
        marks.append(needs_fashion)
    return marks


def studies() -> list:
    return [pytest.param(p, id=p.stem, marks=_marks(p)) for p in shipped_studies()]


def ok(proc, what: str) -> str:
    assert proc.returncode == 0, f"{what}: exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    assert "Traceback" not in proc.stderr, f"{what}:\n{proc.stderr[-5000:]}"
    return proc.stdout


def status_counts(stdout: str, strategies: list[str]) -> dict[str, dict[str, int]]:
    """`harness status` rows: strategy -> complete / pruned / failed / lost / running."""
    rows = {}
    for line in stdout.splitlines():
        tokens = line.split()
        if tokens and tokens[0] in strategies and len(tokens) >= 6 and all(t.isdigit() for t in tokens[1:6]):
            rows[tokens[0]] = dict(zip(("complete", "pruned", "failed", "lost", "running"), map(int, tokens[1:6])))
    return rows


# --- shrink itself: quick, no training ----------------------------------------------------

@pytest.mark.parametrize("study", studies())
def test_shrink_makes_a_tiny_valid_study(study, tmp_path, workspace):
    orig, orig_recipe = read_yaml(study), base_recipe(study)
    shrunk = shrink(study, tmp_path)
    d = read_yaml(shrunk.path)
    assert shrunk.path.parent == tmp_path and isinstance(d["recipe"], dict) and "stages" not in d["recipe"]
    assert d["trials"] == TRIALS and d["compare"]["seeds"] == SEEDS
    assert d["name"] == orig["name"] and d.get("pruner") == orig.get("pruner")
    assert list(d["strategies"]) == list(orig["strategies"])

    model, data = d["recipe"]["model"], d["recipe"]["data"]
    groups = orig_recipe.get("model", {}).get("groups", DEFAULT_GROUPS)
    epochs = max(EPOCHS, groups) if "gradual" in orig["strategies"] else EPOCHS
    assert d["budget"]["epochs"] == epochs
    for strategy, space in d["strategies"].items():
        for name in STRATEGIES[strategy].rules.epoch_splits:
            if name in (space or {}):
                spec = space[name]
                values = [spec["low"], spec["high"]] if isinstance(spec, dict) else [spec]
                assert all(1 <= v <= epochs - 1 for v in values), (name, spec)

    odata = orig_recipe.get("data", {})
    assert d["recipe"]["device"] == "cpu"
    assert data["train_per_class"] == PER_CLASS and data["batch_size"] == BATCH
    assert data["test_per_class"] == min(TEST_PER_CLASS, odata.get("test_per_class") or TEST_PER_CLASS)
    assert data["image_size"] == min(IMAGE_SIZE, odata.get("image_size", DEFAULT_IMAGE_SIZE))
    assert data["val_fraction"] == max(MIN_VAL_FRACTION, odata.get("val_fraction", DEFAULT_VAL_FRACTION))
    assert data.get("classes") == odata.get("classes")
    if data.get("dataset") == "imagefolder":
        root = Path(data["root"])
        assert root.is_absolute() and root.is_dir()
        folders = [f for f in root.iterdir() if f.is_dir()]
        assert len(folders) >= 2 and all(len(list(f.glob("*.png"))) >= 8 for f in folders)

    weights = orig_recipe.get("model", {}).get("weights", "none")
    arch = orig_recipe.get("model", {}).get("arch", "resnet18")
    if weights == "imagenet":
        assert model["weights"] == ("imagenet" if arch in OFFLINE_IMAGENET else "none")
        hub_timm = arch.startswith("timm/") and arch not in OFFLINE_IMAGENET
        assert model["arch"] == (tiny_timm(arch) if hub_timm else arch)
        if hub_timm:
            assert model["arch"].startswith("timm/test_")
        assert shrunk.pretrain == ()
    elif weights == "none":
        assert model["weights"] == "none" and shrunk.pretrain == ()
    else:   # a `harness pretrain` checkpoint: pretrained from its shrunk recipe first
        (step,) = shrunk.pretrain
        assert model["weights"] == str(step.checkpoint) and step.checkpoint.is_absolute()
        assert step.checkpoint.stem == Path(weights).stem == step.recipe.stem
        r = read_yaml(step.recipe)
        assert [s["epochs"] for s in r["stages"]] == [1]
        assert (r["data"]["train_per_class"], r["data"]["batch_size"], r["device"]) == (PER_CLASS, BATCH, "cpu")
        assert r["data"]["image_size"] <= IMAGE_SIZE

    # at least one full batch to train on (the last partial batch is dropped), pretraining included
    from harness.engine.data import load_dataset
    from harness.engine.recipe import DataConfig
    for what, r in [("study", d["recipe"]), *((str(s.recipe), read_yaml(s.recipe)) for s in shrunk.pretrain)]:
        n_train = len(load_dataset(DataConfig(**r["data"]), workspace, r.get("seed", 0)).train.y)
        assert n_train >= BATCH, (what, n_train, BATCH)

    # the harness accepts it: the study loads (ranges, budget, strategies checked) and has no trials
    from click.testing import CliRunner
    from harness.cli import main
    res = CliRunner().invoke(main, ["status", str(shrunk.path), "--workspace", str(tmp_path / "ws")])
    assert res.exit_code == 0, res.output
    assert f"{TRIALS} trials per strategy, {epochs} epochs each" in res.output
    counts = status_counts(res.output, list(d["strategies"]))
    assert set(counts) == set(d["strategies"]) and all(sum(c.values()) == 0 for c in counts.values())


def test_shrink_changes_merge_deep_but_replace_strategies(tmp_path):
    naive = {"naive": {"lr": {"low": 1e-4, "high": 1e-2, "log": True}}}
    shrunk = shrink(STUDIES / "pretrain-quickstart.yaml", tmp_path, trials=3, name="x", strategies=naive,
                    recipe={"model": {"arch": "resnet18", "weights": "none"}, "data": {"image_size": 16}},
                    compare={"seeds": 1})
    d = read_yaml(shrunk.path)
    assert d["trials"] == 3 and d["name"] == "x" and d["compare"] == {"seeds": 1}
    assert d["strategies"] == naive
    assert d["recipe"]["data"]["image_size"] == 16 and d["recipe"]["data"]["train_per_class"] == PER_CLASS
    assert d["recipe"]["data"]["classes"] == ["Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
    assert d["recipe"]["model"] == {"arch": "resnet18", "weights": "none", "head": "fastai"}
    assert shrunk.pretrain == ()    # weights no longer the checkpoint: nothing to pretrain
    # a second shrink into the same folder does not overwrite the first
    again = shrink(STUDIES / "pretrain-quickstart.yaml", tmp_path)
    assert again.path != shrunk.path and read_yaml(shrunk.path)["name"] == "x"
    assert len(again.pretrain) == 1


def test_shrunk_fixture_takes_a_stem_and_changes(shrunk):
    path = shrunk("quickstart", trials=1, budget={"epochs": 3})
    d = read_yaml(path)
    assert isinstance(path, Path) and path.is_file()
    assert d["name"] == "quickstart" and d["trials"] == 1 and d["budget"] == {"epochs": 3}
    assert d["recipe"]["model"]["weights"] == "imagenet"     # Lite0: offline weights kept


# --- end to end: every shipped study, shrunk, through the command line --------------------

# A study whose other strategies already run end to end in another shipped study runs only
# its own here (all of its spaces still load in test_shrink_makes_a_tiny_valid_study):
# methods' nine at 3 epochs (gradual's minimum) took 141 s, its three new ones at 2 take a third.
ONLY_ITS_OWN = {"methods": ("llrd", "surgical", "l2sp")}


def _end_to_end_changes(study: Path) -> dict:
    if study.stem not in ONLY_ITS_OWN:
        return {}
    own = read_yaml(study)["strategies"]
    return {"strategies": {s: own[s] for s in ONLY_ITS_OWN[study.stem]}, "budget": {"epochs": EPOCHS}}


@pytest.mark.slow
@pytest.mark.parametrize("study", studies())
def test_shipped_study_runs_end_to_end_shrunk(study, tmp_path):
    shrunk = shrink(study, tmp_path / "study", **_end_to_end_changes(study))
    d = read_yaml(shrunk.path)
    strategies, epochs, name = list(d["strategies"]), d["budget"]["epochs"], d["name"]
    ws, export = tmp_path / "workspace", tmp_path / "best.yaml"

    # one process for the whole sequence (imports paid once): the commands' own exit codes and
    # output are what is checked, not the process boundary (tests/test_cli.py checks that)
    pretrain = [["pretrain", step.recipe, "-o", step.checkpoint, "--workspace", ws] for step in shrunk.pretrain]
    commands = {"sweep": ["sweep", shrunk.path, "--workspace", ws],
                "status": ["status", shrunk.path, "--workspace", ws],
                "export": ["export", shrunk.path, "-o", export, "--workspace", ws],
                "train": ["train", export, "--workspace", ws],
                "compare": ["compare", shrunk.path, "--seeds", SEEDS, "--workspace", ws]}
    procs = harness_session(*pretrain, *commands.values())
    whats = [f"pretrain {step.recipe.name}" for step in shrunk.pretrain] + list(commands)
    for what, proc in zip(whats, procs):
        ok(proc, what)
    assert len(procs) == len(whats), [p.args for p in procs]
    out = dict(zip(whats[len(pretrain):], (p.stdout for p in procs[len(pretrain):])))

    for step, proc in zip(shrunk.pretrain, procs):
        assert re.search(rf"saved {re.escape(str(step.checkpoint))}: .*val accuracy [01]\.\d{{4}}", proc.stdout), \
            proc.stdout
        assert step.checkpoint.is_file()

    assert f"study {name}: {TRIALS} trials per strategy, {epochs} epochs each" in out["sweep"]
    # each step says what to run next, with the workspace it was given
    assert f"next: harness compare {shrunk.path} --workspace {ws}   # " in out["sweep"]
    assert f"next: harness train {export} --workspace {ws}   # " in out["export"]
    assert f"next: harness export {shrunk.path} --workspace {ws}   # " in out["compare"]

    counts = status_counts(out["status"], strategies)
    assert set(counts) == set(strategies), out["status"]
    for strategy, c in counts.items():
        assert c["complete"] + c["pruned"] + c["failed"] == TRIALS, (strategy, out["status"])
        assert c["complete"] >= 1 and c["lost"] == c["running"] == 0, (strategy, out["status"])

    assert out["export"].startswith(f"wrote {export}: ") and export.is_file()
    recipe = yaml.safe_load(export.read_text())
    assert "strategies" not in recipe and sum(s["epochs"] for s in recipe["stages"]) == epochs
    assert recipe["model"]["weights"] == d["recipe"]["model"]["weights"]
    assert recipe["data"]["train_per_class"] == PER_CLASS

    m = re.search(r"status: ok\s+test accuracy: ([01]\.\d{4})", out["train"])
    assert m and 0.0 <= float(m.group(1)) <= 1.0, out["train"]

    table = ws / "reports" / name / "compare.csv"
    assert f"saved {table.parent}/compare.csv" in out["compare"] and table.is_file()
    with open(table) as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["strategy"] for r in rows) == sorted(strategies)
    shifts = [f"{c}-{sev[0]}_mean" for c, sev in (d["compare"].get("corruptions") or {}).items()]
    assert out["compare"].count("(the sweep's own model)") == len(strategies), out["compare"]   # seed 0: the kept models
    for r in rows:
        assert int(r["seeds"]) == SEEDS and 0.0 <= float(r["test_accuracy_mean"]) <= 1.0
        assert all(0.0 <= float(r[col]) <= 1.0 for col in shifts), (shifts, r)
