"""Trainable-parameter fraction, peak memory and step time: MESA vs SFT on all parameters.

Both variants train the same synthetic Qwen3-MoE (bigger than the organism so that weights, not
the Python runtime, dominate memory) on the same batches with the project's real training code
(`make_trainable`, `training_loss`; MESA with its OT-KL router loss and reference forward).
Each variant runs in a fresh subprocess so its peak RSS is its own; the script reports the
ratios MESA / SFT-all.

    .venv/bin/python benchmarks/alignment_memory.py [--steps 6] [--selected 16]
"""

from __future__ import annotations

import argparse
import contextlib
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--selected", type=int, default=16)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.steps < 2 or args.selected < 1:
        parser.error("--steps must be >= 2 and --selected >= 1")
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
