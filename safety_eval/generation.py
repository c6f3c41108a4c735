"""Chat generators: the one interface the evaluation drives, whatever serves the model.

`ChatGenerator` is a protocol: one user turn per prompt in, assistant text out. `HFChatGenerator`
runs a transformers model in process (greedy, batched, KV cache); attacks wrap it in routing
contexts from `moe_routing.instrument` (`attacked`). The serving probe replica provides another
implementation on a vLLM engine (`serving.engine_probes`), with the same `attacked`,
`profile_safety` and `shape`, so the suite runs either.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Protocol

import torch

from moe_routing.architectures import describe
from moe_routing.chat import chat_prompts


class ChatGenerator(Protocol):
    """A chat model: one user turn per prompt in, the assistant's reply text out (same order)."""

    def generate(self, prompts: Sequence[str], *, max_new_tokens: int) -> list[str]: ...


class HFChatGenerator:
    """Greedy decoding of a transformers causal LM, batched with left padding.

    `prefill_context`, when given, is entered around the prompt's forward pass only and left
    before decoding: the F-SOUR-style attack forces routing on the prompt, then lets the model
    answer with its own routing.
    """

    def __init__(self, model, tokenizer, *, batch_size: int = 64, max_prompt_tokens: int | None = None):
        if batch_size <= 0:
            raise ValueError("batch_size must be positive")
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_prompt_tokens = max_prompt_tokens

    engine_name = "transformers"

    @property
    def shape(self):
        """The model's MoE view (architecture, num_layers, num_experts, top_k)."""
        return describe(self.model)

    def attacked(self, attack):
        """`attack` (`safety_eval.attacks`) applied to the model meanwhile."""
        return attack.context(self.model)

    def profile_safety(self, harmful: Sequence[str], benign: Sequence[str]):
        """Routing of harmful vs benign prompts on this model (`safety_eval.attacks.SafetyProfile`)."""
        from moe_routing.profiler import ProfileSettings
        from safety_eval.attacks import profile_safety_routing

        return profile_safety_routing(self.model, self.tokenizer, harmful, benign,
                                      settings=ProfileSettings(batch_size=32))

    def chat_texts(self, prompts: Sequence[str]) -> list[str]:
        return chat_prompts(self.tokenizer, prompts)

    def encode(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded ids and attention mask of the chat-formatted prompts."""
        self.tokenizer.padding_side = "left"
        encoded = self.tokenizer(
            self.chat_texts(prompts),
            padding=True,
            add_special_tokens=False,
            truncation=self.max_prompt_tokens is not None,
            max_length=self.max_prompt_tokens,
            return_tensors="pt",
        )
        device = self.model.device
        return encoded["input_ids"].to(device), encoded["attention_mask"].to(device)

    def generate(
        self,
        prompts: Sequence[str],
        *,
        max_new_tokens: int = 32,
        prefill_context: Callable[[], contextlib.AbstractContextManager] | None = None,
    ) -> list[str]:
        if max_new_tokens <= 0:
            raise ValueError("max_new_tokens must be positive")
        # Sorting by length keeps padding (and wasted compute) low; answers go back in order.
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        answers: list[str] = [""] * len(prompts)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            texts = self._generate_batch([prompts[i] for i in chunk], max_new_tokens, prefill_context)
            for i, text in zip(chunk, texts):
                answers[i] = text
        return answers

    @torch.no_grad()
    def next_token_logits(self, prompts: Sequence[str]) -> torch.Tensor:
        """[len(prompts), vocab] logits of the first answer token, in prompt order (float32, CPU)."""
        rows = []
        for start in range(0, len(prompts), self.batch_size):
            input_ids, mask = self.encode(prompts[start : start + self.batch_size])
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                             logits_to_keep=1)
            rows.append(out.logits[:, -1].float().cpu())
        return torch.cat(rows)

    @torch.no_grad()
    def _generate_batch(self, prompts, max_new_tokens, prefill_context) -> list[str]:
        input_ids, mask = self.encode(prompts)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        with prefill_context() if prefill_context else contextlib.nullcontext():
            out = self.model(
                input_ids=input_ids,
                attention_mask=mask,
                position_ids=positions,
                use_cache=True,
                logits_to_keep=1,
            )
        eos = self.tokenizer.eos_token_id
        token = out.logits[:, -1].argmax(-1)
        generated = [token]
        done = token == eos
        past = out.past_key_values
        position = positions[:, -1:]
        for _ in range(max_new_tokens - 1):
            if bool(done.all()):
                break
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            position = position + 1
            out = self.model(
                input_ids=token[:, None],
                attention_mask=mask,
                position_ids=position,
                past_key_values=past,
                use_cache=True,
            )
            past = out.past_key_values
            token = torch.where(done, torch.full_like(token, eos), out.logits[:, -1].argmax(-1))
            generated.append(token)
            done = done | (token == eos)
        tokens = torch.stack(generated, dim=1).tolist()
        texts = []
        for row in tokens:
            if eos in row:
                row = row[: row.index(eos)]
            texts.append(self.tokenizer.decode(row, skip_special_tokens=True).strip())
        return texts
