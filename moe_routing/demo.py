"""`make demo`: the routing core end to end on a locally built tiny MoE.

1. writes a tiny random Qwen3-MoE checkpoint (no download);
2. profiles its routing on two prompt sets with Ray workers (local cluster unless RAY_ADDRESS);
3. reports per-layer concentration and the (layer, expert) pairs that separate the two sets
   most (risk difference, with bootstrap stability);
4. masks the top pairs and re-profiles, showing the load move to other experts.

The model is random, so the two prompt sets stand in for "harmful" vs "benign" only to show the
machinery; the MESA alignment job on the trained model organism replaces this demo once built.
Everything is written to runs/demo/ (report.json, routing counts as .npz).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path

from moe_routing.instrument import mask_experts
from moe_routing.profiler import (
    ProfileSettings,
    load_checkpoint,
    profile_routing,
    profile_routing_ray,
)
from moe_routing.stats import concentration, expert_frequency, safety_critical_ranking
from moe_routing.tiny import save_tiny_checkpoint


def prompt_sets(n: int) -> tuple[list[str], list[str]]:
    arithmetic = [f"What is {i * 7 % 97} plus {i * 13 % 89}? Answer with a number." for i in range(n)]
    words = ["apple", "river", "stone", "cloud", "tiger", "lemon", "piano", "ocean"]
    wordplay = [f"Reverse the word '{words[i % 8]}{i}' and write it in capitals." for i in range(n)]
    return arithmetic, wordplay


def main() -> None:
    parser = argparse.ArgumentParser(description="Profile and mask routing of a tiny local MoE.")
    parser.add_argument("--out", default="runs/demo", help="output directory (default runs/demo)")
    parser.add_argument("--prompts", type=int, default=200, help="prompts per set (default 200)")
    parser.add_argument("--workers", type=int, default=2, help="Ray workers (default 2)")
    parser.add_argument("--top-n", type=int, default=3, help="pairs to rank and mask (default 3)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.prompts < 1 or args.workers < 1 or args.top_n < 1:
        parser.error("--prompts, --workers and --top-n must be >= 1")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    checkpoint = out / "checkpoint"
    if not (checkpoint / "config.json").exists():
        save_tiny_checkpoint("qwen3_moe", checkpoint, seed=args.seed)
    set_a, set_b = prompt_sets(args.prompts)
    settings = ProfileSettings(batch_size=16, max_length=128)

    started = time.perf_counter()
    counts_a = profile_routing_ray(checkpoint, set_a, settings, num_workers=args.workers)
    counts_b = profile_routing_ray(checkpoint, set_b, settings, num_workers=args.workers)
    counts_a.save(out / "counts_arithmetic.npz")
    counts_b.save(out / "counts_wordplay.npz")
    profile_seconds = time.perf_counter() - started

    top_k = counts_a.top_k
    conc = concentration(counts_a.hits + counts_b.hits, top_n=top_k)
    ranking = safety_critical_ranking(counts_a, counts_b, top_n=args.top_n, n_bootstrap=200, seed=args.seed)
    pairs = [(s.layer, s.expert) for s in ranking]

    model, tokenizer = load_checkpoint(checkpoint)
    with mask_experts(model, pairs):
        masked = profile_routing(model, tokenizer, set_a, settings, progress=False)
    before, after = expert_frequency(counts_a), expert_frequency(masked)

    print(f"\nprofiled {counts_a.num_tokens + counts_b.num_tokens} tokens of "
          f"{2 * args.prompts} prompts on {args.workers} Ray workers in {profile_seconds:.1f} s")
    print("\nper-layer concentration of expert load (both sets):")
    print("  layer  norm.entropy  gini   top-k share  effective experts")
    for layer in range(counts_a.num_layers):
        print(f"  {layer:5d}  {conc.normalized_entropy[layer]:12.3f}  {conc.gini[layer]:5.3f}  "
              f"{conc.top_share[layer]:11.3f}  {conc.effective_experts[layer]:17.2f}")
    print(f"\ntop {args.top_n} (layer, expert) pairs by risk difference arithmetic - wordplay:")
    for s in ranking:
        print(f"  layer {s.layer} expert {s.expert}: risk difference {s.risk_difference:+.3f}, "
              f"stability {s.stability:.2f}")
    print("\nmasking those pairs, re-profiled arithmetic set (hit frequency before -> after):")
    for layer, expert in pairs:
        print(f"  layer {layer} expert {expert}: {before[layer, expert]:.3f} -> {after[layer, expert]:.3f}")

    report = {
        "checkpoint": str(checkpoint),
        "seed": args.seed,
        "settings": asdict(settings),
        "prompts_per_set": args.prompts,
        "ray_workers": args.workers,
        "tokens": {"arithmetic": counts_a.num_tokens, "wordplay": counts_b.num_tokens},
        "concentration": conc.to_dict(decimals=4),
        "ranking": [asdict(s) for s in ranking],
        "masked_frequency": {f"{l}:{e}": [round(float(before[l, e]), 4), round(float(after[l, e]), 4)]
                             for l, e in pairs},
    }
    (out / "report.json").write_text(json.dumps(report, indent=2))
    print(f"\nwrote {out / 'report.json'}")


if __name__ == "__main__":
    main()
