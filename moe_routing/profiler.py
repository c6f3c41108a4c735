"""Profile a MoE model's routing over a dataset of prompts.

:func:`profile_routing` runs the model in batches in this process; :func:`profile_routing_ray`
shards the dataset over Ray workers (one per GPU on a GPU cluster, CPU workers otherwise) that
each load the checkpoint and profile their shard, then merges the integer counts.

Shards are cut on batch boundaries, so every worker sees exactly the batches the single process
would (same padding, same shapes): the merged counts equal single-process counts exactly.

Long profiles resume: with ``resume_path`` (or ``resume_dir`` on Ray) the counts so far are saved
atomically every few batches, fingerprinted by prompts and settings; a rerun continues after the
last saved batch and a rerun of a finished profile returns at once.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from moe_routing.architectures import MoEModel, check_supported, describe
from moe_routing.chat import chat_prompts
from moe_routing.checkpoint import locate_checkpoint
from moe_routing.devices import resolve_device
from moe_routing.instrument import RoutingTrace, capture_routing
from moe_routing.ray_cluster import init_ray
from moe_routing.stats import (
    RoutingCounts,
    concentration,
    expert_frequency,
    safety_critical_ranking,
)

PromptFormat = Literal["chat", "raw"]


@dataclass(frozen=True)
class ProfileSettings:
    """How prompts become model inputs. Part of every profile's provenance."""

    batch_size: int = 16
    max_length: int = 256
    prompt_format: PromptFormat = "chat"

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {self.max_length}")
        if self.prompt_format not in ("chat", "raw"):
            raise ValueError(f"prompt_format must be 'chat' or 'raw', got {self.prompt_format!r}")


def _check_prompts(prompts: Sequence[str]) -> list[str]:
    prompts = list(prompts)
    if not prompts:
        raise ValueError("the dataset is empty: profiling needs at least one prompt")
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str) or not prompt:
            raise ValueError(f"prompt {i} must be a non-empty string, got {prompt!r}")
    return prompts


def format_prompts(tokenizer, prompts: Sequence[str], prompt_format: PromptFormat) -> list[str]:
    """Render prompts as the model sees them: a user turn of its chat template, or raw text."""
    if prompt_format == "raw":
        return list(prompts)
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("prompt_format='chat' needs a tokenizer with a chat template; use 'raw'")
    return chat_prompts(tokenizer, prompts)


def tokenize_batch(tokenizer, texts: Sequence[str], settings: ProfileSettings, device):
    """Model inputs of one batch of formatted prompts (padded, truncated to max_length)."""
    return tokenizer(
        list(texts),
        return_tensors="pt",
        padding=True,
        truncation=True,
        max_length=settings.max_length,
        add_special_tokens=False,
    ).to(device)


def counts_from_trace(trace: RoutingTrace, num_sequences: int, moe: MoEModel) -> RoutingCounts:
    """Integer hit / co-activation counts of ``num_sequences`` sequences numbered 0..S-1."""
    L, E = moe.num_layers, moe.num_experts
    ids = trace.expert_ids  # [N, L, k]
    layer = torch.arange(L)[None, :, None]
    flat = (trace.sequence[:, None, None] * L + layer) * E + ids
    hits = torch.bincount(flat.reshape(-1), minlength=num_sequences * L * E)
    tokens = torch.bincount(trace.sequence, minlength=num_sequences)
    # Co-activation: every ordered pair (i, j) of a token's selected experts, i == j included.
    pairs = (layer[..., None] * E + ids[..., :, None]) * E + ids[..., None, :]  # [N, L, k, k]
    coactivation = torch.bincount(pairs.reshape(-1), minlength=L * E * E)
    return RoutingCounts(
        sequence_hits=hits.reshape(num_sequences, L, E).numpy().astype(np.int64),
        sequence_tokens=tokens.numpy().astype(np.int64),
        coactivation=coactivation.reshape(L, E, E).numpy().astype(np.int64),
        top_k=moe.top_k,
    )


