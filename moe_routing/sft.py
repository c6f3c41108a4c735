"""Supervised fine-tuning on chat exchanges: encoding, batching, the token loss and the
learning-rate schedule.

Shared by the organism's training stages and the alignment methods.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from moe_routing.chat import chat_exchange


def encode_chat(tokenizer, prompt: str, response: str, max_length: int | None = None
                ) -> tuple[list[int], list[int]]:
    """Token ids and labels of one user/assistant exchange in the model's chat template; the loss
    is on the assistant turn (and its end-of-turn marker) only. Long prompts are cut from the left
    so the response is always kept (at most half of `max_length` of it)."""
    head, tail = chat_exchange(tokenizer, prompt, response)
    head_ids = tokenizer(head, add_special_tokens=False)["input_ids"]
    tail_ids = tokenizer(tail, add_special_tokens=False)["input_ids"]
    if max_length is not None:
        tail_ids = tail_ids[: max_length // 2]
        head_ids = head_ids[-(max_length - len(tail_ids)):]
    return head_ids + tail_ids, [-100] * len(head_ids) + tail_ids


def collate(examples: Sequence[tuple[list[int], list[int]]], pad_id: int):
    """(input_ids, attention_mask, labels), right-padded."""
    length = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), length), pad_id)
    labels = torch.full((len(examples), length), -100)
    mask = torch.zeros((len(examples), length), dtype=torch.long)
    for row, (ids, labs) in enumerate(examples):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(labs)] = torch.tensor(labs)
        mask[row, : len(ids)] = 1
    return input_ids, mask, labels


def label_weight(labels: torch.Tensor, row_weight: torch.Tensor) -> torch.Tensor:
    """[B, T-1]: the weight of each next-token prediction (row_weight on labelled tokens, else 0)."""
    return (labels[:, 1:] != -100).float() * row_weight[:, None]


def weighted_lm_loss(logits: torch.Tensor, labels: torch.Tensor, row_weight: torch.Tensor,
                     total_weight: torch.Tensor | float | None = None) -> torch.Tensor:
    """Next-token cross entropy over labelled tokens, each row's tokens weighted by row_weight:
    sum(weight * ce) / total_weight (default: this batch's sum of weights; a data-parallel
    worker passes the global sum over the number of workers)."""
    weight = label_weight(labels, row_weight)
    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    total_weight = weight.sum() if total_weight is None else total_weight
    if float(total_weight) == 0:
        return logits.sum() * 0.0
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1).clamp(min=0),
                         reduction="none").view_as(weight)
    return (ce * weight).sum() / total_weight


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, floor: float = 0.1) -> float:
    """Learning-rate factor of `step` (0-based): linear warmup to 1 over `warmup_steps` steps
    ((step + 1) / warmup_steps), then cosine decay from 1 to `floor` at `total_steps` (held there
    after). For `torch.optim.lr_scheduler.LambdaLR`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
