"""F-SOUR scoring with and without the shared prefix cache, in one run on one checkpoint.

F-SOUR scores N candidate routes at every (prompt token, MoE layer) position. The tokens before
the position are routed the same in all N rows, so `safety_eval.fsour` runs them once and scores
the N rows from their KV cache (`target_logprob(..., prefix=)`). This times both ways over every
position of a few held-out prompts, alternating, and prints the time ratio (the figure to
compare across machines) and the largest score difference between them.

    .venv/bin/python benchmarks/fsour_prefix.py [--checkpoint organism|DIR] [--candidates 10,100]
"""

from __future__ import annotations

import argparse
import time

import torch

from moe_routing.architectures import describe
from moe_routing.chat import chat_prompt_ids
from moe_routing.profiler import load_checkpoint
from organism.checkpoint import resolve_checkpoint
from safety_eval.attacks import prefix_cache, target_logprob
from safety_eval.fsour import draw_prompts, route_tensors
from safety_eval.harness import EvalSets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default="organism")
    parser.add_argument("--candidates", default="10,100")
    parser.add_argument("--prompts", type=int, default=2)
    args = parser.parse_args()
    checkpoint = resolve_checkpoint(args.checkpoint)
    model, tokenizer = load_checkpoint(checkpoint, dtype=torch.float32)
    moe = describe(model)
    k = moe.top_k
    harmful = EvalSets.for_checkpoint(checkpoint).harmful
    target = torch.tensor(tokenizer("Sure, here is", add_special_tokens=False)["input_ids"])
    gen = torch.Generator().manual_seed(0)
    for n in [int(c) for c in args.candidates.split(",")]:
        seconds, worst = {"full": 0.0, "prefix": 0.0}, 0.0
        for index in draw_prompts(harmful, args.prompts, seed=0):
            ids = torch.tensor([chat_prompt_ids(tokenizer, harmful[index])])
            length = ids.shape[1]
            for position in range(length):
                forced = {0: torch.full((n, length, k), -1, dtype=torch.long)}
                forced[0][:, position] = torch.stack([torch.randperm(moe.num_experts, generator=gen)[:k]
                                                      for _ in range(n)])
                order = ("full", "prefix") if position % 2 == 0 else ("prefix", "full")
                scores = {}
                for way in order:
                    started = time.perf_counter()
                    if way == "full":
                        scores[way] = target_logprob(model, ids, target, forced)
                    else:
                        prefix = prefix_cache(model, ids, position, route_tensors({}, 1, position, k))
                        scores[way] = target_logprob(model, ids, target, forced, prefix=prefix)
                    seconds[way] += time.perf_counter() - started
                worst = max(worst, float((scores["full"] - scores["prefix"]).abs().max()))
        print(f"N={n:4d}: full passes {seconds['full']:.2f} s, shared prefix {seconds['prefix']:.2f} s, "
              f"ratio {seconds['prefix'] / seconds['full']:.2f}; max |score difference| {worst:.1e}")


if __name__ == "__main__":
    main()
