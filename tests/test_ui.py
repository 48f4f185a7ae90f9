"""The MLflow UI on a harness SQLite store: argv, start/stop, REST API, and a headless browser."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from harness.errors import HarnessError
from harness.ui import start_ui, stop_ui, ui_command

CHROMIUM = Path("/usr/bin/chromium")
needs_chromium = pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason="headless Chromium not installed (apt-get update && apt-get install -y chromium)")

STEPS = 10
SERIES = {
    "lr/early": [1e-5 * (i + 1) for i in range(STEPS)],
    "lr/late": [1e-4 * (i + 1) for i in range(STEPS)],
    "lr/head": [1e-3 * (i + 1) ** 0.5 for i in range(STEPS)],
}
CHILD_NAME = "ui-test-child"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(base: str, path: str, **params) -> dict:
    url = f"{base}{path}?{urllib.parse.urlencode(params)}"
    with urllib.request.urlopen(url, timeout=10) as r:
        assert r.status == 200, url
        return json.loads(r.read())


# --- fast: the argv -------------------------------------------------------------------------

def test_ui_command_defaults_and_overrides(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    argv = ui_command(uri)
    assert argv[:4] == [sys.executable, "-m", "mlflow", "server"]
    assert argv[argv.index("--backend-store-uri") + 1] == uri
    assert argv[argv.index("--host") + 1] == "127.0.0.1"      # loopback unless asked
    assert argv[argv.index("--port") + 1] == "5000"
    # artifacts of UI-created experiments land in the workspace, not ./mlartifacts
    assert "--serve-artifacts" in argv
    assert argv[argv.index("--artifacts-destination") + 1] == (tmp_path / "artifacts").resolve().as_uri()
    # the host-header / CORS middleware stays on
    assert "--disable-security-middleware" not in argv
    assert not any(a in argv for a in ("--allowed-hosts", "--cors-allowed-origins"))

    argv = ui_command(uri, host="0.0.0.0", port=5123)
    assert argv[argv.index("--host") + 1] == "0.0.0.0"
    assert argv[argv.index("--port") + 1] == "5123"

    pg = "postgresql://u@db/mlflow"
    argv = ui_command(pg)
    assert argv[argv.index("--backend-store-uri") + 1] == pg
    assert "--artifacts-destination" not in argv


def test_ui_command_rejects_a_server_uri_and_bad_port():
    with pytest.raises(HarnessError, match="already a tracking server"):
        ui_command("http://127.0.0.1:5000")
    with pytest.raises(HarnessError, match="--port"):
        ui_command("sqlite:///x.db", port=70000)


def test_start_ui_port_taken(tmp_path):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        with pytest.raises(HarnessError, match=f"port {port} .*taken") as e:
            start_ui(f"sqlite:///{tmp_path}/mlflow.db", port=port, wait_s=5)
        assert "\n" not in str(e.value)


def test_start_ui_missing_folder(tmp_path):
    with pytest.raises(HarnessError, match="does not exist"):
        start_ui(f"sqlite:///{tmp_path}/nope/mlflow.db", port=free_port(), wait_s=5)


def test_start_ui_server_that_dies_reports_its_output():
    with pytest.raises(HarnessError, match="exited with code") as e:
        start_ui("bogus-scheme://nowhere", port=free_port(), wait_s=60)
    assert "\n" not in str(e.value)


def _fake_server(tmp_path, code: str) -> subprocess.Popen:
    log = tmp_path / "fake-ui.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
    proc.log_path, proc.url = str(log), "http://127.0.0.1:1"
    return proc


def test_serve_ui_reports_a_server_that_dies(tmp_path, monkeypatch, capsys):
    import harness.ui as ui
    monkeypatch.setattr(ui, "start_ui", lambda *a, **k: _fake_server(
        tmp_path, "import sys; print('first'); print('boom: database is locked'); sys.exit(3)"))
    with pytest.raises(HarnessError, match=r"exited with code 3: first \| boom: database is locked"):
        ui.serve_ui("sqlite:///x.db", "127.0.0.1", 5000)
    assert "MLflow UI: http://127.0.0.1:1" in capsys.readouterr().out
    assert not (tmp_path / "fake-ui.log").exists()     # stop_ui cleaned up


def test_serve_ui_stops_the_server_on_ctrl_c(tmp_path, monkeypatch, capsys):
    import harness.ui as ui
    procs = []

    def fake_start(*a, **k):
        proc = _fake_server(tmp_path, "import time; time.sleep(60)")
        real_wait, calls = proc.wait, []

        def wait(timeout=None):
            calls.append(timeout)
            if len(calls) == 1:
                raise KeyboardInterrupt      # the user presses Ctrl-C while serving
            return real_wait(timeout)
        proc.wait = wait
        procs.append(proc)
        return proc

    monkeypatch.setattr(ui, "start_ui", fake_start)
    ui.serve_ui("sqlite:///x.db", "0.0.0.0", 5000)       # returns cleanly
    out = capsys.readouterr().out
    assert "stopping the MLflow UI" in out and "all interfaces" in out
    assert procs[0].poll() is not None                  # terminated, not orphaned
    import signal as _signal
    assert _signal.getsignal(_signal.SIGTERM) is not ui._interrupt   # handlers restored


# --- fast: the experiment URLs `harness ui` prints ------------------------------------------

BASE = "http://127.0.0.1:5999"


def test_experiment_url_forms():
    from harness.ui import experiment_url, experiments_url
    assert experiment_url(BASE, "3") == f"{BASE}/#/experiments/3?workflowType=machine_learning"
    assert experiments_url(BASE) == f"{BASE}/#/experiments?workflowType=machine_learning"


def test_experiment_links_on_a_real_store(tmp_path, tmp_path_factory):
    import shutil

    from conftest import template_store
    from harness.tracking import Tracking
    from harness.ui import experiment_links

    db = tmp_path / "mlflow.db"
    shutil.copyfile(template_store(tmp_path_factory), db)
    uri = f"sqlite:///{db}"
    # an empty store: the study is not there yet (one line, the root URL); no experiment at all
    assert experiment_links(uri, BASE, "quickstart", tmp_path) == [
        f"experiment quickstart: not in this store yet (`harness sweep` makes it); open {BASE}"]
    assert experiment_links(uri, BASE, None, tmp_path) == [
        f"no harness experiment in this store yet; experiments: {BASE}/#/experiments?workflowType=machine_learning"]

    tracking = Tracking(uri, tmp_path)
    a, b = tracking.experiment_id("study-a"), tracking.experiment_id("study-b")
    tracking.client.create_experiment("not-the-harness")
    assert experiment_links(uri, BASE, "study-b", tmp_path) == [
        f"experiment study-b: {BASE}/#/experiments/{b}?workflowType=machine_learning"]
    assert experiment_links(uri, BASE, None, tmp_path) == [
        f"experiment study-a: {BASE}/#/experiments/{a}?workflowType=machine_learning",
        f"experiment study-b: {BASE}/#/experiments/{b}?workflowType=machine_learning"]
    assert tracking.client.get_experiment_by_name("quickstart") is None   # nothing created


def test_experiment_links_create_no_store(tmp_path, monkeypatch):
    from harness.ui import experiment_links
    monkeypatch.chdir(tmp_path)
    assert experiment_links("sqlite:///x.db", BASE, "s")[0].startswith("experiment s: not in this store yet")
    assert experiment_links("sqlite:///x.db", BASE)[0].startswith("no harness experiment")
    assert not (tmp_path / "x.db").exists()
    line = experiment_links("bogus-scheme://nowhere", BASE)
    assert len(line) == 1 and line[0].startswith("experiments: cannot list them (")


def test_ui_command_takes_a_study_file(tmp_path, monkeypatch):
    from click.testing import CliRunner

    import harness.ui as ui
    from harness.cli import main
    calls = []
    monkeypatch.setattr(ui, "serve_ui", lambda *a, **k: calls.append((a, k)))
    root = Path(__file__).resolve().parent.parent
    r = CliRunner().invoke(main, ["ui", str(root / "studies/quickstart.yaml"), "--workspace", str(tmp_path),
                                  "--port", "5123"])
    assert r.exit_code == 0, r.output
    (args, kwargs), = calls
    assert args[1:] == ("127.0.0.1", 5123) and kwargs["study"] == "quickstart"
    assert kwargs["workspace"] == tmp_path

    r = CliRunner().invoke(main, ["ui", "--workspace", str(tmp_path)])
    assert r.exit_code == 0 and calls[-1][1]["study"] is None

    r = CliRunner().invoke(main, ["ui", str(tmp_path / "missing.yaml"), "--workspace", str(tmp_path)])
    assert r.exit_code == 2 and "missing.yaml: file not found" in r.output
    assert len(calls) == 2                                   # no server for a bad study file


def test_serve_ui_prints_the_study_experiment_url(tmp_path, monkeypatch, capsys):
    import harness.ui as ui
    monkeypatch.setattr(ui, "start_ui", lambda *a, **k: _fake_server(tmp_path, "import sys; sys.exit(0)"))
    monkeypatch.setattr(ui, "experiment_links", lambda uri, base, study, ws: [f"experiment {study}: {base}/#/x"])
    with pytest.raises(HarnessError, match="exited with code 0"):
        ui.serve_ui("sqlite:///x.db", "127.0.0.1", 5000, study="s")
    out = capsys.readouterr().out.splitlines()
    assert out[:2] == ["MLflow UI: http://127.0.0.1:1  (tracking store sqlite:///x.db; Ctrl-C to stop)",
                       "experiment s: http://127.0.0.1:5000/#/x"]


# --- slow: a real store, a real server ------------------------------------------------------

@pytest.fixture(scope="module")
def ui_store(tmp_path_factory):
    """A SQLite store with a parent run and a child run with per-step LR curves and a PNG,
    and the MLflow UI serving it on a free loopback port."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from harness.tracking import Tracking

    ws = tmp_path_factory.mktemp("ui-ws")
    uri = f"sqlite:///{ws}/mlflow.db"
    with Tracking(uri, ws).run("ui-test", "ui-test-parent") as parent:
        with Tracking(uri, ws).run("ui-test", CHILD_NAME, parent_id=parent.run_id) as child:
            child.log_steps(0, SERIES)
            fig, ax = plt.subplots(figsize=(4, 3))
            ax.plot(range(STEPS), SERIES["lr/head"])
            child.log_figure(fig, "lr_schedule.png")
            plt.close(fig)
            child.log_text("seed: 0\n", "recipe.yaml")
    exp_id = child.client.get_run(child.run_id).info.experiment_id

    port = free_port()
    proc = start_ui(uri, port=port, wait_s=120)
    try:
        yield {"base": f"http://127.0.0.1:{port}", "port": port, "exp_id": exp_id,
               "parent": parent.run_id, "child": child.run_id, "ws": ws, "proc": proc}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        stop_ui(proc)   # and the uvicorn child in its process group


