"""MESA step 6: the base checkpoint with the trained values applied, as an ordinary HF checkpoint."""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path

import torch

from alignment.config import AlignmentConfig
from alignment.loop import TRAINABLE_FILE
from alignment.methods import method_spec
from alignment.trainable import make_trainable
from moe_routing.files import atomic_directory
from moe_routing.fingerprint import write_manifest
from moe_routing.profiler import load_checkpoint


def export_checkpoint(config: AlignmentConfig, base_checkpoint: str | Path, trained_dir: str | Path,
                      experts: Sequence[tuple[int, int]], output_dir: str | Path, info: dict) -> Path:
    """The base checkpoint with the trained values applied, saved as an ordinary HF checkpoint
    (LoRA merged) in the base's dtype, plus `alignment.json` and the base's held-out
    `eval_sets.json`. Atomic."""
    output_dir = Path(output_dir)
    # In the base's own dtype: a bf16 model stays bf16 (not twice its size in float32), and weights
    # training did not touch stay bit-identical whatever dtype it ran in.
    model, tokenizer = load_checkpoint(str(base_checkpoint), device="cpu", dtype="auto")
    model, trainable = make_trainable(
        model, config.training.method, experts, lora_rank=config.training.lora_rank
    )
    trainable.load_state(torch.load(Path(trained_dir) / TRAINABLE_FILE, map_location="cpu"))
    trainable.bake()
    if method_spec(config.training.method).lora:
        model = model.merge_and_unload()
    with atomic_directory(output_dir) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        held_out = Path(base_checkpoint) / "eval_sets.json"
        if held_out.is_file():
            shutil.copy(held_out, staging / "eval_sets.json")
        (staging / "alignment.json").write_text(json.dumps(info, indent=1))
        write_manifest(model, staging)  # the gateway checks the served weights against it
    return output_dir


def parameter_counts(checkpoint: str, config: AlignmentConfig, experts: Sequence[tuple[int, int]]) -> dict:
    """Trainable vs total parameters of the method, counted on a weightless (meta) copy."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(checkpoint))
    total = sum(p.numel() for p in model.parameters())
    model, trainable = make_trainable(model, config.training.method, experts,
                                      lora_rank=config.training.lora_rank)
    count = trainable.count()
    return {"trainable": count, "total": total, "fraction": round(count / total, 6)}
