"""Profiling throughput with routing capture on vs a plain forward, same model and data.

Both variants tokenize the same batches and run the same forward passes; the capture variant
is `profile_routing` (hooks on every router + integer counting). Each round runs both variants,
in alternating order so drift and warm-up hit both alike; the figure is the median over rounds
of the paired throughput ratio (this 2-core machine varies by +-15% from run to run).

    .venv/bin/python benchmarks/capture_overhead.py [--hidden 128 --layers 4 --prompts 256]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from moe_routing.profiler import ProfileSettings, format_prompts, profile_routing, tokenize_batch
from moe_routing.tiny import byte_tokenizer, tiny_model


def plain_forward(model, tokenizer, prompts, settings):
    texts = format_prompts(tokenizer, prompts, settings.prompt_format)
    tokens = 0
    with torch.inference_mode():
        for start in range(0, len(texts), settings.batch_size):
            inputs = tokenize_batch(tokenizer, texts[start : start + settings.batch_size],
                                    settings, "cpu")
            model(**inputs, use_cache=False)
            tokens += int(inputs["attention_mask"].sum())
    return tokens


def captured_forward(model, tokenizer, prompts, settings):
    return profile_routing(model, tokenizer, prompts, settings, progress=False).num_tokens


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--architecture", default="qwen3_moe")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()

    overrides = dict(hidden_size=args.hidden, num_hidden_layers=args.layers)
    if args.architecture == "qwen3_moe":
        overrides.update(num_experts=args.experts, mlp_only_layers=[])
    model = tiny_model(args.architecture, **overrides)
    tokenizer = byte_tokenizer()
    prompts = [f"Please add {i} and {7 * i % 997}, then spell the result backwards." * (1 + i % 4)
               for i in range(args.prompts)]
    settings = ProfileSettings(batch_size=args.batch_size, max_length=256)
    variants = {"plain": plain_forward, "capture": captured_forward}
    for fn in variants.values():  # warm-up
        fn(model, tokenizer, prompts[: args.batch_size], settings)
    rates = {name: [] for name in variants}
    for round_ in range(args.rounds):
        order = list(variants) if round_ % 2 == 0 else list(reversed(variants))
        for name in order:
            start = time.perf_counter()
            tokens = variants[name](model, tokenizer, prompts, settings)
            rates[name].append(tokens / (time.perf_counter() - start))
    plain, capture = (statistics.median(rates[n]) for n in ("plain", "capture"))
    ratios = sorted(c / p for c, p in zip(rates["capture"], rates["plain"]))
    params = sum(p.numel() for p in model.parameters())
    print(f"model: {args.architecture}, {params / 1e6:.2f}M params, hidden {args.hidden}, "
          f"{args.layers} layers; {args.prompts} prompts, batch {args.batch_size}, "
          f"{torch.get_num_threads()} threads, {args.rounds} rounds")
    print(f"plain forward : {plain:10.0f} tokens/s (median)")
    print(f"with capture  : {capture:10.0f} tokens/s (median)")
    print(f"paired ratio capture/plain: median {statistics.median(ratios):.3f} "
          f"(min {ratios[0]:.3f}, max {ratios[-1]:.3f}; target >= 0.9)")


if __name__ == "__main__":
    main()