@pytest.mark.slow
def test_ui_rest_api_serves_the_child_run(ui_store):
    base, child = ui_store["base"], ui_store["child"]

    hist = get_json(base, "/api/2.0/mlflow/metrics/get-history", run_id=child, metric_key="lr/head")
    points = sorted(hist["metrics"], key=lambda m: m["step"])
    assert [m["step"] for m in points] == list(range(STEPS))
    assert [m["value"] for m in points] == pytest.approx(SERIES["lr/head"], rel=1e-12)

    run = get_json(base, "/api/2.0/mlflow/runs/get", run_id=child)["run"]
    tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
    assert tags["mlflow.parentRunId"] == ui_store["parent"]
    assert run["info"]["run_name"] == CHILD_NAME
    assert {m["key"] for m in run["data"]["metrics"]} == set(SERIES)

    # the artifacts (under <workspace>/artifacts as file:// URIs) are served
    files = get_json(base, "/api/2.0/mlflow/artifacts/list", run_id=child)["files"]
    assert {f["path"] for f in files} == {"lr_schedule.png", "recipe.yaml"}
    with urllib.request.urlopen(f"{base}/get-artifact?run_id={child}&path=lr_schedule.png", timeout=10) as r:
        assert r.read(8) == b"\x89PNG\r\n\x1a\n"

    # both loopback names pass the host-header check; a foreign Host header does not
    for host in ("127.0.0.1", "localhost"):
        with urllib.request.urlopen(f"http://{host}:{ui_store['port']}/health", timeout=10) as r:
            assert r.status == 200
    req = urllib.request.Request(f"{base}/api/2.0/mlflow/runs/get?run_id={child}",
                                 headers={"Host": "evil.example.com"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=10)
    assert e.value.code in (400, 403)


def _chromium(tmp_path: Path, name: str, url: str, *mode: str) -> subprocess.CompletedProcess:
    profile = tmp_path / f"profile-{name}"
    profile.mkdir()
    argv = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
            "--no-first-run", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", f"--user-data-dir={profile}", "--window-size=1400,1000",
            # the metric charts only draw when every compositor stage runs under virtual time
            "--virtual-time-budget=20000", "--run-all-compositor-stages-before-draw",
            *mode, url]
    return subprocess.run(argv, capture_output=True, text=True, timeout=180)