def _fingerprint(prompts: Sequence[str], settings: ProfileSettings) -> str:
    digest = hashlib.sha256(json.dumps(asdict(settings), sort_keys=True).encode())
    for prompt in prompts:
        digest.update(prompt.encode("utf-8") + b"\0")
    return digest.hexdigest()


def _load_partial(path: Path, fingerprint: str) -> RoutingCounts | None:
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as saved:
            arrays = {name: saved[name] for name in saved.files}
        counts = RoutingCounts(arrays["sequence_hits"], arrays["sequence_tokens"],
                               arrays["coactivation"], int(arrays["top_k"]))
        saved_fingerprint = str(arrays["fingerprint"])
    except (OSError, KeyError, EOFError, ValueError) as error:
        raise ValueError(f"{path} is not a readable partial profile ({error})") from None
    if saved_fingerprint != fingerprint:
        raise ValueError(f"{path} holds a partial profile of other prompts or settings; "
                         "remove it or choose another resume path")
    return counts


def _save_partial(path: Path, fingerprint: str, counts: RoutingCounts) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "wb") as handle:  # a file object, so numpy adds no suffix
        np.savez(handle, fingerprint=np.array(fingerprint), sequence_hits=counts.sequence_hits,
                 sequence_tokens=counts.sequence_tokens, coactivation=counts.coactivation,
                 top_k=np.int64(counts.top_k))
    os.replace(temporary, path)  # atomic: a crash never leaves a half-written profile


@torch.inference_mode()
def profile_routing(
    model,
    tokenizer,
    prompts: Sequence[str],
    settings: ProfileSettings = ProfileSettings(),
    *,
    progress: bool = True,
    resume_path: str | Path | None = None,
    save_every: int = 10,
) -> RoutingCounts:
    """Routing counts of ``model`` over the prompt tokens of ``prompts``, in dataset order.

    With ``resume_path``, counts so far are saved there every ``save_every`` batches and at the
    end, and a rerun with the same prompts and settings resumes after the last saved batch. The
    path identifies the model: use one per model (e.g. inside the job's output directory).
    """
    prompts = _check_prompts(prompts)
    if save_every < 1:
        raise ValueError(f"save_every must be >= 1 batch, got {save_every}")
    moe = describe(model)
    texts = format_prompts(tokenizer, prompts, settings.prompt_format)
    device = next(model.parameters()).device
    parts: list[RoutingCounts] = []
    fingerprint = _fingerprint(prompts, settings) if resume_path is not None else ""
    if resume_path is not None:
        resume_path = Path(resume_path)
        saved = _load_partial(resume_path, fingerprint)
        if saved is not None:
            parts.append(saved)
    done = parts[0].num_sequences if parts else 0
    if done == len(texts):
        return parts[0]
    batches = range(done, len(texts), settings.batch_size)
    with capture_routing(model, probabilities=False) as capture:
        bar = tqdm(batches, desc="profiling routing", unit="batch", disable=not progress)
        for number, start in enumerate(bar, start=1):
            batch = texts[start : start + settings.batch_size]
            model(**tokenize_batch(tokenizer, batch, settings, device), use_cache=False)
            trace = capture.drain()
            trace.sequence -= start - done  # the capture numbers sequences across all batches
            parts.append(counts_from_trace(trace, len(batch), moe))
            if resume_path is not None and (number % save_every == 0 or start + len(batch) == len(texts)):
                parts = [RoutingCounts.merge(parts)]
                _save_partial(resume_path, fingerprint, parts[0])
    return RoutingCounts.merge(parts)


