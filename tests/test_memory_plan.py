"""The memory plan (harness/engine/data/plan.py) and host-resident rows (rows.py): which
residency `auto` picks for faked free memory, the one-line refusals, and rows read from a
cache file exactly as the array holds them."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from harness.engine.data import plan as plan_mod
from harness.engine.data.host_rows import Prefetcher, HostRows
from harness.errors import HarnessError

GB = 10**9
CPU = torch.device("cpu")


@pytest.fixture
def free(monkeypatch):
    """Fake free memory and disk: set free["ram"] / free["disk"] in bytes."""
    sizes = {"ram": 8 * GB, "disk": 100 * GB}
    monkeypatch.setattr(plan_mod, "free_ram", lambda: sizes["ram"])
    monkeypatch.setattr(plan_mod, "free_disk", lambda folder: sizes["disk"])
    return sizes


def test_auto_keeps_images_on_the_device_when_they_fit_in_half_the_free_memory(free, tmp_path):
    p = plan_mod.plan_memory("auto", 3 * GB, CPU, tmp_path, cached=False, what="n images")
    assert (p.residency, p.requested, p.bytes_free, p.bytes_free_disk) == ("device", "auto", 8 * GB, 100 * GB)
    assert plan_mod.plan_memory("auto", 4 * GB, CPU, tmp_path, True, "n").residency == "device"   # exactly half


def test_auto_streams_from_the_host_when_the_images_would_crowd_the_device(free, tmp_path):
    p = plan_mod.plan_memory("auto", 4 * GB + 1, CPU, tmp_path, cached=True, what="n images")
    assert p.residency == "host" and p.bytes_free_disk is None   # cached: no disk needed
    assert p.params() == {"data.residency_used": "host", "data.bytes_needed": 4 * GB + 1, "data.bytes_free": 8 * GB}


def test_an_explicit_choice_is_kept_when_it_fits(free, tmp_path):
    assert plan_mod.plan_memory("host", 1, CPU, tmp_path, False, "n").residency == "host"
    assert plan_mod.plan_memory("device", 7 * GB, CPU, tmp_path, False, "n").residency == "device"


def test_device_that_cannot_fit_is_one_line_with_the_bytes(free, tmp_path):
    with pytest.raises(HarnessError) as e:
        plan_mod.plan_memory("device", 9 * GB, CPU, tmp_path, False, "50,000 images at 224 px")
    line = str(e.value)
    assert "\n" not in line and line.startswith("data.residency: device needs 9.00 GB")
    assert "50,000 images at 224 px" in line and "8.00 GB free in RAM" in line


def test_a_cache_that_cannot_fit_on_disk_is_refused_whatever_the_residency(free, tmp_path):
    free["disk"] = 2 * GB
    for requested in ("auto", "host", "device"):
        with pytest.raises(HarnessError, match=r"^data.residency: the decoded cache of n needs 3.00 GB of disk .* "
                                               r"2.00 GB free$"):
            plan_mod.plan_memory(requested, 3 * GB, CPU, tmp_path, cached=False, what="n")
    assert plan_mod.plan_memory("host", 3 * GB, CPU, tmp_path, cached=True, what="n").residency == "host"


def test_free_memory_and_disk_are_read_from_the_machine(tmp_path):
    assert plan_mod.free_ram() > 0
    assert plan_mod.free_disk(tmp_path / "not" / "yet") == plan_mod.free_disk(tmp_path) > 0


def _npy(tmp_path, n=40, shape=(3, 6, 5)):
    array = np.random.default_rng(0).integers(0, 256, (n, *shape), dtype=np.uint8)
    path = tmp_path / "x.npy"
    np.save(path, array)
    return path, torch.from_numpy(array)


def test_rows_read_from_the_file_equal_the_array_in_the_asked_order(tmp_path):
    path, x = _npy(tmp_path)
    store = HostRows.open(path)
    assert store.shape == tuple(x.shape) and len(store) == 40 and store.dtype == torch.uint8
    idx = torch.tensor([7, 3, 39, 0, 3])
    assert torch.equal(store[idx], x[idx])
    part = store.take(torch.tensor([30, 10, 20]))       # a lazy subset, then rows of it
    assert part.shape == (3, 3, 6, 5) and torch.equal(part[torch.tensor([2, 0])], x[torch.tensor([20, 30])])
    assert torch.equal(part.materialize(), x[torch.tensor([30, 10, 20])])
    assert torch.equal(store[5:8], x[5:8])


def test_the_prefetcher_reads_the_same_rows_on_its_thread(tmp_path):
    path, x = _npy(tmp_path)
    store = HostRows.open(path).take(torch.arange(20, 40))
    pre = Prefetcher(store, pin=False)
    try:
        futures = [pre.submit(torch.tensor([k, 19 - k])) for k in range(5)]
        for k, f in enumerate(futures):
            assert torch.equal(f.result(), x[torch.tensor([20 + k, 39 - k])])
    finally:
        pre.close()


def test_a_truncated_file_is_a_clear_error_not_garbage(tmp_path):
    path, _ = _npy(tmp_path)
    store = HostRows.open(path)
    path.write_bytes(path.read_bytes()[: store.offset + 10 * 90])
    assert torch.equal(store[torch.tensor([9])], store[torch.tensor([9])])
    with pytest.raises(OSError, match="short read at row 39"):
        store[torch.tensor([39])]


def test_only_uint8_image_arrays_open(tmp_path):
    np.save(tmp_path / "f.npy", np.zeros((2, 3, 4, 4), dtype=np.float32))
    with pytest.raises(ValueError, match="not a C-ordered uint8"):
        HostRows.open(tmp_path / "f.npy")


# --- the plan in a run: host == device bitwise, params, refusal before decoding -------------

def _same_run(a, b) -> bool:
    sa, sb = a.model.state_dict(), b.model.state_dict()
    return (all(torch.equal(sa[k], sb[k]) for k in sa) and a.lrs == b.lrs
            and [(e.train_loss, e.val_loss, e.val_accuracy) for e in a.epochs]
            == [(e.train_loss, e.val_loss, e.val_accuracy) for e in b.epochs] and a.test_accuracy == b.test_accuracy)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("augment", ["flip", "fastai"])
def test_host_residency_trains_bit_for_bit_as_device_residency(tmp_path, augment):
    """The same batches, read from the cache file a batch ahead instead of indexed in memory:
    the same weights, losses, accuracies (CPU)."""
    from conftest import tiny_recipe_dict
    from harness.engine.data.host_rows import HostRows
    from harness.engine.recipe import Recipe
    from harness.engine.train import fine_tune, prepare

    d = tiny_recipe_dict(data={"augment": augment, "test_per_class": 10})
    d["stages"] = d["stages"][1:]
    runs = {}
    for residency in ("device", "host"):
        recipe = Recipe.from_dict({**d, "data": {**d["data"], "residency": residency}})
        assert isinstance(prepare(recipe, tmp_path).train.x, HostRows) == (residency == "host")
        runs[residency] = fine_tune(recipe, workspace=tmp_path)
    assert runs["host"].ok and _same_run(runs["device"], runs["host"])


def test_a_run_records_its_plan_and_a_refused_one_writes_nothing(tmp_path, monkeypatch):
    """MLflow params name the residency used and the bytes; `device` that cannot fit is one
    line with the bytes, exit 2, before anything is decoded (no cache file)."""
    import yaml
    from click.testing import CliRunner
    from mlflow.tracking import MlflowClient

    from conftest import tiny_recipe_dict
    from harness.cli import main

    d = tiny_recipe_dict(data={"residency": "device"})
    d["stages"] = d["stages"][:1]
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(d))
    monkeypatch.setattr(plan_mod, "free_ram", lambda: 1000)   # 70,000 Fashion-MNIST images need 55 MB
    args = ["train", str(recipe), "--workspace", str(tmp_path / "ws"), "--tracking-uri", f"sqlite:///{tmp_path}/m.db"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 2 and res.stderr.splitlines() == [
        "error: data.residency: device needs 0.05 GB for 70,000 images at 28 px, 0.00 GB free in RAM "
        "(use host, or a smaller image_size)"]
    assert not (tmp_path / "ws" / "cache").exists() and not (tmp_path / "m.db").exists()

    monkeypatch.setattr(plan_mod, "free_ram", lambda: 10 * GB)
    d["data"]["residency"] = "auto"
    recipe.write_text(yaml.safe_dump(d))
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    client = MlflowClient(f"sqlite:///{tmp_path}/m.db")
    (run,) = client.search_runs([client.get_experiment_by_name("harness-train").experiment_id])
    params = run.data.params
    assert params["data.residency"] == "auto" and params["data.residency_used"] == "device"
    assert params["data.bytes_needed"] == str(70_000 * 28 * 28) and params["data.bytes_free"] == str(10 * GB)