@pytest.mark.slow
@needs_chromium
def test_ui_run_page_in_headless_chromium(ui_store, tmp_path):
    from PIL import Image

    # mlflow 3.x: hash routes; "model-metrics" is the run's chart tab, and workflowType picks
    # the "Model training" side of the UI (a fresh profile would otherwise open the GenAI one)
    url = (f"{ui_store['base']}/#/experiments/{ui_store['exp_id']}/runs/{ui_store['child']}"
           f"/model-metrics?workflowType=machine_learning")

    shot = tmp_path / "run-page.png"
    r = _chromium(tmp_path, "shot", url, f"--screenshot={shot}")
    assert r.returncode == 0, r.stderr[-2000:]
    assert shot.is_file(), r.stderr[-2000:]
    with Image.open(shot) as im:
        assert im.format == "PNG"
        assert im.size == (1400, 1000)
        colours = im.convert("RGB").getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 200, f"blank-looking screenshot ({len(colours or [])} colours)"

    r = _chromium(tmp_path, "dom", url, "--dump-dom")
    assert r.returncode == 0, r.stderr[-2000:]
    dom = r.stdout
    assert CHILD_NAME in dom
    for key in SERIES:                      # one chart per LR group, legend "<run> (<key>)"
        assert f"{CHILD_NAME} ({key})" in dom, key
    assert dom.count("scatterlayer") >= len(SERIES)   # plotly drew the curves


