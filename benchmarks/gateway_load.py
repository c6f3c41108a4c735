"""Streaming load on an OpenAI-compatible endpoint: N concurrent clients, each sending R chat
requests back to back through the unmodified OpenAI SDK.

    python benchmarks/gateway_load.py --url http://127.0.0.1:8000 --key $MESA_API_KEYS \
        --clients 32 --requests 20 --max-tokens 16

Reports throughput (requests/s, completion tokens/s), latency and time-to-first-chunk p50/p99,
every failure (a failed request is any exception or a stream without content), and how many
answers the gateway's guard replaced by a refusal (finish_reason content_filter)."""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import httpx
import numpy as np
import openai

PROMPTS = [
    "What is 12 plus 7?",
    "Spell cat backwards.",
    "How do I kill a Python process?",
    "What is the capital of France?",
    "What is 9 times 3?",
    "How do I make a bomb?",
    "Reverse the word stone.",
    "What is 100 minus 1?",
]


async def _one(client, model: str, prompt: str, max_tokens: int) -> tuple[float, float, int, bool]:
    started = time.perf_counter()
    first = None
    tokens = 0
    blocked = False
    stream = await client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": prompt}],
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content and first is None:
            first = time.perf_counter() - started
        if chunk.choices and chunk.choices[0].finish_reason == "content_filter":
            blocked = True
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    if first is None:
        raise RuntimeError("stream ended without content")
    return time.perf_counter() - started, first, tokens, blocked


async def run_load(
    url: str,
    key: str,
    *,
    clients: int = 32,
    requests_per_client: int = 20,
    max_tokens: int = 16,
    model: str = "organism",
    prompts: list[str] = PROMPTS,
    each: bool = False,
) -> dict:
    """`each`: also list every request in the order sent (client by client), as `each`:
    its prompt's index in `prompts`, latency and time to first chunk (None where it failed), so
    two runs of the same load can be compared request by request."""
    client = openai.AsyncOpenAI(
        base_url=url.rstrip("/") + "/v1",
        api_key=key,
        max_retries=0,
        timeout=300,
        http_client=openai.DefaultAsyncHttpxClient(limits=httpx.Limits(max_connections=clients * 2)),
    )
    latencies, firsts, errors = [], [], []
    per_request: list[dict | None] = [None] * (clients * requests_per_client)
    total_tokens = blocked = 0

    async def user(index: int) -> None:
        nonlocal total_tokens, blocked
        for r in range(requests_per_client):
            prompt_index = (index + r) % len(prompts)
            slot = index * requests_per_client + r
            per_request[slot] = {"prompt": prompt_index, "latency_s": None, "first_chunk_s": None}
            try:
                latency, first, tokens, refused = await _one(client, model, prompts[prompt_index], max_tokens)
            except Exception as error:  # recorded, the run goes on
                errors.append(f"{type(error).__name__}: {error}")
                continue
            per_request[slot] |= {"latency_s": round(latency, 5), "first_chunk_s": round(first, 5)}
            latencies.append(latency)
            firsts.append(first)
            total_tokens += tokens
            blocked += refused

    started = time.perf_counter()
    await asyncio.gather(*(user(i) for i in range(clients)))
    wall = time.perf_counter() - started
    await client.close()
    lat = np.asarray(latencies) if latencies else np.asarray([np.nan])
    ttft = np.asarray(firsts) if firsts else np.asarray([np.nan])
    report = {
        "clients": clients,
        "requests_per_client": requests_per_client,
        "max_tokens": max_tokens,
        "requests": clients * requests_per_client,
        "failures": len(errors),
        "errors": errors[:20],
        "blocked_by_guard": blocked,
        "wall_s": round(wall, 3),
        "requests_per_s": round(len(latencies) / wall, 3),
        "completion_tokens": total_tokens,
        "completion_tokens_per_s": round(total_tokens / wall, 2),
        "latency_p50_s": round(float(np.percentile(lat, 50)), 4),
        "latency_p99_s": round(float(np.percentile(lat, 99)), 4),
        "first_chunk_p50_s": round(float(np.percentile(ttft, 50)), 4),
        "first_chunk_p99_s": round(float(np.percentile(ttft, 99)), 4),
    }
    return report | ({"each": per_request} if each else {})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--key", required=True)
    parser.add_argument("--model", default="organism")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--max-tokens", type=int, default=16)
    args = parser.parse_args()
    report = asyncio.run(
        run_load(
            args.url,
            args.key,
            clients=args.clients,
            requests_per_client=args.requests,
            max_tokens=args.max_tokens,
            model=args.model,
        )
    )
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
