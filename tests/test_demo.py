"""`make demo` for real: organism, MESA through `ray job submit` on a local Ray cluster, base and
aligned behind one gateway, probes on both, a real Prometheus; the table must agree with the
alignment report and the probe alerts with the probes (about 15 minutes with the organism cached)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import require_binary

pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.vllm]
ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(2700)
def test_demo_runs_end_to_end_and_agrees_with_the_alignment_report(tmp_path):
    require_binary("prometheus")
    out = tmp_path / "demo"
    result = subprocess.run([sys.executable, "-m", "clients.demo", "--out", str(out)], cwd=ROOT,
                            capture_output=True, text=True, timeout=2600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    for step in ("1/5", "2/5", "3/5", "4/5", "5/5"):
        assert f"] {step} " in result.stdout
    assert "Job 'raysubmit_" in result.stdout + result.stderr and "succeeded" in result.stdout + result.stderr
    assert "Every probe number agrees with the alignment report." in result.stdout
    assert "Probe alerts fire exactly where a probe Safety Rate is below 0.5." in result.stdout
    demo = json.loads((out / "demo.json").read_text())
    assert demo["mismatches"] == [] and demo["alerts_match_probes"]
    for name in ("base", "aligned"):
        probes = demo["probes"][name]
        assert probes["prompts"]["harmful"] > 100
        low = {attack for attack, rate in probes["safety_rate"].items() if rate < 0.5}
        assert set(demo["firing"][name]) == low
    assert all(Path(p).is_file() for p in demo["plots"]) and len(demo["plots"]) >= 5
    assert (out / "demo.md").read_text().startswith("# MESA demo")
    assert (out / "align" / "model" / "config.json").is_file()