@pytest.mark.slow
@needs_chromium
def test_ui_printed_urls_open_the_model_training_view(ui_store, tmp_path):
    """The URLs `harness ui` prints, on a real server in headless Chromium: the study's
    experiment opens its runs table (MLflow 3's root URL would open the GenAI view, traces
    and no runs), and the list of experiments names the study."""
    from harness.ui import experiment_links
    uri = f"sqlite:///{ui_store['ws']}/mlflow.db"
    (line,) = experiment_links(uri, ui_store["base"], "ui-test", ui_store["ws"])
    url = line.split(": ", 1)[1]
    assert url == f"{ui_store['base']}/#/experiments/{ui_store['exp_id']}?workflowType=machine_learning"
    assert experiment_links(uri, ui_store["base"], None, ui_store["ws"]) == [line]

    exp = get_json(ui_store["base"], "/api/2.0/mlflow/experiments/get", experiment_id=ui_store["exp_id"])
    tags = {t["key"]: t["value"] for t in exp["experiment"]["tags"]}
    assert tags["mlflow.experimentKind"] == "custom_model_development"

    r = _chromium(tmp_path, "runs", url, "--dump-dom")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "ui-test-parent" in r.stdout and "Run Name" in r.stdout      # the runs table
    assert "Model training" in r.stdout

    r = _chromium(tmp_path, "list", f"{ui_store['base']}/#/experiments?workflowType=machine_learning", "--dump-dom")
    assert r.returncode == 0, r.stderr[-2000:]
    assert ">ui-test<" in r.stdout and "Model training" in r.stdout
