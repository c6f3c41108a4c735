"""The routing guard's cost under load: `block` against `observe` on one running gateway.

`gateway_throughput.py` starts each variant afresh, so a ratio there carries two engine starts'
worth of machine state: on this 2-core machine its rounds differ by 15-30% and three rounds left
the guard's ratio within [0.57, 1.30]. Here one gateway serves throughout and the admin switches
the guard's policy between windows of the same load (`POST /admin/guard`; the policy is read per
request, so a window is exactly one policy's request path: under `observe` nothing waits for the
score, under `block` every request is judged after prefill, before its first token is sent). The
windows alternate in pairs, ABBA: the pair's order flips each time, so a drift within a pair and
the position in it hit both policies alike.

Per pair p, q_p = (tokens/s under block) / (tokens/s under observe); reported: the geometric
mean of q and its 95% t interval over the pairs (`gateway_throughput.round_ratio`), the pairs
themselves, and CPU-seconds per 1,000 generated tokens of each window (every process of the
machine but this load generator). Benign prompts only, so the guard judges every request and
blocks (almost) none, and both policies do the same engine work; blocks are counted.

    python benchmarks/guard_overhead.py [--pairs 10 --clients 32 --requests 10 --max-tokens 32]
        [--output runs/bench/guard_overhead.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from gateway_load import run_load  # noqa: E402
from gateway_throughput import BENIGN, ENGINE, KEY, _busy_cpu_seconds, round_ratio  # noqa: E402

from launch.processes import gateway_app, running_gateway  # noqa: E402

ADMIN_KEY = "bench-admin-key-0001"
POLICIES = ("observe", "block")


def pair_orders(pairs: int) -> list[tuple[str, str]]:
    """ABBA: observe first in even pairs, block first in odd ones."""
    return [POLICIES if p % 2 == 0 else POLICIES[::-1] for p in range(pairs)]


async def _window(url: str, policy: str, args) -> dict:
    async with httpx.AsyncClient(timeout=30) as client:
        answer = await client.post(url + "/admin/guard", json={"policy": policy},
                                   headers={"Authorization": f"Bearer {ADMIN_KEY}"})
        answer.raise_for_status()
        if answer.json()["policy"] != policy:
            raise RuntimeError(f"the guard did not switch to {policy}: {answer.text[:300]}")
    cpu = _busy_cpu_seconds()
    result = await run_load(url, KEY, clients=args.clients, requests_per_client=args.requests,
                            max_tokens=args.max_tokens, prompts=BENIGN)
    cpu = _busy_cpu_seconds() - cpu
    result["cpu_s_per_1k_tokens"] = round(1000 * cpu / max(result["completion_tokens"], 1), 3)
    result.pop("errors", None)
    return {"policy": policy} | result


async def measure(url: str, args) -> list[dict]:
    await run_load(url, KEY, clients=args.clients, requests_per_client=2, max_tokens=args.max_tokens,
                   prompts=BENIGN)  # warm-up
    windows = []
    for index, order in enumerate(pair_orders(args.pairs)):
        for policy in order:
            window = await _window(url, policy, args) | {"pair": index}
            windows.append(window)
            print(f"[guard] pair {index + 1} {policy}: {window['completion_tokens_per_s']} tok/s, "
                  f"{window['cpu_s_per_1k_tokens']} CPU-s/1k tok, failures {window['failures']}, "
                  f"blocked {window['blocked_by_guard']}", flush=True)
    return windows


def summarise(windows: list[dict], target: float = 0.97) -> dict:
    """The block/observe ratio over pairs, and where its interval lies against `target`."""
    by_policy = {policy: sorted((w for w in windows if w["policy"] == policy), key=lambda w: w["pair"])
                 for policy in POLICIES}
    ratio = round_ratio(by_policy["block"], by_policy["observe"])
    if ratio is not None and "ci95" in ratio:
        low, high = ratio["ci95"]
        ratio["against_target"] = ("above" if low >= target else "below" if high < target else "undecided")
    mean = lambda policy, key: round(float(np.mean([w[key] for w in by_policy[policy]])), 3)  # noqa: E731
    return {
        "block_vs_observe_throughput": ratio,
        "target": target,
        "tokens_per_s": {p: mean(p, "completion_tokens_per_s") for p in POLICIES},
        "cpu_s_per_1k_tokens": {p: mean(p, "cpu_s_per_1k_tokens") for p in POLICIES},
        "failures": sum(w["failures"] for w in windows),
        "blocked_by_guard": sum(w["blocked_by_guard"] for w in windows if w["policy"] == "block"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=10)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests", type=int, default=10, help="requests per client in each window")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--output", type=Path, default=None, help="write the JSON report here")
    args = parser.parse_args()
    if args.pairs < 2:
        parser.error("--pairs must be at least 2 (an interval needs two pairs)")
    engine = dict(ENGINE) | {"enforce_eager": True}  # as gateway_throughput's telemetry variants
    app = gateway_app(model="organism", engine=engine, telemetry={"enabled": True},
                      guard={"policy": "observe"})
    env = {"MESA_API_KEYS": KEY, "MESA_ADMIN_KEY": ADMIN_KEY}
    with running_gateway([app], env=env) as gateway:
        windows = asyncio.run(measure(gateway.url, args))
    report = {"settings": vars(args) | {"output": str(args.output)}, **summarise(windows), "windows": windows}
    print(json.dumps({k: v for k, v in report.items() if k != "windows"}, indent=1))
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
