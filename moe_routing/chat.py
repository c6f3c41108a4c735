"""Chat formatting: the one place a prompt becomes the text a chat model sees.

Every caller (profiling, generation, attacks, SFT encoding) renders a user turn through
:func:`chat_prompt`, so they all see the same template, the same generation prompt and the same
tokenization (no special tokens added: the template carries its own markers).
"""

from __future__ import annotations

from collections.abc import Sequence


def _check_template(tokenizer) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("chat formatting needs a tokenizer with a chat template (raw text needs none)")


def chat_prompt(tokenizer, prompt: str) -> str:
    """One user turn in the tokenizer's chat template, followed by the assistant's generation prompt."""
    _check_template(tokenizer)
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )


def chat_prompts(tokenizer, prompts: Sequence[str]) -> list[str]:
    return [chat_prompt(tokenizer, p) for p in prompts]


def chat_prompt_ids(tokenizer, prompt: str) -> list[int]:
    """Token ids of :func:`chat_prompt` (no special tokens added)."""
    return tokenizer(chat_prompt(tokenizer, prompt), add_special_tokens=False)["input_ids"]


def chat_exchange(tokenizer, prompt: str, response: str) -> tuple[str, str]:
    """(head, tail) text of a user/assistant exchange: head = :func:`chat_prompt`, tail = the
    assistant turn and its end-of-turn marker as the template writes them (trailing newlines cut).
    A template whose full exchange does not start with its generation prompt gets the bare
    response as the tail."""
    head = chat_prompt(tokenizer, prompt)
    full = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}], tokenize=False
    )
    tail = full[len(head):].rstrip("\n") if full.startswith(head) else response
    return head, tail
