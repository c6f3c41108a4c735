"""The GPU check: the gateway on a model with a real MoE's layer shapes, in one run, as JSON.

    python benchmarks/gpu_check.py [--output runs/bench/gpu_check.json]     # GPU form (official vLLM)
    python benchmarks/gpu_check.py --smoke [--output ...]                   # CPU form (the test suite)

No network: the model is a random-initialised Qwen3-MoE with Qwen3-30B-A3B's layer shapes (hidden
2048, 128 experts, top-8, moe_intermediate_size 768, 32 query / 4 KV heads of 128) at reduced
depth (`--layers`, 4), written with a byte-level tokenizer and its routing manifest to a
temporary directory (`moe_routing.tiny`). Then, each part timed and kept apart (one failing part
does not lose the others' figures):

  1. throughput through the gateway with routing telemetry on vs off (`gateway_throughput`'s
     variants and load), both on vLLM's compiled engine (`telemetry.compiled`); the telemetry-on
     gateway's counts are checked after the load: per phase and layer, hits = tokens x top-k
  2. the gateway vs vLLM's own OpenAI server (`vllm serve`'s server) on the same engine options
  3. on vLLM probe engines: the default probe suite's time (without the forced-route searches),
     and the same greedy requests' per-request routing counts on the eager vs the compiled engine
  4. a 2-GPU data-parallel alignment step (`alignment/run.py`, 2 training steps), only where two
     GPUs are present; skipped otherwise, saying why
  5. the alignment job's evaluation as GPU training has it (`alignment.run.evaluate_checkpoint`:
     a Ray task holding one GPU, the model in its own dtype), on a cut-down suite with the refusal
     ablation and one layer route search, so the suite's hooks run on CUDA tensors; GPU form only

The CPU form (`--smoke`: tiny shapes, a handful of requests, a cut-down suite, eager engines since
a compilation costs ~40 s per engine start here; `tests/test_compiled_telemetry.py` covers the
compiled engine) runs every part's code so the GPU form does not rot. Exit code 1 if any part
failed or a check did not hold.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field, replace
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).parent))
import gateway_throughput as throughput  # noqa: E402

ADMIN_KEY = "bench-admin-key-0001"
# Qwen3-30B-A3B's decoder layer (its config.json), every layer sparse; depth comes from --layers.
# Context 8192 (the real model's is 40960): with a byte-level tokenizer the probe suite's longest
# jailbreak template (4.5 KB) is 4.5k tokens, and the probe engine takes the model's full context.
QWEN3_30B_A3B_LAYER = dict(hidden_size=2048, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                           num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768,
                           intermediate_size=6144, norm_topk_prob=True, mlp_only_layers=[],
                           max_position_embeddings=8192, rms_norm_eps=1e-6)
# The CPU form: tiny, with head_dim 64 (vLLM's CPU attention has no head_dim 16 kernel).
TINY_LAYER = dict(hidden_size=64, num_attention_heads=2, num_key_value_heads=1, head_dim=64, num_experts=8,
                  num_experts_per_tok=2, moe_intermediate_size=32, intermediate_size=96, mlp_only_layers=[],
                  max_position_embeddings=4096)
# The probe suite of `benchmarks/probe_engines.py`: the default probes without the forced-route
# searches, which need a transformers copy whatever the engine.
PROBE_SUITE = {"layer_route_search": {"max_prompts": 0}, "fsour": {"candidates": []}}


@dataclass(frozen=True)
class Form:
    name: str
    layer: dict
    layers: int
    dtype: str
    build_device: str
    compiled: bool  # engines compiled (torch.compile + CUDA graphs) or eager
    engine: dict  # `vllm serve` options of the gateways and of `vllm serve`
    probe_engine: dict
    load: dict  # gateway_throughput's load: clients, requests, max_tokens, c1_requests
    suite: dict
    telemetry: dict = field(default_factory=dict)
    guard: dict = field(default_factory=dict)
    agreement_prompts: int = 32  # requests compared between the eager and the compiled engine
    app: dict = field(default_factory=dict)  # the gateway's top-level config (resources)


GPU = Form(
    name="gpu", layer=QWEN3_30B_A3B_LAYER, layers=4, dtype="bfloat16", build_device="cuda", compiled=True,
    engine={"dtype": "bfloat16", "max_model_len": 4096, "gpu_memory_utilization": 0.8, "max_num_seqs": 64,
            "seed": 0},
    probe_engine={"dtype": "bfloat16", "gpu_memory_utilization": 0.5},
    load={"clients": 32, "requests": 8, "max_tokens": 64, "c1_requests": 20},
    suite=PROBE_SUITE,
    # A short routing profile and guard calibration at start: the risk score runs per request as
    # in production, without minutes of start-up profiling.
    telemetry={"baseline_prompts": 32}, guard={"calibration_prompts": 64},
    app={"num_gpus": 1, "num_cpus": 4},  # as deploy/serve-qwen3-30b-a3b.yaml
)
SMOKE = Form(
    name="cpu-smoke", layer=TINY_LAYER, layers=2, dtype="float32", build_device="cpu", compiled=False,
    engine={"dtype": "float32", "max_model_len": 1024, "gpu_memory_utilization": 0.1, "max_num_seqs": 16,
            "seed": 0},
    probe_engine={"dtype": "float32", "gpu_memory_utilization": 0.1},
    load={"clients": 2, "requests": 2, "max_tokens": 8, "c1_requests": 2},
    suite=PROBE_SUITE | {"limit": 3, "mask_counts": [2], "headline_mask": 2, "random_seeds": [0, 1, 2],
                         "scale_factors": [0.5], "identification_prompts": 8, "n_bootstrap": 0,
                         "max_new_tokens": 4, "jailbreak": False},
    telemetry={"baseline_prompts": 8}, guard={"calibration_prompts": 8}, agreement_prompts=8,
)


def build_model(form: Form, directory: Path) -> dict:
    """A random Qwen3-MoE of the form's shapes, its byte-level tokenizer and routing manifest."""
    import torch
    from transformers import AutoConfig

    from moe_routing.tiny import save_tiny_checkpoint

    t0 = time.monotonic()
    save_tiny_checkpoint("qwen3_moe", directory, manifest=True, dtype=getattr(torch, form.dtype),
                         device=form.build_device, num_hidden_layers=form.layers, **form.layer)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the engines start in other processes
    config = AutoConfig.from_pretrained(directory)  # its attribute names (num_experts is an alias)
    return {"path": str(directory), "build_s": round(time.monotonic() - t0, 1),
            "num_hidden_layers": config.num_hidden_layers,
            "shapes": {k: getattr(config, k) for k in form.layer},
            "weights_bytes": sum(f.stat().st_size for f in directory.glob("*.safetensors"))}


