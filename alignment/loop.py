"""MESA step 5 (and the baselines): the training loop, one for every method.

:func:`train_worker` is the Ray Train loop: deterministic batches by step
(:func:`step_batch`), the loss of :func:`training_loss` (SFT, plus the OT-KL router loss of
:mod:`alignment.router_loss` for the methods that use it), checkpoints every N steps (only the
trainable values, plus optimizer and scheduler), and resume from the latest one. What trains is
:mod:`alignment.trainable`; training under attack-like routing is :mod:`alignment.augment`.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Sequence
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from alignment.augment import SafetyRouting, augmentation_mask, forced_routes, step_rng
from alignment.config import AlignmentConfig, TrainingConfig
from alignment.data import Example, load_alignment_data
from alignment.distributed import global_sum, world_size
from alignment.methods import method_spec
from alignment.router_loss import TiltTarget, TransportTarget, ot_kl_loss
from alignment.trainable import Trainable, load_model, make_trainable, unwrapped
from moe_routing.architectures import RouterSpec, describe
from moe_routing.instrument import RouterLogits, capture_router_logits, force_experts, mask_experts
from moe_routing.sft import collate, encode_chat, label_weight, warmup_cosine, weighted_lm_loss

TRAINABLE_FILE = "trainable.pt"
STATE_FILE = "train_state.pt"


def _log(message: str) -> None:
    print(message, flush=True)


def learning_rate_factor(step: int, training: TrainingConfig) -> float:
    """Linear warmup, then cosine decay to 10% of the peak (`moe_routing.sft.warmup_cosine`)."""
    return warmup_cosine(step, training.warmup_steps, training.steps, floor=0.1)


def step_batch(step: int, seed: int, training: TrainingConfig, num_safety: int,
               num_general: int) -> list[tuple[str, int]]:
    """The global batch of `step`: ("safety" | "general", index) pairs, a pure function of
    (seed, step) so a resumed run sees exactly the batches an uninterrupted one would."""
    rng = step_rng("batch", seed, step)
    general = round(training.batch_size * training.general_share) if num_general else 0
    rows = [("safety", rng.randrange(num_safety)) for _ in range(training.batch_size - general)]
    rows += [("general", rng.randrange(num_general)) for _ in range(general)]
    return rows



@dataclass
class Batch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    harmful: torch.Tensor  # [B] bool: safety inputs (the router target is tilted for them)
    # [B] SFT weight: `refusal_weight` for harmful rows of D_safe, 1 for its benign rows,
    # `general_replay` for D_general
    row_weight: torch.Tensor


def make_batch(rows: Sequence[tuple[str, int]], encoded: dict, examples: dict, pad_id: int,
               training: TrainingConfig, device) -> Batch:
    input_ids, mask, labels = collate([encoded[k][i] for k, i in rows], pad_id)
    is_general = torch.tensor([k == "general" for k, _ in rows])
    harmful = torch.tensor([examples[k][i].harmful for k, i in rows])
    weight = torch.where(is_general, training.general_replay,
                         torch.where(harmful, training.refusal_weight, 1.0))
    return Batch(input_ids.to(device), mask.to(device), labels.to(device), harmful.to(device),
                 weight.to(device))


def router_target(training: TrainingConfig, safety_set: torch.Tensor, cost: torch.Tensor):
    """The router loss's target for safety tokens: transport onto D, or the paper's tilt."""
    if training.router_target == "transport":
        return TransportTarget(safety_set, cost, training.router_eps)
    return TiltTarget(safety_set, training.router_tau)


def training_loss(model: nn.Module, trainable: Trainable, capture: RouterLogits | None, batch: Batch, *,
                  spec: RouterSpec, target, training: TrainingConfig,
                  reference_model: nn.Module | None = None, router_loss: bool = True,
                  masked: Sequence[tuple[int, int]] = (), forced: dict | None = None) -> tuple:
    """(loss, sft, router, router logits or None) of one batch. With `capture` (the routing
    core's raw-logit capture on `reference_model`) and `router_loss`, the OT-KL router loss
    against the reference, computed by a second, gradient-free forward of the same model in
    reference mode. `masked` pairs are masked and `forced` routes forced in both forwards; the
    captured logits are the router's own, before either. Both losses are divided by global
    counts (`alignment.distributed`), so data-parallel workers train what one worker would."""
    reference_model = reference_model or model
    world = world_size()
    valid = batch.attention_mask.bool().reshape(-1)
    weight_total = global_sum(label_weight(batch.labels, batch.row_weight).sum()) / world
    token_total = global_sum(valid.sum().float()) / world
    with ExitStack() as routes:
        if masked:
            routes.enter_context(mask_experts(reference_model, masked))
        if forced:
            routes.enter_context(force_experts(reference_model, forced))
        with trainable.materialized():  # W + delta once per layer forward, not per expert access
            output = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
        sft = weighted_lm_loss(output.logits, batch.labels, batch.row_weight, weight_total)
        router = torch.zeros((), device=sft.device)
        logits = capture.take() if capture is not None else None
        if logits is None or not router_loss:
            return sft, sft, router, logits
        with torch.no_grad(), trainable.reference(), trainable.materialized():
            reference_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
        reference_logits = capture.take()
    tokens = batch.input_ids.shape[1]
    router = ot_kl_loss(logits, reference_logits, spec, batch.harmful.repeat_interleave(tokens), valid,
                        target, token_total)
    return sft + training.gamma * router, sft, router, logits


def _load_checkpoint(directory: Path, trainable: Trainable, device) -> dict:
    state = torch.load(directory / STATE_FILE, map_location=device, weights_only=False)
    trainable.load_state(torch.load(directory / TRAINABLE_FILE, map_location=device))
    return state


def checkpoint_directories(root: Path) -> list[Path]:
    """Checkpoint directories under `root` whose state file loads, newest step first."""
    candidates = []
    for directory in Path(root).glob("checkpoint_*"):
        try:
            step = torch.load(directory / STATE_FILE, map_location="cpu", weights_only=False)["step"]
        except Exception:  # incomplete (killed mid-write): skip
            continue
        candidates.append((step, str(directory)))
    return [Path(d) for _, d in sorted(candidates, reverse=True)]


def _latest_checkpoint(root: Path, trainable: Trainable, device) -> dict | None:
    """The newest complete checkpoint under `root`. Ray Train restores from its own record of
    reported checkpoints; a job killed after a checkpoint was written but before that record
    was saved would otherwise start over."""
    for directory in checkpoint_directories(root):
        try:
            return _load_checkpoint(directory, trainable, device)
        except Exception:
            continue
    return None


def load_trainable(checkpoint: str, training: TrainingConfig, experts, device: torch.device):
    """(model, Trainable, tokenizer) as a training worker holds them: the whole model, or with
    training.sharding fsdp its frozen weights sharded over the process group (FSDP2)."""
    if training.sharding == "fsdp":
        from alignment.sharding import load_sharded

        return load_sharded(checkpoint, training.method, experts, device, dtype=training.dtype,
                            lora_rank=training.lora_rank)
    model, tokenizer = load_model(checkpoint, training.dtype, str(device))
    model, trainable = make_trainable(model, training.method, experts, lora_rank=training.lora_rank)
    return model, trainable, tokenizer


def train_worker(job: dict) -> None:
    """Ray Train's per-worker loop. `job`: config (dict), checkpoint, experts (the trained
    (layer, expert) pairs), safety_set (D: where the router target sends safety tokens), cost
    (the allocation's [L, E] cost), safety/general frequency (masking augmentation's start)."""
    import ray.train
    import ray.train.torch

    config = AlignmentConfig.model_validate(job["config"])
    training = config.training
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    if training.threads:
        torch.set_num_threads(training.threads)
    device = ray.train.torch.get_device() if training.use_gpu else torch.device("cpu")
    torch.manual_seed(config.seed)

    sharded = training.sharding == "fsdp"
    model, trainable, tokenizer = load_trainable(job["checkpoint"], training,
                                                 [tuple(p) for p in job["experts"]], device)
    moe = describe(unwrapped(model))
    safety_set = torch.zeros(moe.num_layers, moe.num_experts, dtype=torch.bool, device=device)
    for layer, expert in job.get("safety_set", []):
        safety_set[layer, expert] = True
    cost = torch.as_tensor(job.get("cost") or [[1.0] * moe.num_experts] * moe.num_layers, device=device)
    target = router_target(training, safety_set, cost)
    members = {layer: row.nonzero().flatten().tolist() for layer, row in enumerate(safety_set)}

    data = load_alignment_data(config, job["checkpoint"])
    examples: dict[str, list[Example]] = {"safety": data.safety, "general": data.general}
    encoded = {
        kind: [encode_chat(tokenizer, e.prompt, e.response, training.max_length) for e in rows]
        for kind, rows in examples.items()
    }

    optimizer = torch.optim.AdamW(
        list(trainable.params.values()), lr=training.learning_rate, weight_decay=0.0, betas=(0.9, 0.95)
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: learning_rate_factor(s, training))
    start, history, state = 0, [], None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as directory:
            state = _load_checkpoint(Path(directory), trainable, device)
    elif job.get("checkpoint_root"):
        state = _latest_checkpoint(Path(job["checkpoint_root"]), trainable, device)
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start, history = state["step"], state["history"]
        if rank == 0:
            _log(f"[train] resumed at step {start}/{training.steps}")
    inner = model
    if world > 1 and not sharded:
        model = ray.train.torch.prepare_model(model, move_to_device=False)
    use_router_loss = method_spec(training.method).router_loss and training.gamma > 0
    routing = None
    if training.mask_augmentation > 0:
        routing = SafetyRouting(job["safety_frequency"], job["general_frequency"], moe.top_k)
        if state is not None:
            routing.load_state_dict(state["routing"])
    # Training-loop seconds, summed over resumed runs (Ray start-up and data loading excluded).
    elapsed = next((h["seconds"] for h in reversed(history) if "seconds" in h), 0.0)
    started = time.monotonic()
    # The routing core owns the hooks: raw router logits (graph kept) for the router loss and for
    # the masking augmentation's running estimate.
    needs_logits = use_router_loss or routing is not None
    with capture_router_logits(inner) if needs_logits else nullcontext() as capture:
        model.train()
        for step in range(start, training.steps):
            rows = step_batch(step, config.seed, training, len(data.safety), len(data.general))
            batch = make_batch(rows[rank::world], encoded, examples, tokenizer.pad_token_id, training, device)
            masked = augmentation_mask(step, config.seed, training, routing)
            # Drawn for the global batch, then this worker's rows: the routes one worker would draw.
            forced = forced_routes(step, config.seed, training, members, moe.top_k,
                                   [examples[kind][i].harmful for kind, i in rows], batch.input_ids.shape[1],
                                   masked)
            forced = {layer: routes[rank::world] for layer, routes in forced.items()}
            loss, sft, router, logits = training_loss(
                model, trainable, capture, batch, spec=moe.router, target=target, training=training,
                reference_model=inner, router_loss=use_router_loss, masked=masked, forced=forced,
            )
            if routing is not None and not masked and not forced:
                tokens = batch.input_ids.shape[1]
                routing.update(logits, moe.router, batch.harmful.repeat_interleave(tokens),
                               batch.attention_mask.bool().reshape(-1))
            if not torch.isfinite(loss):  # stop before the step writes NaN into the weights
                raise FloatingPointError(
                    f"non-finite training loss at step {step + 1} ({len(masked)} pairs masked, "
                    f"routes {'forced' if forced else 'free'}); the checkpoints before it are intact")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if sharded:
                from alignment.sharding import average_gradients

                average_gradients(trainable.params.values())  # DDP does this without sharding
            torch.nn.utils.clip_grad_norm_(list(trainable.params.values()), training.grad_clip)
            optimizer.step()
            scheduler.step()
            done = step + 1
            # Each worker's loss is its tokens' sum over the global count / world: the mean over
            # workers is the global batch's loss.
            loss, sft, router = (global_sum(value) / world for value in (loss, sft, router))
            history.append({"step": done, "loss": loss.item(), "sft": sft.item(), "router": router.item(),
                            "masked": len(masked), "forced": bool(forced),
                            "seconds": round(elapsed + time.monotonic() - started, 1)})
            if done % training.checkpoint_every == 0 or done == training.steps:
                _save(done, trainable, optimizer, scheduler, history, routing, rank, training)


def _save(done: int, trainable: Trainable, optimizer, scheduler, history: list[dict],
          routing: SafetyRouting | None, rank: int, training: TrainingConfig) -> None:
    """Report step `done` to Ray Train; rank 0 attaches the checkpoint (trained values, optimizer,
    scheduler, history, routing estimate)."""
    import ray.train

    metrics = history[-1]
    if rank == 0:
        _log(f"[train] step {done}/{training.steps} loss {metrics['loss']:.4f} "
             f"(sft {metrics['sft']:.4f}, router {metrics['router']:.4f}) {metrics['seconds']} s")
    with tempfile.TemporaryDirectory() as directory:
        if rank == 0:
            torch.save(trainable.state(), Path(directory) / TRAINABLE_FILE)
            state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                     "step": done, "history": history,
                     "routing": routing.state_dict() if routing else None}
            torch.save(state, Path(directory) / STATE_FILE)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))
        else:
            ray.train.report(metrics)
