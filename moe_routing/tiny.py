"""Tiny random-initialised MoE models of every supported architecture, built locally.

For tests, smoke runs and the demo: no hub download. Each model is a real transformers model of
its architecture (same router, experts, shared experts and dense layers), only very small.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerFast

from moe_routing.architectures import SUPPORTED_ARCHITECTURES

CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def chatml_tokenizer(core: Tokenizer) -> PreTrainedTokenizerFast:
    """A transformers tokenizer around `core` with the ChatML specials, template and left padding."""
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS[1:],
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    tokenizer.padding_side = "left"
    return tokenizer


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (256 byte tokens + ChatML specials) that needs no training."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {symbol: i for i, symbol in enumerate(sorted(alphabet))}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    return chatml_tokenizer(core)


def tiny_config(architecture: str, vocab_size: int, **overrides):
    """Config of a tiny model: 3 decoder layers, 8 routed experts, top-2."""
    from transformers import AutoConfig

    common = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        num_hidden_layers=3,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=512,
        num_experts_per_tok=2,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=None,
        eos_token_id=None,
    )
    per_architecture = {
        # mlp_only_layers gives a dense decoder layer, as real Qwen3 checkpoints may have.
        "qwen3_moe": dict(num_experts=8, moe_intermediate_size=32, intermediate_size=96,
                          head_dim=32, norm_topk_prob=True, mlp_only_layers=[1]),
        "qwen2_moe": dict(num_experts=8, moe_intermediate_size=32, intermediate_size=96,
                          shared_expert_intermediate_size=64, norm_topk_prob=False),
        "mixtral": dict(num_local_experts=8, intermediate_size=32, head_dim=32),
        "olmoe": dict(num_experts=8, intermediate_size=32, norm_topk_prob=False),
        "deepseek_v2": dict(n_routed_experts=8, n_shared_experts=1, moe_intermediate_size=32,
                            intermediate_size=96, first_k_dense_replace=1, kv_lora_rank=16,
                            q_lora_rank=None, qk_nope_head_dim=16, qk_rope_head_dim=16,
                            v_head_dim=16, num_key_value_heads=2, topk_method="greedy",
                            routed_scaling_factor=1.5,
                            n_group=1, topk_group=1),
    }
    if architecture not in per_architecture:
        raise ValueError(
            f"no tiny config for {architecture!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    kwargs = {**common, **per_architecture[architecture], **overrides}
    return AutoConfig.for_model(architecture, **kwargs)


def tiny_model(architecture: str, *, seed: int = 0, router_std: float = 1.0,
               vocab_size: int | None = None, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu", **overrides) -> PreTrainedModel:
    """A random causal LM of the given architecture, in eval mode: tiny unless `overrides` give
    it other shapes (a real model's layers: `benchmarks/gpu_check.py`, built on `device`).

    Router weights are re-drawn with ``router_std`` so routing is decisive (the default 0.02
    init makes every token's router probabilities nearly uniform).
    """
    if vocab_size is None:
        vocab_size = len(byte_tokenizer())
    config = tiny_config(architecture, vocab_size, **overrides)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                scale = router_std / param.shape[1] ** 0.5
                param.copy_(torch.randn(param.shape, generator=generator) * scale)
    return model.eval()


def save_tiny_checkpoint(architecture: str, path: str | Path, *, seed: int = 0, manifest: bool = False,
                         **overrides) -> Path:
    """Write a tiny model and its tokenizer as an ordinary HF checkpoint directory (`manifest`:
    with its routing manifest, `moe_routing.fingerprint`, for the gateway's integrity check)."""
    path = Path(path)
    model = tiny_model(architecture, seed=seed, **overrides)
    model.save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    if manifest:
        from moe_routing.fingerprint import write_manifest

        write_manifest(model, path)
    return path