def routing_check(url: str) -> dict:
    """The gateway's cumulative counts after the load: every counted token hits top-k experts in
    every MoE layer, in both phases, and some of each phase were counted."""
    time.sleep(2.5)  # past one poll_interval_s (1 s): the last step's counts reach the replica
    routing = httpx.get(url + "/v1/routing", headers={"Authorization": f"Bearer {throughput.KEY}"},
                        timeout=30).json()
    config = httpx.get(url + "/admin/config", headers={"Authorization": f"Bearer {ADMIN_KEY}"},
                       timeout=30).json()
    out = {"integrity": config["integrity"].get("status"),
           "telemetry_compiled": config["config"]["telemetry"]["compiled"]}
    for phase in ("prompt", "generated"):
        total = routing["total"][phase]
        per_layer = np.asarray(total["hits"]).sum(axis=1)
        consistent = total["tokens"] > 0 and (per_layer == total["tokens"] * routing["top_k"]).all()
        out[phase] = {"tokens": total["tokens"], "consistent": bool(consistent)}
    out["ok"] = out["prompt"]["consistent"] and out["generated"]["consistent"] and out["integrity"] == "ok"
    return out


def throughput_parts(form: Form, model: str, rounds: int) -> dict:
    """Telemetry on vs off through the gateway, and the gateway vs `vllm serve`, alternating over
    the rounds as `gateway_throughput` does."""
    args = argparse.Namespace(**form.load)
    common = dict(model=model, engine=form.engine, compiled=form.compiled, telemetry_options=form.telemetry,
                  guard_options=form.guard, app_options=form.app, env={"MESA_ADMIN_KEY": ADMIN_KEY})
    serve_engine = form.engine | {"enforce_eager": not form.compiled}
    variants = {
        "gateway_telemetry_on": lambda: throughput.gateway_variant(args, inspect=routing_check, **common),
        "gateway_telemetry_off": lambda: throughput.gateway_variant(args, telemetry=False, **common),
        "vllm_serve": lambda: throughput.vllm_serve_variant(args, model=model, engine=serve_engine),
    }
    runs: dict[str, list] = {name: [] for name in variants}
    order = list(variants)
    for round_index in range(rounds):
        shift = round_index % len(order)
        for name in order[shift:] + order[:shift]:
            runs[name].append(variants[name]())
            print(f"[gpu-check] round {round_index + 1} {name}: "
                  f"{runs[name][-1]['completion_tokens_per_s']} tok/s", flush=True)

    def mean(name: str, key: str) -> float:
        return float(np.mean([r[key] for r in runs[name]]))

    on, off, bare = "gateway_telemetry_on", "gateway_telemetry_off", "vllm_serve"
    tokens = "completion_tokens_per_s"
    checks = [r["inspect"] for r in runs[on]]
    return {
        "engine": "compiled" if form.compiled else "eager",
        "tokens_per_s": {name: round(mean(name, tokens), 1) for name in runs},
        "telemetry_on_vs_off_throughput": round(mean(on, tokens) / mean(off, tokens), 3),
        "gateway_vs_vllm_serve_throughput": round(mean(on, tokens) / mean(bare, tokens), 3),
        "gateway_added_latency_at_concurrency_1": throughput.added_latency(runs[on], runs[bare]),
        "failures": sum(r["failures"] for rs in runs.values() for r in rs),
        "telemetry_check": checks[-1],
        "ok": all(check["ok"] for check in checks) and not any(r["failures"] for r in sum(runs.values(), [])),
        "runs": runs,
    }


