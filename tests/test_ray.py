"""`harness sweep --engine ray`: the workers as Ray tasks (harness/sweep/ray_engine.py).

The unit tests need no cluster. The slow ones start real Ray: a local one for the sweep
(Ctrl-C on the driver), and a two-node cluster on this machine (`ray start --head` plus a
second `ray start`, each with its own CPU) on PostgreSQL and an MLflow server, where one
node is killed mid-trial by its processes' PIDs."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from conftest import needs_fashion
from harness.cli import main
from harness.errors import HarnessError
from harness.sweep import ray_engine
from harness.sweep.ray_engine import Cluster, RayLaunch, node_store, refuse_local_stores, without_password
from services import NO_RAY_AUTH as NO_AUTH, RayNodes, free_port, processes_under
from test_workers import Proc, S, check_recovered, load, mlflow_runs, running_trial_of, tiny_study, wait_until

ray = pytest.importorskip("ray", reason="--engine ray needs the ray extra (installed by scripts/setup.sh)")


# --- no cluster ----------------------------------------------------------------------------------

def test_passwords_are_removed_from_what_a_task_receives_and_a_node_supplies_its_own(monkeypatch):
    url = "postgresql+psycopg://alice:s3cret@db.example:5432/optuna"
    bare = without_password(url)
    assert bare == "postgresql+psycopg://alice@db.example:5432/optuna" and "s3cret" not in bare
    assert without_password("http://bob:pw@mlflow:5000") == "http://bob@mlflow:5000"
    for unchanged in ("postgresql://alice@db/optuna", "/shared/optuna.journal", "http://mlflow:5000"):
        assert without_password(unchanged) == unchanged
    monkeypatch.setenv("HARNESS_STORAGE", url)
    assert node_store(bare, "HARNESS_STORAGE") == url                 # the node's own, with its password
    assert node_store("postgresql://alice@other/db", "HARNESS_STORAGE") == "postgresql://alice@other/db"
    monkeypatch.delenv("HARNESS_STORAGE")
    assert node_store(bare, "HARNESS_STORAGE") == bare                # libpq: PGPASSWORD or ~/.pgpass


def test_stores_on_this_machine_only_are_refused_for_other_nodes(tmp_path):
    where = "the Ray cluster at 10.0.0.5:6379"
    for storage, field in ((str(tmp_path / "optuna.journal"), "--storage: a journal on this machine's disk"),
                           (f"sqlite:///{tmp_path}/optuna.db", "--storage: an SQLite file"),
                           ("postgresql://u@db/x", "--tracking-uri")):
        with pytest.raises(HarnessError, match=field) as e:
            refuse_local_stores(storage, f"sqlite:///{tmp_path}/mlflow.db", where)
        assert where in str(e.value) and "\n" not in str(e.value)
    refuse_local_stores("postgresql://u@db/x", "http://mlflow:5000", where)   # both reachable: no error


def test_a_journal_on_a_network_filesystem_counts_as_shared(tmp_path, monkeypatch):
    mounts = tmp_path / "mounts"
    mounts.write_text(f"/dev/sda1 / ext4 rw 0 0\nnfs:/export {tmp_path}/shared nfs4 rw 0 0\n")
    real = Path.read_text
    monkeypatch.setattr(Path, "read_text", lambda p, *a, **k: real(mounts) if str(p) == "/proc/self/mounts"
                        else real(p, *a, **k))
    (tmp_path / "shared").mkdir()
    assert ray_engine.shared_filesystem(tmp_path / "shared" / "optuna.journal")
    assert not ray_engine.shared_filesystem(tmp_path / "optuna.journal")
    refuse_local_stores(str(tmp_path / "shared" / "optuna.journal"), "http://mlflow:5000", "x")


def test_workers_fit_the_nodes_and_a_worker_larger_than_any_node_is_refused():
    nodes = [{"Resources": {"CPU": 16.0, "GPU": 2.0}}, {"Resources": {"CPU": 4.0, "GPU": 1.0}},
             {"Resources": {"CPU": 8.0}}]
    c = Cluster(ray=None, nodes=nodes, started_here=False)
    assert c.capacity(gpus=1, cpus=1) == 3
    assert c.capacity(gpus=0.5, cpus=1) == 6          # fractions pack two workers per GPU
    assert c.capacity(gpus=0.5, cpus=4) == 4 + 1      # ...as far as the CPUs go
    assert c.capacity(gpus=0, cpus=2) == 8 + 2 + 4
    assert ray_engine.worker_size(c, RayLaunch(), "auto") == (1.0, 1.0)   # GPUs there: one each
    assert ray_engine.worker_size(c, RayLaunch(), "cpu") == (0.0, 1.0)    # the study runs on the CPU
    for launch, field in ((RayLaunch(gpus_per_trial=3), "--gpus-per-trial: 3 is more than any node"),
                          (RayLaunch(gpus_per_trial=1.5), "--gpus-per-trial: 1.5"),
                          (RayLaunch(cpus_per_trial=32), "--cpus-per-trial: 32 is more than any node")):
        with pytest.raises(HarnessError, match=field):
            ray_engine.worker_size(c, launch, "auto")


def test_without_ray_installed_the_engine_is_one_line_naming_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)     # import ray -> ImportError
    study = tiny_study(tmp_path / "study.yaml", "no-ray", trials=1)
    r = CliRunner().invoke(main, ["sweep", str(study), "--engine", "ray", "--workspace", str(tmp_path / "ws")])
    assert r.exit_code == 2, r.output
    assert r.stderr.strip() == ("error: --engine ray: Ray is not installed "
                                "(pip install 'finetune-harness[ray]', or the ray package)")
    assert not (tmp_path / "ws" / "optuna.journal").exists()


@pytest.mark.parametrize("args, line", [
    (["--address", "10.0.0.5:6379"], "error: --address: only with --engine ray"),
    (["--engine", "ray", "--workers-per-gpu", "2"], "error: --workers-per-gpu: only with --engine local"),
    (["--engine", "ray", "--gpus-per-trial", "-1"], "--gpus-per-trial"),
    (["--engine", "ray", "--cpus-per-trial", "0"], "--cpus-per-trial"),
    (["--engine", "ray", "--address", "10.0.0.5:6379"],
     "error: --storage: a journal on this machine's disk"),
    (["--engine", "ray", "--address", "no-port-here"], "error: --address: 'no-port-here' is not HOST:PORT"),
])
def test_ray_options_that_cannot_work_are_one_line_before_anything_is_written(tmp_path, args, line, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    study = tiny_study(tmp_path / "study.yaml", "bad-ray", trials=1)
    r = CliRunner().invoke(main, ["sweep", str(study), *args, "--workspace", str(tmp_path / "ws")])
    assert r.exit_code == 2, r.output
    assert len(r.stderr.strip().splitlines()) == 1 and line in r.stderr, r.stderr
    assert not any(p.name in ("optuna.journal", "mlflow.db") for p in (tmp_path / "ws").glob("*"))


# --- a real Ray ------------------------------------------------------------------------------------

@needs_fashion
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_an_unreachable_address_and_a_worker_larger_than_the_local_ray_are_one_line(tmp_path):
    """Through a real process (Ray prints to the real stderr): exit 2, one line, no store."""
    study = tiny_study(tmp_path / "study.yaml", "bad-ray-real", trials=1)
    ws = tmp_path / "ws"
    for args, line in ((["--address", f"127.0.0.1:{free_port()}"], "error: --address: no Ray cluster answers"),
                       (["--gpus-per-trial", "4"], "error: --gpus-per-trial: 4 is more than any node of the cluster")):
        r = subprocess.run([sys.executable, "-m", "harness", "sweep", str(study), "--engine", "ray", *args,
                            "--workspace", str(ws)], capture_output=True, text=True, timeout=300,
                           env={**os.environ, **NO_AUTH})
        assert r.returncode == 2, r.stdout + r.stderr
        assert r.stderr.strip().startswith(line) and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert not (ws / "optuna.journal").exists() and not (ws / "mlflow.db").exists()


@needs_fashion
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_ctrl_c_on_the_driver_cancels_the_ray_workers_and_leaves_nothing_running(tmp_path):
    """A local Ray for the sweep; Ctrl-C while a trial runs: exit 130, the trial queued again,
    every MLflow run closed (KILLED), and no Ray process of the sweep left behind."""
    study = tiny_study(tmp_path / "study.yaml", "ray-ctrl-c", trials=3)
    ws = tmp_path / "ws"
    spec = str(ws.resolve() / "optuna.journal")
    p = Proc(["sweep", study, "--engine", "ray", "--workspace", ws], tmp_path / "sweep.log", NO_AUTH)
    victim = wait_until(running_trial_of(spec, "ray-ctrl-c/naive"), 300, "a trial running in a Ray worker", p)
    os.killpg(p.p.pid, signal.SIGINT)
    assert p.wait(120) == 130, p.text
    assert "cancelling" in p.text and "Traceback" not in p.text, p.text
    trials = load(spec, "ray-ctrl-c/naive").get_trials()
    assert not [t for t in trials if t.state == S.RUNNING]
    assert trials[victim.number].state == S.FAIL and trials[victim.number].user_attrs.get("interrupted")
    assert [t for t in trials if t.user_attrs.get("retry_of") == victim.number and t.state == S.WAITING]
    runs = mlflow_runs(f"sqlite:///{ws.resolve()}/mlflow.db", "ray-ctrl-c")
    assert runs and all(r.info.status in ("KILLED", "FINISHED") for r in runs), \
        [(r.info.run_name, r.info.status) for r in runs]
    assert not processes_under(p.p.pid), "the sweep's local Ray outlived it"


# --- two nodes on this machine ------------------------------------------------------------------

@pytest.fixture
def two_nodes():
    with RayNodes(2, cpus=1) as cluster:
        yield cluster


def _sweep_on(cluster: RayNodes, study: Path, ws: Path, log: Path, pg: str, uri: str) -> Proc:
    return Proc(["sweep", study, "--engine", "ray", "--address", cluster.address, "--workspace", ws],
                log, {**NO_AUTH, "HARNESS_STORAGE": pg, "MLFLOW_TRACKING_URI": uri, "HARNESS_HEARTBEAT": "1"})


def _running_on(cluster: RayNodes, spec: str, name: str):
    """A trial running in a worker of the second node, after one trial is complete."""
    def find():
        t = running_trial_of(spec, name, after_complete=1)()
        if t is not None and int(t.user_attrs["worker"].rsplit(":", 2)[1]) in processes_under(cluster.raylet(1)):
            return t
        return None
    return find


@needs_fashion
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_two_ray_nodes_share_a_sweep_and_survive_losing_one(tmp_path, two_nodes, pg_url, mlflow_server):
    """A sweep across both nodes: exact counts, unique numbers, every child run FINISHED
    under its parent, both nodes used. Then a second sweep, whose second node is killed in
    a trial (its raylet and workers, by PID): the study still ends with its COMPLETE trials,
    the lost one failed as `lost: ...` and re-run, nothing RUNNING, the survivors intact."""
    password = "s3cret-pw-123"                  # trust auth: any password is accepted
    pg = pg_url.replace("postgres@", f"postgres:{password}@")
    tag = tmp_path.name[-10:]
    a = tiny_study(tmp_path / "a" / "study.yaml", f"ray-two-{tag}", trials=4)
    p = _sweep_on(two_nodes, a, tmp_path / "ws", tmp_path / "a.log", pg, mlflow_server)
    assert p.wait(600) == 0, p.text
    assert "starting 2 Ray worker(s) (0 GPU, 1 CPU each) on 2 node(s)" in p.text, p.text
    trials = load(pg, f"ray-two-{tag}/naive").get_trials()
    assert sorted(t.number for t in trials) == [0, 1, 2, 3] and all(t.state == S.COMPLETE for t in trials)
    assert len({t.user_attrs["worker"] for t in trials}) == 2          # both workers, one per node
    runs = mlflow_runs(mlflow_server, f"ray-two-{tag}")
    [parent] = [r for r in runs if r.data.tags.get("harness.kind") == "sweep"]
    kids = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert parent.info.status == "FINISHED" and len(kids) == 4 and all(r.info.status == "FINISHED" for r in kids)
    assert password not in p.text

    b = tiny_study(tmp_path / "b" / "study.yaml", f"ray-lose-{tag}", trials=4, epochs=3)
    name = f"ray-lose-{tag}"
    p = _sweep_on(two_nodes, b, tmp_path / "ws", tmp_path / "b.log", pg, mlflow_server)
    victim = wait_until(_running_on(two_nodes, pg, f"{name}/naive"), 300,
                        "a trial running on the second node after a complete one", p)
    completed = {t.number: t.value for t in load(pg, f"{name}/naive").get_trials() if t.state == S.COMPLETE}
    killed = two_nodes.kill_node(1)
    assert int(victim.user_attrs["worker"].rsplit(":", 2)[1]) in killed
    assert p.wait(600) == 0, p.text
    assert f"trial {victim.number} was lost (its worker stopped sending heartbeats); queued again" in p.text, p.text
    check_recovered(pg, mlflow_server, name, 4, victim, completed, "heartbeat")
    assert password not in p.text


# --- the fleet's manifest -----------------------------------------------------------------------

def test_the_kuberay_manifest_validates_and_its_postgres_holds_every_workers_connections():
    """docs/k8s/raycluster.yaml: the built-in kinds against Kubernetes' own schemas (strict);
    the RayCluster's worker group runs the same image as the head with the stores from the
    environment (a Secret for the password); PostgreSQL's max_connections holds every worker's
    connections plus the MLflow server's pools (docs/scale-out.md's arithmetic)."""
    from harness.sweep.connections import MLFLOW_SERVER, PER_WORKER
    from shipped import REPO
    kv = pytest.importorskip("kubernetes_validate")
    docs = list(yaml.safe_load_all((REPO / "docs" / "k8s" / "raycluster.yaml").read_text()))
    by_kind = {d["kind"]: d for d in docs}
    for d in docs:
        if d["apiVersion"] != "ray.io/v1":
            kv.validate(d, "1.37.0", strict=True)
    rc = by_kind["RayCluster"]["spec"]
    head = rc["headGroupSpec"]["template"]["spec"]["containers"][0]
    [group] = rc["workerGroupSpecs"]
    worker = group["template"]["spec"]["containers"][0]
    assert worker["image"] == head["image"] and worker["resources"]["limits"]["nvidia.com/gpu"] == 1
    env = {e["name"]: e for e in worker["env"]}
    assert "secretKeyRef" in env["HARNESS_STORAGE"]["valueFrom"]
    assert env["MLFLOW_TRACKING_URI"]["value"].startswith("http://")
    assert rc["rayVersion"] == ray.__version__                     # the driver's Ray, pinned in constraints
    pg = by_kind["StatefulSet"]["spec"]["template"]["spec"]["containers"][0]["args"]
    most = int(pg[pg.index("-c") + 1].split("=")[1]) if pg[pg.index("-c") + 1].startswith("max_connections") else 0
    mlflow = by_kind["Deployment"]["spec"]["template"]["spec"]["containers"][0]["command"]
    server_workers = int(mlflow[mlflow.index("--workers") + 1])
    assert most - 3 >= group["maxReplicas"] * PER_WORKER + server_workers * MLFLOW_SERVER
