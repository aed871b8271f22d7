"""`maskworks demo` end to end: the embedded default trains, evaluates and reports."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
from PIL import Image


@pytest.mark.slow
def test_demo_reaches_target_and_writes_report(tmp_path):
    run = tmp_path / "demo"
    t0 = time.perf_counter()
    res = subprocess.run(
        [sys.executable, "-m", "maskworks.cli.main", "demo", "--run-dir", str(run)], capture_output=True, text=True
    )
    seconds = time.perf_counter() - t0
    assert res.returncode == 0, res.stderr[-3000:]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["miou"] >= 0.80, metrics["miou"]
    # about 1 min on 2 cores with native bfloat16 (AMX), 2.7 min in fp32 on 2 AMD EPYC cores; slack for a loaded CI
    assert seconds < 300, f"demo took {seconds:.0f} s"
    html = (run / "report.html").read_text()
    for name in ("training_curves.png", "confusion_matrix.png", "predictions/val_00.png"):
        assert (run / name).exists(), name
        assert name in html
        assert Image.open(run / name).size[0] > 100
    assert "circle" in html.lower() or "background" in html.lower()
    assert "validation mIoU" in res.stdout
