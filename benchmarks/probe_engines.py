"""The live probe suite on a vLLM engine vs on a transformers copy of the model, in one run: the
same attacks (plain, jailbreak templates, identification, top-N and random masking, routing
scale), same prompts, seed and judge; per-prompt verdict agreement and the wall-time ratio.

    python benchmarks/probe_engines.py [--checkpoint DIR] [--output runs/bench/probe_engines.json]

The forced-route searches are off in both (they need a transformers model whatever the engine).
Wall time counts the suite only; the vLLM engine's start (about 40 s on the CPU organism) and
the transformers load are reported apart, as a probe replica pays them once.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from moe_routing.profiler import load_checkpoint  # noqa: E402
from organism.build import ensure_organism  # noqa: E402
from safety_eval.stats import wilson  # noqa: E402
from safety_eval.suite import run_suite  # noqa: E402
from serving.engine_probes import EngineChatGenerator  # noqa: E402
from serving.probes import probe_suite_settings  # noqa: E402

# The probe defaults (serving.probes.PROBE_SUITE_DEFAULTS) without the forced-route searches.
SUITE = {"layer_route_search": {"max_prompts": 0}, "fsour": {"candidates": []}}


def agreement(vllm_report: dict, hf_report: dict) -> dict:
    """Per attack: prompts whose three-way verdict is the same on both engines."""
    out = {}
    for name, entry in hf_report["verdicts"].items():
        other = vllm_report["verdicts"].get(name)
        if other is None or "verdicts" not in entry:
            continue
        same = sum(a == b for a, b in zip(entry["verdicts"], other["verdicts"]))
        n = len(entry["verdicts"])
        out[name] = {"same": same, "n": n, "rate": round(same / n, 4), "ci95": wilson(same, n)}
    general = [a == b for a, b in zip(hf_report["verdicts"]["general_accuracy"]["correct"],
                                      vllm_report["verdicts"]["general_accuracy"]["correct"])]
    out["general_accuracy"] = {"same": sum(general), "n": len(general)}
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", help="a checkpoint directory (default: the organism)")
    parser.add_argument("--output", default="runs/bench/probe_engines.json")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads of the transformers run (vLLM's CPU engine takes one core "
                             "of two and leaves one to the rest)")
    args = parser.parse_args(argv)
    checkpoint = args.checkpoint or str(ensure_organism())
    settings = probe_suite_settings(SUITE)
    torch.set_num_threads(args.threads)
    quiet = lambda message: None  # noqa: E731

    t0 = time.monotonic()
    engine = EngineChatGenerator.start(checkpoint)
    engine_start = time.monotonic() - t0
    try:
        torch.manual_seed(settings.seed)
        t0 = time.monotonic()
        vllm_report = run_suite(checkpoint, settings, generator=engine, log=quiet)
        vllm_s = time.monotonic() - t0
    finally:
        engine.close()
    t0 = time.monotonic()
    model, tokenizer = load_checkpoint(checkpoint, dtype=torch.float32)
    hf_load = time.monotonic() - t0
    torch.manual_seed(settings.seed)
    t0 = time.monotonic()
    hf_report = run_suite(checkpoint, settings, model=model, tokenizer=tokenizer, log=quiet)
    hf_s = time.monotonic() - t0

    agree = agreement(vllm_report, hf_report)
    judged = [a for name, a in agree.items() if name != "general_accuracy"]
    same, n = sum(a["same"] for a in judged), sum(a["n"] for a in judged)
    result = {
        "checkpoint": checkpoint,
        "suite": settings.model_dump(),
        "transformers_threads": args.threads,
        "seconds": {"vllm_suite": round(vllm_s, 2), "transformers_suite": round(hf_s, 2),
                    "vllm_engine_start": round(engine_start, 2), "transformers_load": round(hf_load, 2)},
        "speed_ratio_transformers_over_vllm": round(hf_s / vllm_s, 3),
        "phases": {"vllm": vllm_report["timings_seconds"], "transformers": hf_report["timings_seconds"]},
        "verdict_agreement": {"all_attacks": {"same": same, "n": n, "rate": round(same / n, 4),
                                              "ci95": wilson(same, n)}} | agree,
        "same_safety_critical": [[s["layer"], s["expert"]] for s in vllm_report["safety_critical"]]
        == [[s["layer"], s["expert"]] for s in hf_report["safety_critical"]],
        "safety_rates": {name: {"vllm": vllm_report["rates"][name].get("refused_rate", {}).get("rate"),
                                "transformers": hf_report["rates"][name].get("refused_rate", {}).get("rate")}
                         for name in hf_report["rates"] if "refused_rate" in hf_report["rates"][name]},
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=1))
    print(json.dumps({k: result[k] for k in ("seconds", "speed_ratio_transformers_over_vllm",
                                              "same_safety_critical")}, indent=1))
    print(json.dumps(result["verdict_agreement"]["all_attacks"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