def _routed(engine, prompts: list[str], new_tokens: int) -> dict:
    """Greedy answers and each request's routing counts on one engine, with the counts' sums
    checked: every prompt token (no prefix cache on a probe engine) and every generated token fed
    back hits top-k experts in every layer."""
    k = engine.shape.top_k
    routed = engine.routed_generate(prompts, max_new_tokens=new_tokens)
    consistent = all(
        (np.asarray(counts["prompt"]).sum(axis=1) == len(engine._prompt_ids(prompt, new_tokens)) * k).all()
        and (np.asarray(counts["generated"]).sum(axis=1) == (len(ids) - 1) * k).all()
        for prompt, (ids, counts) in zip(prompts, routed))
    return {"answers": [ids for ids, _ in routed], "counts": [c for _, c in routed], "consistent": consistent}


def engines_part(form: Form, model: str) -> dict:
    """On vLLM probe engines: the probe suite's time on the eager engine (as `serving.probes`
    runs it), then the same greedy requests' per-request routing counts on the eager and on the
    compiled engine (`serving.routing_worker.configure_engine`), compared request by request.
    The counts must add up on both; equality is reported, not required (bf16 kernels of the two
    engines may break a near-tie differently, and one changed token changes what follows).
    The CPU form compares the eager engine with itself (compiled CPU engines:
    tests/test_compiled_telemetry.py): the code runs, the figures mean nothing."""
    from safety_eval.harness import EvalSets
    from safety_eval.suite import run_suite
    from serving.engine_probes import EngineChatGenerator
    from serving.probes import probe_suite_settings

    settings = probe_suite_settings(form.suite)
    sets = EvalSets.for_checkpoint(model, seed=0)
    prompts = sets.harmful[: form.agreement_prompts // 2] + sets.benign[: form.agreement_prompts // 2]
    t0 = time.monotonic()
    engine = EngineChatGenerator.start(model, engine_options=form.probe_engine)
    start_s = time.monotonic() - t0
    try:
        t0 = time.monotonic()
        report = run_suite(model, settings, generator=engine, log=lambda message: None)
        suite_s = time.monotonic() - t0
        eager = _routed(engine, prompts, new_tokens=16)
    finally:
        engine.close()
    t0 = time.monotonic()
    engine = EngineChatGenerator.start(model, engine_options=form.probe_engine, compiled=form.compiled)
    compiled_start_s = time.monotonic() - t0
    try:
        compiled = _routed(engine, prompts, new_tokens=16)
    finally:
        engine.close()
    n = len(prompts)
    same = lambda key, phase=None: round(sum(  # noqa: E731
        (a[phase] == b[phase]) if phase else (a == b) for a, b in zip(eager[key], compiled[key])) / n, 3)
    agreement = {
        "other_engine": "compiled" if form.compiled else "eager (CPU form)",
        "requests": n, "other_engine_start_s": round(compiled_start_s, 1),
        "same_answers": same("answers"), "same_prompt_counts": same("counts", "prompt"),
        "same_generated_counts": same("counts", "generated"),
        "counts_consistent": {"eager": eager["consistent"], "other": compiled["consistent"]},
    }
    return {"probe_suite": {"engine_start_s": round(start_s, 1), "suite_s": round(suite_s, 1),
                            "engine": report["engine"], "phases_s": report["timings_seconds"]},
            "compiled_vs_eager": agreement,
            "ok": report["engine"] == "vllm" and eager["consistent"] and compiled["consistent"]}


def alignment_config(model: str, output_dir: str, workers: int, use_gpu: bool = True,
                     sharding: str = "none") -> dict:
    """An alignment job of two data-parallel training steps on `workers` workers (one GPU each),
    each holding the whole model (sharding none, DDP) or 1/workers of its frozen weights (fsdp)."""
    return {
        "model": model, "output_dir": output_dir, "seed": 0,
        "data": {"statistics_prompts": 8, "max_examples": 32},
        "profile": {"batch_size": 4, "max_length": 64, "num_workers": workers},
        "training": {"steps": 2, "batch_size": 2 * workers, "warmup_steps": 0, "max_length": 128,
                     "checkpoint_every": 2, "num_workers": workers, "use_gpu": use_gpu,
                     "dtype": "bfloat16" if use_gpu else "float32", "sharding": sharding},
        "evaluation": {"enabled": False},
    }


def alignment_part(model: str, workdir: Path, timeout_s: float) -> dict:
    import torch

    gpus = torch.cuda.device_count()
    if gpus < 2:
        return {"skipped": f"needs 2 GPUs, found {gpus}", "ok": True}
    import yaml

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a local Ray instance of its own
    deadline, result = time.monotonic() + timeout_s, {"workers": 2}
    for sharding in ("none", "fsdp"):
        config = workdir / f"alignment-{sharding}.yaml"
        settings = alignment_config(model, str(workdir / f"align-{sharding}"), workers=2, sharding=sharding)
        config.write_text(yaml.safe_dump(settings))
        t0 = time.monotonic()
        try:
            run = subprocess.run([sys.executable, str(ROOT / "alignment" / "run.py"), "--config",
                                  str(config)], capture_output=True, text=True,
                                 timeout=max(1.0, deadline - t0), env=env, cwd=ROOT)
        except subprocess.TimeoutExpired:
            result[sharding] = {"ok": False, "error": "timed out (--budget-s)"}
            continue
        memory = [line for line in run.stdout.splitlines() if "[align] memory:" in line]
        result[sharding] = {"ok": run.returncode == 0, "returncode": run.returncode,
                            "seconds": round(time.monotonic() - t0, 1), "memory_estimate": memory[-1:],
                            "log_tail": (run.stdout + run.stderr)[-2000:]}
    result["ok"] = all(result[s]["ok"] for s in ("none", "fsdp"))
    return result


def evaluation_part(form: Form, model: str, workdir: Path) -> dict:
    """The job's evaluation with GPU training (a Ray task holding one GPU) on a cut-down suite."""
    if form.build_device != "cuda":
        return {"skipped": "GPU form only (the ray tests run the same task on a logical GPU)", "ok": True}
    import ray

    from alignment.config import AlignmentConfig
    from alignment.run import check_evaluation_layout, evaluate_checkpoint
    from moe_routing.ray_cluster import init_ray

    suite = form.suite | {"limit": 8, "mask_counts": [8], "random_seeds": [0, 1, 2], "ablation_prompts": 2,
                          "identification_prompts": 16, "n_bootstrap": 0, "max_new_tokens": 16,
                          "layer_route_search": {"max_prompts": 1, "candidates_per_layer": 4}}
    config = AlignmentConfig.model_validate({"model": model, "training": {"use_gpu": True},
                                             "evaluation": {"suite": suite}})
    init_ray("local", include_dashboard=False, log_to_driver=False, log=lambda *_: None)
    t0 = time.monotonic()
    try:
        check_evaluation_layout(config)
        report = evaluate_checkpoint(model, config, workdir / "evaluation")
    finally:
        ray.shutdown()
    return {"ok": report["device"].startswith("cuda"), "device": report["device"],
            "seconds": round(time.monotonic() - t0, 1), "phases_s": report["timings_seconds"],
            "safety_rate": report["summary"]["safety_rate"]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true",
                        help="the reduced CPU form (tiny shapes, few requests)")
    parser.add_argument("--layers", type=int, help="decoder layers (default: 4 on GPU, 2 in --smoke)")
    parser.add_argument("--rounds", type=int, default=1, help="rounds of the throughput variants")
    parser.add_argument("--budget-s", type=float, default=540,
                        help="parts that would start after this many seconds are skipped, and say so")
    parser.add_argument("--output", type=Path, default=None, help="write the JSON report here")
    parser.add_argument("--keep", action="store_true", help="keep the temporary model directory")
    args = parser.parse_args(argv)
    import torch

    form = SMOKE if args.smoke else GPU
    if args.layers:
        form = replace(form, layers=args.layers)
    if not args.smoke and not torch.cuda.is_available():
        parser.error("no CUDA GPU here: run with --smoke for the reduced CPU form")
    import vllm

    started = time.monotonic()
    report: dict = {"form": form.name, "environment": {
        "torch": torch.__version__, "vllm": vllm.__version__, "cuda": torch.version.cuda,
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "cpus": os.cpu_count()}}
    from serving.probes import probe_suite_settings

    probe_suite_settings(form.suite)  # a bad suite fails now, not after the gateways' minutes
    workdir = Path(tempfile.mkdtemp(prefix="mesa-gpu-check-"))
    failed = []

    def part(name: str, run) -> None:
        elapsed = time.monotonic() - started
        if elapsed > args.budget_s:
            report[name] = {"skipped": f"time budget: {elapsed:.0f} s of {args.budget_s:.0f} s used"}
            failed.append(name)
            return
        print(f"[gpu-check] {name} ({elapsed:.0f} s in)", flush=True)
        try:
            report[name] = run()
        except Exception as error:  # keep the other parts' figures
            report[name] = {"ok": False, "error": f"{type(error).__name__}: {error}",
                            "traceback": traceback.format_exc()[-3000:]}
        if not report[name].get("ok", True):
            failed.append(name)

    try:
        part("model", lambda: build_model(form, workdir / "model"))
        if "path" in report["model"]:
            model = report["model"]["path"]
            part("throughput", lambda: throughput_parts(form, model, args.rounds))
            part("engines", lambda: engines_part(form, model))
            part("alignment_dp", lambda: alignment_part(
                model, workdir, timeout_s=max(60.0, args.budget_s - (time.monotonic() - started))))
            part("evaluation", lambda: evaluation_part(form, model, workdir))
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    report["seconds"] = round(time.monotonic() - started, 1)
    report["failed"] = failed
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(report, indent=1))
    brief = lambda v: {k: x for k, x in v.items() if k not in ("runs", "traceback")}  # noqa: E731
    summary = {k: brief(v) if isinstance(v, dict) else v for k, v in report.items()}
    print(json.dumps(summary, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
