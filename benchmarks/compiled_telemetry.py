"""Routing telemetry on vLLM's compiled engine vs on the eager engine, measured on the engine alone
(no gateway, no HTTP), in one run:

  compiled_telemetry   the compiled engine with the hooks installed before compilation
                       (`serving.routing_worker.configure_engine(args, compiled=True)`)
  eager_telemetry      the eager engine with the hooks (what the gateway ran before)
  compiled_plain       the compiled engine without hooks (what `vllm serve` runs)
  eager_plain          the eager engine without hooks

Each variant runs in a fresh process: engine start (compilation included) timed apart, one warm-up
batch, then `--prompts` greedy requests of exactly `--max-tokens` tokens each, generated together;
the variants alternate over `--rounds` rounds, each round starting one variant later. Reported per
variant: tokens per second (wall) and CPU-seconds per 1,000 generated tokens of the engine's
processes (this process, its engine core and worker), which other load on the machine moves less
than wall time. Telemetry variants also check their counts (every counted token hits top-k
experts in every layer, in both phases).

    python benchmarks/compiled_telemetry.py [--prompts 64 --max-tokens 128 --rounds 3] [--checkpoint DIR]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).parent))

VARIANTS = ("compiled_telemetry", "eager_telemetry", "compiled_plain", "eager_plain")
ENGINE = {"dtype": "float32", "gpu_memory_utilization": 0.1, "max_model_len": 1024, "max_num_seqs": 64,
          "seed": 0}


def _cpu_seconds() -> float:
    """CPU-seconds used so far by this process and its descendants (the engine core, the worker)."""
    me = psutil.Process()
    total = 0.0
    for process in [me, *me.children(recursive=True)]:
        try:
            times = process.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


def child(variant: str, checkpoint: str, prompts: int, max_tokens: int) -> dict:
    """One variant in this process: start, warm up, measure."""
    from gateway_load import PROMPTS
    from vllm import LLM, SamplingParams
    from vllm.engine.arg_utils import EngineArgs

    from serving.routing_worker import configure_engine, engine_environment

    compiled, telemetry = variant.startswith("compiled"), variant.endswith("telemetry")
    args = EngineArgs(model=checkpoint, enforce_eager=not compiled, **ENGINE)
    if telemetry:
        configure_engine(args, compiled=compiled)
    options = {k: getattr(args, k) for k in ("enforce_eager", "worker_cls", "worker_extension_cls")}
    t0 = time.monotonic()
    with engine_environment(compiled):
        llm = LLM(model=checkpoint, **ENGINE, **options)
    if telemetry:
        shape = llm.collective_rpc("routing_install")[0]
    start_s = time.monotonic() - t0
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    batch = [PROMPTS[i % len(PROMPTS)] for i in range(prompts)]
    messages = [[{"role": "user", "content": p}] for p in batch]
    llm.chat(messages[: min(8, prompts)], params, use_tqdm=False)  # warm-up
    before = llm.collective_rpc("routing_snapshot")[0] if telemetry else None
    cpu, t0 = _cpu_seconds(), time.monotonic()
    outputs = llm.chat(messages, params, use_tqdm=False)
    seconds, cpu = time.monotonic() - t0, _cpu_seconds() - cpu
    generated = sum(len(o.outputs[0].token_ids) for o in outputs)
    result = {"variant": variant, "start_s": round(start_s, 1), "seconds": round(seconds, 3),
              "generated_tokens": generated, "tokens_per_s": round(generated / seconds, 1),
              "cpu_s_per_1k_tokens": round(1000 * cpu / generated, 3)}
    if telemetry:
        after = llm.collective_rpc("routing_snapshot")[0]
        hits = np.asarray(after["hits"]) - np.asarray(before["hits"])
        tokens = np.asarray(after["tokens"]) - np.asarray(before["tokens"])
        per_layer = hits.sum(axis=2)  # [phase, layer]
        result["counted_tokens"] = tokens.tolist()
        result["counts_consistent"] = bool((per_layer == tokens[:, None] * shape["top_k"]).all()
                                           and tokens[1] > 0)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", help="a checkpoint directory (default: the organism)")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--output", type=Path, default=None, help="write the JSON report here")
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.checkpoint is None:
        from organism.build import ensure_organism

        args.checkpoint = str(ensure_organism())
    if args.child:
        print("RESULT " + json.dumps(child(args.child, args.checkpoint, args.prompts, args.max_tokens)))
        return 0
    runs: dict[str, list[dict]] = {name: [] for name in args.only}
    for round_index in range(args.rounds):
        shift = round_index % len(args.only)
        for name in args.only[shift:] + args.only[:shift]:
            command = [sys.executable, __file__, "--child", name, "--checkpoint", args.checkpoint,
                       "--prompts", str(args.prompts), "--max-tokens", str(args.max_tokens)]
            run = subprocess.run(command, capture_output=True, text=True, timeout=1800)
            lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
            if run.returncode != 0 or not lines:
                raise RuntimeError(f"{name} failed:\n{run.stderr[-3000:]}")
            runs[name].append(json.loads(lines[0].removeprefix("RESULT ")))
            r = runs[name][-1]
            print(f"[bench] round {round_index + 1} {name}: {r['tokens_per_s']} tok/s, "
                  f"{r['cpu_s_per_1k_tokens']} CPU-s/1k tok, start {r['start_s']} s"
                  + (f", counts consistent {r['counts_consistent']}" if "counts_consistent" in r else ""),
                  flush=True)

    def mean(name: str, key: str = "tokens_per_s") -> float | None:
        return float(np.mean([r[key] for r in runs[name]])) if name in runs else None

    def ratio(a: str, b: str, key: str = "tokens_per_s") -> float | None:
        return None if mean(a) is None or mean(b) is None else round(mean(a, key) / mean(b, key), 3)

    cpu = "cpu_s_per_1k_tokens"

    report = {
        "settings": {k: v for k, v in vars(args).items() if k not in ("child", "output")}
        | {"engine": ENGINE},
        "runs": runs,
        "tokens_per_s": {name: round(mean(name), 1) for name in runs},
        "cpu_s_per_1k_tokens": {name: round(mean(name, cpu), 3) for name in runs},
        "start_s": {name: round(float(np.mean([r["start_s"] for r in runs[name]])), 1) for name in runs},
        "compiled_vs_eager_with_telemetry": ratio("compiled_telemetry", "eager_telemetry"),
        "telemetry_on_vs_off_compiled": ratio("compiled_telemetry", "compiled_plain"),
        "telemetry_on_vs_off_eager": ratio("eager_telemetry", "eager_plain"),
        # CPU cost per token, the other way round (above 1: the first variant costs more).
        "cpu_cost_compiled_vs_eager_with_telemetry": ratio("compiled_telemetry", "eager_telemetry", cpu),
        "cpu_cost_telemetry_on_vs_off_compiled": ratio("compiled_telemetry", "compiled_plain", cpu),
        "cpu_cost_telemetry_on_vs_off_eager": ratio("eager_telemetry", "eager_plain", cpu),
        "counts_consistent": all(r["counts_consistent"] for rs in runs.values() for r in rs
                                 if "counts_consistent" in r),
    }
    print(json.dumps({k: v for k, v in report.items() if k not in ("runs", "settings")}, indent=1))
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
