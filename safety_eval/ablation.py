"""Where refusal lives: how much each (layer, expert) pair's refusals depend on it, by ablation.

For each pair (l, e) alone, mask it (`moe_routing.instrument.mask_experts`: its router logit
biased so tokens route elsewhere) and measure how much less likely the model's own refusals
become. On n refused harmful prompts x_i with the model's own unattacked answers y_i (their first
T tokens, teacher-forced):

    drop[l, e] = (1/n) sum_i [ log p(y_i | x_i) - log p_{mask (l, e)}(y_i | x_i) ]

    effective refusal experts = exp(H(q)),   q = max(drop, 0) / sum max(drop, 0)

1 means every refusal hangs on one pair; L * E means masking any one pair costs the same. This is
the spread of the refusal *behaviour* over experts, unlike the routing-based count
(`moe_routing.stats.effective_safety_experts`: the spread of harmful-minus-benign routing
frequency), which an alignment that sends harmful tokens to a chosen set of experts narrows on
purpose even when it makes every one of them refuse. The cost is L * E teacher-forced forwards
of the n prompts (192 on the `fine` organism: seconds on a CPU; 6,144 on Qwen3-30B-A3B).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from moe_routing.architectures import describe
from moe_routing.instrument import mask_experts
from moe_routing.sft import collate, encode_chat
from moe_routing.stats import concentration


def answer_logprobs(model, tokenizer, prompts: Sequence[str], answers: Sequence[str], *, answer_tokens: int,
                    batch_size: int) -> np.ndarray:
    """log p(first `answer_tokens` tokens of each answer | its prompt), teacher-forced, per prompt."""
    out = []
    device = next(model.parameters()).device
    for start in range(0, len(prompts), batch_size):
        rows = []
        for prompt, answer in zip(prompts[start : start + batch_size], answers[start : start + batch_size]):
            ids, labels = encode_chat(tokenizer, prompt, answer)
            end = next(i for i, label in enumerate(labels) if label != -100) + answer_tokens
            rows.append((ids[:end], labels[:end]))  # later tokens cannot change these (causal): not fed
        input_ids, mask, labels = collate(rows, tokenizer.pad_token_id)
        input_ids, mask, labels = input_ids.to(device), mask.to(device), labels.to(device)
        with torch.no_grad():
            logits = model(input_ids=input_ids, attention_mask=mask).logits[:, :-1].float()
        targets = labels[:, 1:]
        picked = logits.log_softmax(-1).gather(-1, targets.clamp_min(0)[..., None]).squeeze(-1)
        out.append((picked * (targets != -100)).sum(-1).cpu().numpy())
    return np.concatenate(out)


def refusal_drops(model, tokenizer, prompts: Sequence[str], answers: Sequence[str], *, answer_tokens: int = 8,
                  batch_size: int = 32) -> np.ndarray:
    """drop[l, e] (module docstring) in nats per prompt, [L, E]."""
    if not prompts or len(prompts) != len(answers):
        raise ValueError("refusal ablation needs one answer per prompt, and at least one prompt")
    moe = describe(model)
    options = {"answer_tokens": answer_tokens, "batch_size": batch_size}
    unmasked = answer_logprobs(model, tokenizer, prompts, answers, **options)
    drops = np.zeros((moe.num_layers, moe.num_experts))
    for layer in range(moe.num_layers):
        for expert in range(moe.num_experts):
            with mask_experts(model, [(layer, expert)]):
                masked = answer_logprobs(model, tokenizer, prompts, answers, **options)
            drops[layer, expert] = float(np.mean(unmasked - masked))
    return drops


def effective_refusal_experts(drops: np.ndarray) -> float | None:
    """exp(entropy) of the positive drops over all pairs; None when no mask lowers a refusal."""
    positive = np.maximum(np.asarray(drops, dtype=np.float64), 0.0).reshape(1, -1)
    if positive.sum() <= 0:
        return None
    return float(concentration(positive, top_n=1).effective_experts[0])
