"""bench/bench_step_overhead.py --quick: the harness trial and the bare loops over the same
batches give identical per-step losses (parity 0), every step's loss, LR and momentum is in
the MLflow store, and the ratio and per-step overhead are printed. Timing is not asserted
(a 10-step run on a shared CPU says nothing about it)."""
from __future__ import annotations

import json
import re
import runpy
import shutil
from pathlib import Path

from conftest import needs_fashion, template_store

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_step_overhead.py"


@needs_fashion
def test_quick_run_has_parity_0_and_prints_the_ratio(tmp_path, tmp_path_factory, workspace, capsys):
    db = tmp_path / "mlflow.db"
    shutil.copyfile(template_store(tmp_path_factory), db)
    out_json = tmp_path / "out.json"
    main = runpy.run_path(str(BENCH))["main"]   # bench/ is not a package
    rc = main(["--quick", "--workspace", str(workspace), "--tracking-uri", f"sqlite:///{db}",
                "--json", str(out_json)])
    out = capsys.readouterr().out
    assert rc == 0
    assert "parity (max abs diff of per-step losses, harness vs both bare loops, every round): 0.0" in out
    assert re.search(r"ratio harness/bare \(per step\): \d+\.\d{3}", out)
    assert re.search(r"overhead per step: -?\d+ us", out)
    report = json.loads(out_json.read_text())
    assert report["parity"] == 0.0 and report["steps"] == 10
    assert {side: len(rs) for side, rs in report["runs"].items()} == {"bare": 1, "bare+data": 1, "harness": 1}
