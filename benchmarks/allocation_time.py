"""MESA allocation time at Qwen3-30B-A3B scale (48 MoE layers x 128 experts, top-8).

Compares the closed-form semi-relaxed OT plan with POT's generalised Sinkhorn on the same
synthetic routing counts (Zipf-like expert popularity, as real routers have), in one run, and
reports both times, their ratio, and whether the two select the same experts. Target: <= 1 s.

    .venv/bin/python benchmarks/allocation_time.py [--layers 48 --experts 128 --top-k 8 --rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from alignment.allocation import AllocationSettings, allocate
from moe_routing.stats import RoutingCounts


def synthetic_counts(
    layers: int, experts: int, top_k: int, tokens: int, sequences: int, seed: int
) -> RoutingCounts:
    rng = np.random.default_rng(seed)
    popularity = 1.0 / np.arange(1, experts + 1) ** 0.8
    hits = np.zeros((sequences, layers, experts), np.int64)
    co = np.zeros((layers, experts, experts), np.int64)
    per_sequence = tokens // sequences
    for l in range(layers):
        p = rng.permutation(popularity)
        p /= p.sum()
        # top-k distinct experts per token, drawn by popularity (Gumbel top-k).
        keys = np.log(p)[None, :] - np.log(-np.log(rng.random((tokens, experts))))
        chosen = np.argpartition(-keys, top_k, axis=1)[:, :top_k]
        onehot = np.zeros((tokens, experts), np.int64)
        np.put_along_axis(onehot, chosen, 1, axis=1)
        hits[:, l] = onehot.reshape(sequences, per_sequence, experts).sum(axis=1)
        co[l] = onehot.T @ onehot
    return RoutingCounts(hits, np.full(sequences, per_sequence, np.int64), co, top_k)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=48)
    parser.add_argument("--experts", type=int, default=128)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    safety = synthetic_counts(args.layers, args.experts, args.top_k, args.tokens, 64, seed=0)
    general = synthetic_counts(args.layers, args.experts, args.top_k, args.tokens, 64, seed=1)
    times: dict[str, list[float]] = {"closed_form": [], "pot": []}
    selected = {}
    for round_ in range(args.rounds):
        order = ["closed_form", "pot"] if round_ % 2 == 0 else ["pot", "closed_form"]
        for solver in order:
            started = time.perf_counter()
            result = allocate(safety, general, AllocationSettings(solver=solver, num_selected=64))
            times[solver].append(time.perf_counter() - started)
            selected[solver] = result.selected
    closed, pot = statistics.median(times["closed_form"]), statistics.median(times["pot"])
    print(
        f"allocation, {args.layers} layers x {args.experts} experts (top-{args.top_k}), "
        f"median of {args.rounds} rounds:"
    )
    print(f"  closed form : {closed * 1000:8.1f} ms")
    print(f"  POT sinkhorn: {pot * 1000:8.1f} ms")
    print(f"  POT / closed form time ratio: {pot / closed:.1f}")
    print(f"  same 64 selected pairs: {selected['closed_form'] == selected['pot']}")


if __name__ == "__main__":
    main()
