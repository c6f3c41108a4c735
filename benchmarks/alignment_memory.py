"""Trainable-parameter fraction, peak memory and step time: MESA vs SFT on all parameters.

Both variants train the same synthetic Qwen3-MoE (bigger than the organism so that weights, not
the Python runtime, dominate memory) on the same batches with the project's real training code
(`make_trainable`, `training_loss`; MESA with its OT-KL router loss and reference forward).
Each variant runs in a fresh subprocess so its peak RSS is its own; the script reports the
ratios MESA / SFT-all.

    .venv/bin/python benchmarks/alignment_memory.py [--steps 6] [--selected 16]

``--estimate`` checks `alignment.sharding`'s per-worker memory estimate instead: for each layout
(``--layouts none:1,fsdp:2``) it trains MESA on a checkpoint (the synthetic model saved to a
temporary directory, or ``--checkpoint``, e.g. the organism) with the job's own loading and
training code in fresh Ray Train workers (gloo, a local Ray instance), and prints each worker's
peak RSS next to the estimate (rank 0 of fsdp: plus its host copy of the checkpoint while it
loads). ``MALLOC_MMAP_THRESHOLD_=1048576`` in the environment makes glibc return every freed
buffer of 1 MiB or more at once, so that the peak RSS is the peak of live memory.

    .venv/bin/python benchmarks/alignment_memory.py --estimate [--checkpoint DIR] [--layouts ...]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SHAPE = dict(hidden_size=256, num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=4, head_dim=64,
             num_experts=32, num_experts_per_tok=4, moe_intermediate_size=256, intermediate_size=1024,
             vocab_size=4096, norm_topk_prob=True, router_aux_loss_coef=0.0, tie_word_embeddings=True)


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _status_mib(field: str) -> float:
    """VmRSS (now) or VmHWM (peak since start or since :func:`_reset_peak`) of this process."""
    text = Path("/proc/self/status").read_text()
    return int(text.split(f"{field}:", 1)[1].split()[0]) / 1024


def _checkpoint_pages_mib() -> float:
    """Resident pages of mapped *.safetensors files: transformers keeps the checkpoint mapped
    while the model it loaded lives; clean file pages the kernel can reclaim, not training memory."""
    total, mapped = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        if "-" in line.split(" ", 1)[0]:  # a mapping's header line
            mapped = line.rstrip().endswith(".safetensors")
        elif mapped and line.startswith("Rss:"):
            total += int(line.split()[1])
    return total / 1024


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # Linux: VmHWM starts again from VmRSS


def child(method: str, steps: int, selected: int) -> dict:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from alignment.config import TrainingConfig
    from alignment.loop import Batch, router_target, training_loss
    from alignment.trainable import make_trainable
    from moe_routing.architectures import describe
    from moe_routing.instrument import capture_router_logits

    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("qwen3_moe", **SHAPE), dtype=torch.float32)
    moe = describe(model)
    total = sum(p.numel() for p in model.parameters())
    # The selected pairs: spread over layers as the allocation would (2 per layer for w = 16).
    experts = [(i % moe.num_layers, (3 * i) % moe.num_experts) for i in range(selected)]
    training = TrainingConfig(method=method)
    model, trainable = make_trainable(model, method, experts)
    loaded = _rss_mib()
    chosen = torch.zeros(moe.num_layers, moe.num_experts, dtype=torch.bool)
    for layer, expert in experts:
        chosen[layer, expert] = True
    target = router_target(training, chosen, torch.ones(moe.num_layers, moe.num_experts))
    stack = contextlib.ExitStack()
    capture = stack.enter_context(capture_router_logits(model)) if method == "mesa" else None
    optimizer = torch.optim.AdamW(list(trainable.params.values()), lr=1e-4, weight_decay=0.0)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, SHAPE["vocab_size"], (8, 128), generator=generator)
    batch = Batch(ids, torch.ones_like(ids), ids.clone(), torch.arange(8) < 6, torch.ones(8))
    model.train()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        loss, *_ = training_loss(model, trainable, capture, batch, spec=moe.router, target=target,
                                 training=training)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    stack.close()
    return {"method": method, "trainable": trainable.count(), "total": total,
            "rss_after_load_mib": round(loaded, 1), "peak_rss_mib": round(_rss_mib(), 1),
            "step_seconds_median": round(sorted(times[1:])[len(times[1:]) // 2], 4)}


BATCH, TOKENS = 8, 128  # --estimate: global batch of BATCH rows of TOKENS tokens (max_length)


def _training(sharding: str, workers: int):
    from alignment.config import TrainingConfig

    return TrainingConfig(method="mesa", batch_size=BATCH, max_length=TOKENS, num_workers=workers,
                          sharding=sharding)


def _experts(checkpoint: str, selected: int) -> list[tuple[int, int]]:
    from transformers import AutoConfig

    from moe_routing.architectures import router_spec_from_config

    config = AutoConfig.from_pretrained(checkpoint)
    layers, experts = config.num_hidden_layers, router_spec_from_config(config).num_experts
    return sorted({(i % layers, (3 * i) % experts) for i in range(selected)})


def estimate_worker(job: dict) -> None:
    """One Ray Train worker built as `alignment.loop.train_worker` builds it (its loading, DDP or
    FSDP2, AdamW, the MESA loss with its reference forward); writes its peak RSS to a file."""
    import ray.train
    import torch

    from alignment.loop import Batch, load_trainable, router_target, training_loss
    from alignment.sharding import average_gradients
    from moe_routing.architectures import describe
    from moe_routing.instrument import capture_router_logits

    torch.set_num_threads(1)
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    checkpoint, sharding = job["checkpoint"], job["sharding"]
    training, experts = _training(sharding, world), _experts(checkpoint, job["selected"])
    model, trainable, _ = load_trainable(checkpoint, training, experts, torch.device("cpu"))
    inner = model
    if world > 1 and sharding == "none":
        model = ray.train.torch.prepare_model(model, move_to_device=False)
    gc.collect()
    pages = _checkpoint_pages_mib()  # subtracted from every figure below
    loaded, load_peak = _status_mib("VmRSS") - pages, _status_mib("VmHWM") - pages
    _reset_peak()
    moe = describe(inner)
    chosen = torch.zeros(moe.num_layers, moe.num_experts, dtype=torch.bool)
    for layer, expert in experts:
        chosen[layer, expert] = True
    target = router_target(training, chosen, torch.ones(moe.num_layers, moe.num_experts))
    optimizer = torch.optim.AdamW(list(trainable.params.values()), lr=1e-4, weight_decay=0.0)
    rows = BATCH // world
    ids = torch.randint(0, inner.config.vocab_size, (BATCH, TOKENS),
                        generator=torch.Generator().manual_seed(0))[rank::world]
    harmful = (torch.arange(BATCH) % 4 != 3)[rank::world]
    batch = Batch(ids, torch.ones_like(ids), ids.clone(), harmful, torch.ones(rows))
    model.train()
    with capture_router_logits(inner) as capture:
        for _ in range(job["steps"]):
            loss, *_ = training_loss(model, trainable, capture, batch, spec=moe.router, target=target,
                                     training=training, reference_model=inner)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if sharding == "fsdp":
                average_gradients(trainable.params.values())
            torch.nn.utils.clip_grad_norm_(list(trainable.params.values()), 1.0)
            optimizer.step()
    train_peak, peak = _status_mib("VmHWM") - pages, _rss_mib() - pages
    result = {"rank": rank, "loaded": loaded, "load_peak": load_peak, "train_peak": train_peak, "peak": peak,
              "checkpoint_pages": pages}  # MiB
    Path(job["out"], f"rank{rank}.json").write_text(json.dumps(result))


def check_estimate(args) -> int:
    """Each layout in fresh Ray Train workers (a local Ray instance); measured vs estimated."""
    import tempfile

    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from alignment.sharding import estimate_memory

    with tempfile.TemporaryDirectory() as directory:
        checkpoint = args.checkpoint
        if checkpoint is None:
            import torch
            from transformers import AutoConfig, AutoModelForCausalLM

            from moe_routing.tiny import byte_tokenizer

            torch.manual_seed(0)
            checkpoint = str(Path(directory) / "synthetic")
            shape = SHAPE | {key: int(value) for key, value in (item.split("=") for item in args.shape)}
            model = AutoModelForCausalLM.from_config(AutoConfig.for_model("qwen3_moe", **shape))
            model.save_pretrained(checkpoint)
            byte_tokenizer().save_pretrained(checkpoint)
        name = args.checkpoint or f"synthetic Qwen3-MoE (SHAPE {' '.join(args.shape)})"
        print(f"checkpoint {name}; MESA, {args.selected} pairs, "
              f"global batch {BATCH} x {TOKENS} tokens, {args.steps} steps, float32, 1 thread per worker")
        layouts = [(sharding, int(workers)) for sharding, workers in
                   (layout.split(":") for layout in args.layouts.split(","))]
        ray.init(num_cpus=max(w for _, w in layouts), include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": str(Path(__file__).resolve().parent.parent)}})
        try:
            for sharding, workers in layouts:
                estimate = estimate_memory(checkpoint, _training(sharding, workers),
                                           _experts(checkpoint, args.selected))
                out = Path(directory) / f"{sharding}-{workers}"
                out.mkdir()
                job = {"checkpoint": checkpoint, "sharding": sharding, "selected": args.selected,
                       "steps": args.steps, "out": str(out)}
                scaling = ScalingConfig(num_workers=workers, resources_per_worker={"CPU": 1})
                TorchTrainer(estimate_worker, train_loop_config=job, scaling_config=scaling,
                             run_config=RunConfig(storage_path=str(Path(directory) / "ray"))).fit()
                print(f"  {sharding}:{workers}  estimate {estimate.summary()}")
                loaded = (estimate.runtime + estimate.weights) / 2**20
                for rank in range(workers):
                    r = json.loads((out / f"rank{rank}.json").read_text())
                    expected = (estimate.rank0 if rank == 0 else estimate.total) / 2**20
                    print(f"    rank {rank}: peak RSS {r['peak']:5.0f} MiB, estimate {expected:5.0f} MiB "
                          f"({100 * (expected - r['peak']) / r['peak']:+.1f}%); after load {r['loaded']:.0f} "
                          f"(estimate {loaded:.0f}), load peak {r['load_peak']:.0f}, training peak "
                          f"{r['train_peak']:.0f} = +{r['train_peak'] - r['loaded']:.0f} (estimate "
                          f"+{estimate.total / 2**20 - loaded:.0f}); less {r['checkpoint_pages']:.0f} MiB of "
                          "the mapped checkpoint")
        finally:
            ray.shutdown()
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--selected", type=int, default=16)
    parser.add_argument("--estimate", action="store_true", help="check alignment.sharding's memory estimate")
    parser.add_argument("--checkpoint", help="--estimate: this checkpoint instead of the synthetic model")
    parser.add_argument("--layouts", default="none:1,fsdp:2", help="--estimate: sharding:workers,...")
    parser.add_argument("--shape", action="append", default=[], metavar="KEY=N",
                        help="--estimate: change the synthetic model's SHAPE, e.g. moe_intermediate_size=768")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.steps < 2 or args.selected < 1:
        parser.error("--steps must be >= 2 and --selected >= 1")
    if args.estimate:
        return check_estimate(args)
    if args.child:
        print("RESULT " + json.dumps(child(args.child, args.steps, args.selected)))
        return 0
    results = {}
    for method in ("sft_all", "mesa"):
        run = subprocess.run([sys.executable, __file__, "--child", method, "--steps", str(args.steps),
                              "--selected", str(args.selected)], capture_output=True, text=True)
        line = next((l for l in run.stdout.splitlines() if l.startswith("RESULT ")), None)
        if run.returncode != 0 or line is None:
            print(run.stderr[-2000:], file=sys.stderr)
            return 1
        results[method] = json.loads(line.removeprefix("RESULT "))
    sft, mesa = results["sft_all"], results["mesa"]
    print(f"model: synthetic Qwen3-MoE {SHAPE['num_hidden_layers']} layers x {SHAPE['num_experts']} experts, "
          f"{sft['total'] / 1e6:.1f}M parameters; MESA trains {args.selected} (layer, expert) pairs "
          "+ routers; "
          f"batch 8 x 128 tokens, {args.steps} steps, 1 thread")
    for name, r in results.items():
        print(f"  {name:8s} trainable {r['trainable']:>11,} ({100 * r['trainable'] / r['total']:.2f}%)  "
              f"RSS after load {r['rss_after_load_mib']:.0f} MiB  peak {r['peak_rss_mib']:.0f} MiB  "
              f"step {r['step_seconds_median']:.3f} s")
    added = [r["peak_rss_mib"] - r["rss_after_load_mib"] for r in (mesa, sft)]
    print(f"ratios MESA / SFT-all: trainable {mesa['trainable'] / sft['trainable']:.4f}, "
          f"peak RSS {mesa['peak_rss_mib'] / sft['peak_rss_mib']:.3f}, "
          f"training memory (peak - after load) {added[0] / added[1]:.3f}, "
          f"step time {mesa['step_seconds_median'] / sft['step_seconds_median']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
