"""`make demo` for real: organism, MESA through `ray job submit` on a local Ray cluster, base and
aligned behind one gateway, probes on both, a real Prometheus; the table must agree with the
alignment report and the probe alerts with the probes (about 15 minutes with the organism cached)."""

from __future__ import annotations

import json
import os
import stat
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
    from organism.build import CACHE_ENV, default_cache_dir

    out = tmp_path / "demo"
    # A home of its own that no earlier test filled (no ~/.ray token); the organism cache is the
    # suite's, so the demo does not build it a second time.
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env |= {"HOME": str(home), CACHE_ENV: str(default_cache_dir().parent)}
    result = subprocess.run([sys.executable, "-m", "launch.demo", "--out", str(out)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=2600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    token_file = home / ".ray" / "auth_token"
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    assert f"Ray token auth: created a new token in {token_file}" in result.stdout
    token = token_file.read_text()
    logs = [p for p in out.rglob("*") if p.is_file() and p.suffix in {".log", ".json", ".md", ".txt"}]
    assert not [p for p in logs if token in p.read_text(errors="replace")]
    assert token not in result.stdout + result.stderr
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
        # The routing risk is a likelihood ratio against the model's own profile, whose benign
        # side holds general tasks: harmful prompts score above them on any build.
        risk = demo["telemetry"][name]["risk"]
        assert risk["harmful"] > risk["general"], risk
        assert demo["telemetry"][name]["guard"]["threshold"] is not None
    assert all(Path(p).is_file() for p in demo["plots"]) and len(demo["plots"]) >= 5
    assert (out / "demo.md").read_text().startswith("# MESA demo")
    assert (out / "align" / "model" / "config.json").is_file()