def _shard_bounds(num_prompts: int, batch_size: int, num_shards: int) -> list[tuple[int, int]]:
    """Contiguous [start, stop) prompt ranges on batch boundaries, as even as possible."""
    num_batches = math.ceil(num_prompts / batch_size)
    num_shards = max(1, min(num_shards, num_batches))
    per_shard, extra = divmod(num_batches, num_shards)
    bounds, batch = [], 0
    for shard in range(num_shards):
        take = per_shard + (1 if shard < extra else 0)
        bounds.append((batch * batch_size, min((batch + take) * batch_size, num_prompts)))
        batch += take
    return bounds


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | str = "auto"):
    """Model and tokenizer from an HF checkpoint directory or hub id, checked before loading;
    `device` a torch.device or a setting's name (auto, cpu, cuda, cuda:N: `resolve_device`)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = locate_checkpoint(path)  # a missing directory fails here, naming it
    check_supported(AutoConfig.from_pretrained(path))  # clear error before loading any weights
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if isinstance(device, str):  # one line for a device this process cannot use, before loading
        device = resolve_device(device)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    return model, tokenizer


def _profile_shard(checkpoint: str, prompts: list[str], settings: ProfileSettings,
                   threads: int | None, resume_path: str | None):
    if threads:
        torch.set_num_threads(threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tokenizer = load_checkpoint(checkpoint, device=device)
    return profile_routing(model, tokenizer, prompts, settings, progress=False,
                           resume_path=resume_path)


def profile_routing_ray(
    checkpoint: str | Path,
    prompts: Sequence[str],
    settings: ProfileSettings = ProfileSettings(),
    *,
    num_workers: int | None = None,
    gpus_per_worker: float | None = None,
    cpus_per_worker: float = 1,
    torch_threads: int | None = None,
    progress: bool = True,
    resume_dir: str | Path | None = None,
) -> RoutingCounts:
    """Profile ``checkpoint`` over ``prompts`` on Ray workers and merge their counts.

    Joins the running Ray cluster (``RAY_ADDRESS``) or starts a local one. By default one worker
    per GPU when the cluster has GPUs, else one per CPU. ``torch_threads`` pins each worker's
    intra-op threads (defaults to Ray's per-worker setting). With ``resume_dir`` (a directory
    every worker can write: local, or a shared filesystem on a multi-node cluster) each shard
    saves and resumes its own partial counts, named by its prompt range.
    """
    import ray

    prompts = _check_prompts(prompts)
    init_ray(log_to_driver=False)
    resources = ray.cluster_resources()
    if gpus_per_worker is None:
        gpus_per_worker = 1.0 if resources.get("GPU", 0) >= 1 else 0.0
    if num_workers is None:
        pool = resources.get("GPU", 0) if gpus_per_worker else resources.get("CPU", 1) / cpus_per_worker
        num_workers = max(1, int(pool))
    if num_workers < 1:
        raise ValueError(f"num_workers must be >= 1, got {num_workers}")
    task = ray.remote(_profile_shard).options(num_cpus=cpus_per_worker, num_gpus=gpus_per_worker)
    bounds = _shard_bounds(len(prompts), settings.batch_size, num_workers)
    shard_paths = [
        str(Path(resume_dir) / f"shard-{a:08d}-{b:08d}.npz") if resume_dir is not None else None
        for a, b in bounds
    ]
    refs = [task.remote(str(checkpoint), prompts[a:b], settings, torch_threads, path)
            for (a, b), path in zip(bounds, shard_paths)]
    pending = list(refs)
    with tqdm(total=len(refs), desc="profiling shards", unit="shard", disable=not progress) as bar:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            ray.get(done)  # surface a worker's error as soon as it happens
            bar.update(len(done))
    return RoutingCounts.merge(ray.get(refs))


# --------------------------------------------------------------------------- command line


def read_prompts(path: str | Path, field: str = "prompt") -> list[str]:
    """Prompts from a file: .txt (one per line), .jsonl (objects with ``field``, or strings)
    or .json (a list of strings or of objects with ``field``)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"prompt file not found: {path}")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".txt":
        return [line for line in text.splitlines() if line.strip()]
    if path.suffix not in (".jsonl", ".json"):
        raise ValueError(f"{path}: unsupported prompt file type {path.suffix!r} "
                         "(use .txt, .jsonl or .json)")
    try:
        if path.suffix == ".json":
            records = json.loads(text)
            if not isinstance(records, list):
                raise ValueError(f"{path}: expected a JSON list of prompts")
        else:
            records = [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: invalid JSON ({error})") from None
    prompts = []
    for i, record in enumerate(records):
        if isinstance(record, dict):
            if field not in record:
                raise ValueError(f"{path}: record {i} has no field {field!r} (see --field)")
            record = record[field]
        if not isinstance(record, str):
            raise ValueError(f"{path}: record {i} is not a string prompt")
        prompts.append(record)
    return prompts


def _summary(counts: RoutingCounts) -> dict:
    return {
        "sequences": counts.num_sequences,
        "tokens": counts.num_tokens,
        "frequency": expert_frequency(counts).round(5).tolist(),
        "concentration": concentration(counts.hits, top_n=counts.top_k).to_dict(),
    }


def main(argv: Sequence[str] | None = None) -> int:
    """``mesa-profile``: routing profile of a checkpoint over prompt files."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="mesa-profile",
        description="Profile a MoE checkpoint's routing over prompts; with --compare, rank the "
        "(layer, expert) pairs that separate the two sets (risk difference + bootstrap stability).",
    )
    parser.add_argument("--checkpoint", required=True, help="HF checkpoint directory or hub id")
    parser.add_argument("--prompts", required=True, help="prompt file (.txt, .jsonl, .json)")
    parser.add_argument("--compare", help="second prompt file, e.g. benign prompts")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--field", default="prompt", help="JSON field holding the prompt")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--format", choices=("chat", "raw"), default="chat", dest="prompt_format")
    parser.add_argument("--workers", type=int, default=0,
                        help="Ray workers; 0 profiles in this process (default)")
    parser.add_argument("--device", default="cpu", help="device for in-process profiling")
    parser.add_argument("--top-n", type=int, default=10, help="pairs to rank with --compare")
    parser.add_argument("--bootstrap", type=int, default=100, help="bootstrap replicates")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-resume", action="store_true",
                        help="ignore and overwrite partial counts in OUT/partial from an earlier run")
    args = parser.parse_args(argv)

    try:
        settings = ProfileSettings(args.batch_size, args.max_length, args.prompt_format)
        if args.workers < 0:
            raise ValueError(f"--workers must be >= 0, got {args.workers}")
        sets = {"prompts": read_prompts(args.prompts, args.field)}
        if args.compare:
            sets["compare"] = read_prompts(args.compare, args.field)
        for prompts in sets.values():
            _check_prompts(prompts)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        partial = out / "partial"  # a rerun of the same command resumes from here
        if args.no_resume and partial.exists():
            for stale in partial.rglob("*.npz"):
                stale.unlink()
        if args.workers:
            profiles = {name: profile_routing_ray(args.checkpoint, prompts, settings,
                                                  num_workers=args.workers,
                                                  resume_dir=partial / name)
                        for name, prompts in sets.items()}
        else:
            model, tokenizer = load_checkpoint(args.checkpoint, device=args.device)
            profiles = {name: profile_routing(model, tokenizer, prompts, settings,
                                              resume_path=partial / f"{name}.npz")
                        for name, prompts in sets.items()}
        report = {"checkpoint": str(args.checkpoint), "settings": asdict(settings),
                  "files": {"prompts": args.prompts, "compare": args.compare}, "seed": args.seed}
        for name, counts in profiles.items():
            counts.save(out / f"counts_{name}.npz")
            report[name] = _summary(counts)
        if args.compare:
            ranking = safety_critical_ranking(profiles["prompts"], profiles["compare"],
                                              top_n=args.top_n, n_bootstrap=args.bootstrap,
                                              seed=args.seed)
            report["ranking"] = [asdict(score) for score in ranking]
        (out / "profile.json").write_text(json.dumps(report, indent=2))
    except (ValueError, OSError) as error:
        parser.exit(2, f"mesa-profile: error: {error}\n")
    print(f"wrote {out / 'profile.json'}")
    for score in report.get("ranking", []):
        print(f"layer {score['layer']:3d} expert {score['expert']:4d}  "
              f"risk difference {score['risk_difference']:+.4f}  stability {score['stability']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
