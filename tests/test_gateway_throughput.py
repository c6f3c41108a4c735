"""`benchmarks/gateway_throughput.py`'s request-by-request comparison at concurrency 1."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _bench():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("gateway_throughput", ROOT / "benchmarks" / "gateway_throughput.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(latencies, firsts=None):
    firsts = firsts or [None if t is None else t / 10 for t in latencies]
    return {"c1": {"each": [None if t is None else {"prompt": i, "latency_s": t, "first_chunk_s": f}
                            for i, (t, f) in enumerate(zip(latencies, firsts))]}}


def test_added_latency_is_the_median_of_paired_differences_not_of_two_p50s():
    added_latency = _bench().added_latency
    # Short and long answers; the variant adds 10 ms to short ones and 30 ms to long ones. Each
    # round's p50 falls in the cluster most of its answers are in, so the difference of p50s
    # says 30 ms in round 1 and 10 ms in round 2; over both, half the requests pay each.
    reference = [_run([0.04, 0.20, 0.04, 0.20, 0.20]), _run([0.04, 0.20, 0.04, 0.04, 0.20])]
    variant = [_run([0.05, 0.23, 0.05, 0.23, 0.23]), _run([0.05, 0.23, 0.05, 0.05, 0.23])]
    result = added_latency(variant, reference)
    # differences: 0.01, 0.03, 0.01, 0.03, 0.03 | 0.01, 0.03, 0.01, 0.01, 0.03 -> median 0.02
    assert result["median_s"] == pytest.approx(0.02)
    assert result["per_round_s"] == pytest.approx([0.03, 0.01])
    assert result["pairs"] == 10
    low, high = result["ci95_s"]
    assert 0.01 <= low <= result["median_s"] <= high <= 0.03
    first = added_latency(variant, reference, "first_chunk_s")
    assert first["median_s"] == pytest.approx(0.002)


def test_a_request_that_failed_on_either_side_is_left_out():
    added_latency = _bench().added_latency
    reference = [_run([0.10, None, 0.10, 0.10])]
    variant = [_run([0.15, 0.15, None, 0.12])]
    result = added_latency(variant, reference)
    assert result["pairs"] == 2 and result["median_s"] == pytest.approx(0.035)
    assert added_latency([_run([None, 0.1])], [_run([0.1, None])]) is None
