"""MESA step 5 (and the baselines): train a chosen part of an MoE model on safety data.

One loop serves every method; only what is trainable and whether the OT-KL router loss is on
differ (see :data:`alignment.config.Method`). The pieces, each usable on its own:

- :func:`make_trainable` freezes the model and opens the parameters a method trains. Routed
  experts are fused ``[E, ...]`` tensors in transformers 5, so "train experts S of layer l" is a
  parametrization ``W + delta`` with `delta` on rows S only (:class:`RowDelta`): gradients and
  AdamW state exist for the selected rows alone, and every other row stays bit-identical.
- The reference ``P_ref`` comes from the same model in reference mode (deltas off, initial router
  weights): no second copy of the model in memory.
- :func:`router_targets` / :func:`ot_kl_loss` [paper + choice]: per token, the target routing
  distribution is the reference's ``P_ref``; for safety inputs (harmful requests) it is
  tilted towards the selected experts, ``P_ref * exp(-C~ / tau)`` renormalised with ``C~ = 0`` on
  the selected experts of that layer and 1 elsewhere. The loss is ``KL(target || P_phi)`` averaged
  over real tokens and MoE layers.
- Masking augmentation [ours, off by default]: some steps train under a mask of the experts that
  safety routing relies on at that moment (:class:`SafetyRouting`), the attack to survive.
- :func:`train_worker` is the Ray Train loop: deterministic batches by step, checkpoints every N
  steps (only the trainable values, plus optimizer and scheduler), resumes from the latest one.
- :func:`export_checkpoint` writes base weights + trained values as an ordinary HF checkpoint.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import tempfile
import time
from collections.abc import Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from alignment.config import AlignmentConfig, TrainingConfig
from alignment.data import Example, load_alignment_data
from moe_routing.architectures import MoEModel, RouterSpec, describe, route, router_probs
from moe_routing.files import atomic_directory
from moe_routing.fingerprint import write_manifest
from moe_routing.instrument import group_pairs, mask_experts
from moe_routing.sft import collate, encode_chat, warmup_cosine, weighted_lm_loss
from moe_routing.stats import top_pairs

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
TRAINABLE_FILE = "trainable.pt"
STATE_FILE = "train_state.pt"


def _log(message: str) -> None:
    print(message, flush=True)


# --- what is trained ----------------------------------------------------------------------------


class RowDelta(nn.Module):
    """Parametrization ``W -> W + delta`` on rows `rows` of a fused ``[E, ...]`` expert tensor.

    Only `delta` is trained, so gradients and optimizer state exist for the selected experts
    alone, and every other row of W stays bit-identical. Disabled, it returns W (the reference)."""

    def __init__(self, rows: Sequence[int], like: torch.Tensor):
        super().__init__()
        self.register_buffer("rows", torch.as_tensor(list(rows), dtype=torch.long, device=like.device),
                             persistent=False)
        shape = (len(rows), *like.shape[1:])
        self.delta = nn.Parameter(torch.zeros(shape, dtype=like.dtype, device=like.device))
        self.enabled = True

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.index_add(0, self.rows, self.delta) if self.enabled else weight


@dataclass
class Trainable:
    """What a method trains: `params` by name, plus the means to see the untrained reference."""

    params: dict[str, nn.Parameter]
    deltas: list[tuple[nn.Module, str, RowDelta]] = field(default_factory=list)
    routers: list[nn.Parameter] = field(default_factory=list)
    _router_reference: list[torch.Tensor] = field(default_factory=list)

    def __post_init__(self):
        self._router_reference = [p.detach().clone() for p in self.routers]

    def count(self) -> int:
        return sum(p.numel() for p in self.params.values())

    def state(self) -> dict[str, torch.Tensor]:
        return {name: param.detach().clone() for name, param in self.params.items()}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        missing = set(self.params) - set(state)
        if missing:
            raise ValueError(f"checkpoint lacks trained parameters {sorted(missing)[:3]}")
        with torch.no_grad():
            for name, param in self.params.items():
                param.copy_(state[name].to(param.dtype))

    @contextmanager
    def reference(self):
        """The model as it was before training (for P_ref), without a second copy of it: expert
        deltas off, router weights swapped back to their initial values."""
        for _, _, delta in self.deltas:
            delta.enabled = False
        current = [p.data for p in self.routers]
        for param, initial in zip(self.routers, self._router_reference):
            param.data = initial
        try:
            yield
        finally:
            for _, _, delta in self.deltas:
                delta.enabled = True
            for param, value in zip(self.routers, current):
                param.data = value

    def bake(self) -> None:
        """Write the expert deltas into the fused tensors and drop the parametrizations, so the
        model saves as an ordinary checkpoint with the original parameter names."""
        from torch.nn.utils import parametrize

        for module, name, _ in self.deltas:
            parametrize.remove_parametrizations(module, name, leave_parametrized=True)
        self.deltas = []


def make_trainable(
    model: nn.Module, method: str, experts: Sequence[tuple[int, int]] = (), *, lora_rank: int = 8
) -> tuple[nn.Module, Trainable]:
    """Freeze `model` except what `method` trains. Returns the model to train (a peft wrapper
    for ``lora``) and its :class:`Trainable`."""
    from torch.nn.utils import parametrize

    if method not in ("sft_all", "mesa", "router_only", "safex", "lora"):
        raise ValueError(f"unknown training method {method!r}")
    if method in ("mesa", "safex") and not experts:
        raise ValueError(f"method {method!r} needs at least one (layer, expert) to train")
    moe = describe(model)
    rows_by_layer = {layer: sorted(rows) for layer, rows in group_pairs(moe, experts).items()}
    rows_by_layer = rows_by_layer if method in ("mesa", "safex") else {}
    if method == "sft_all":
        return model, Trainable(dict(model.named_parameters()))  # (loaded models require grad)
    for param in model.parameters():
        param.requires_grad_(False)
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank, lora_dropout=0.0,
                            target_modules=LORA_TARGETS, bias="none")
        model = get_peft_model(model, config)
        return model, Trainable({n: p for n, p in model.named_parameters() if p.requires_grad})
    routers = [layer.router.weight for layer in moe.layers] if method in ("mesa", "router_only") else []
    deltas = []
    for layer_index, rows in rows_by_layer.items():
        layer = moe.layers[layer_index]
        if layer.fused_experts:
            for name, param in list(layer.experts.named_parameters(recurse=False)):
                if param.dim() >= 1 and param.shape[0] == layer.router_num_experts:
                    delta = RowDelta(rows, param)
                    parametrize.register_parametrization(layer.experts, name, delta)
                    deltas.append((layer.experts, name, delta))
        else:
            for expert in rows:
                for param in layer.experts[expert].parameters():
                    param.requires_grad_(True)
    for param in routers:
        param.requires_grad_(True)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    return model, Trainable(params, deltas, routers)


# --- losses -------------------------------------------------------------------------------------


def router_targets(reference: torch.Tensor, safety: torch.Tensor, selected: torch.Tensor,
                   tau: float) -> torch.Tensor:
    """Target routing distributions [N, E] of one layer.

    reference: P_ref [N, E] (rows sum to 1); safety: [N] bool, tokens of safety inputs;
    selected: [E] bool, this layer's selected experts. Safety tokens get
    P_ref * exp(-C~/tau) renormalised (C~ = 0 on selected experts, 1 elsewhere); the rest P_ref.
    A layer with no selected expert keeps P_ref for every token (a constant C~ cancels)."""
    tilt = torch.where(selected, 1.0, math.exp(-1.0 / tau)).to(reference.dtype)
    tilted = reference * tilt
    tilted = tilted / tilted.sum(dim=-1, keepdim=True)
    return torch.where(safety[:, None], tilted, reference)


def _distribution(logits: torch.Tensor, spec: RouterSpec) -> torch.Tensor:
    probs = router_probs(logits, spec)  # softmax, or per-expert sigmoid scores
    return probs / probs.sum(dim=-1, keepdim=True)


def ot_kl_loss(logits: Sequence[torch.Tensor], reference_logits: Sequence[torch.Tensor], spec: RouterSpec,
               safety: torch.Tensor, valid: torch.Tensor, selected: torch.Tensor, tau: float) -> torch.Tensor:
    """Mean over MoE layers of mean over real tokens of KL(target || P_phi).

    logits / reference_logits: per layer [N, E] (N = batch * length, row-major); safety, valid: [N]
    bool; selected: [L, E] bool."""
    losses = []
    for layer, (current, ref) in enumerate(zip(logits, reference_logits)):
        target = router_targets(_distribution(ref.detach(), spec), safety, selected[layer], tau)
        log_p = torch.log(_distribution(current, spec).clamp_min(1e-12))
        kl = (target * (torch.log(target.clamp_min(1e-12)) - log_p)).sum(dim=-1)
        losses.append(kl[valid].mean())
    return torch.stack(losses).mean()


class RouterLogits:
    """Keeps the router logits of each MoE layer from the latest forward pass (with their graph)."""

    def __init__(self, moe: MoEModel):
        self.logits: list[torch.Tensor | None] = [None] * moe.num_layers
        self.handles = [
            layer.router.register_forward_hook(self._hook(layer.index)) for layer in moe.layers
        ]

    def _hook(self, index: int):
        def hook(module, args, output):
            self.logits[index] = output[0] if isinstance(output, tuple) else output

        return hook

    def take(self) -> list[torch.Tensor]:
        out, self.logits = self.logits, [None] * len(self.logits)
        if any(t is None for t in out):
            raise RuntimeError("a MoE layer did not run its router in this forward pass")
        return out

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


# --- the training loop --------------------------------------------------------------------------


def learning_rate_factor(step: int, training: TrainingConfig) -> float:
    """Linear warmup, then cosine decay to 10% of the peak (`moe_routing.sft.warmup_cosine`)."""
    return warmup_cosine(step, training.warmup_steps, training.steps, floor=0.1)


def step_batch(step: int, seed: int, training: TrainingConfig, num_safety: int,
               num_general: int) -> list[tuple[str, int]]:
    """The global batch of `step`: ("safety" | "general", index) pairs, a pure function of
    (seed, step) so a resumed run sees exactly the batches an uninterrupted one would."""
    rng = random.Random(seed * 1_000_003 + step)
    general = round(training.batch_size * training.general_share) if num_general else 0
    rows = [("safety", rng.randrange(num_safety)) for _ in range(training.batch_size - general)]
    rows += [("general", rng.randrange(num_general)) for _ in range(general)]
    return rows


def _load_model(checkpoint: str, dtype: str, device: str):
    from moe_routing.profiler import load_checkpoint

    model, tokenizer = load_checkpoint(checkpoint, device=device, dtype=getattr(torch, dtype))
    tokenizer.padding_side = "right"
    return model, tokenizer


@dataclass
class Batch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    harmful: torch.Tensor  # [B] bool: safety inputs (the router target is tilted for them)
    row_weight: torch.Tensor  # [B] SFT weight: 1 for D_safe rows, `general_replay` for D_general


def make_batch(rows: Sequence[tuple[str, int]], encoded: dict, examples: dict, pad_id: int,
               general_replay: float, device) -> Batch:
    input_ids, mask, labels = collate([encoded[k][i] for k, i in rows], pad_id)
    is_general = torch.tensor([k == "general" for k, _ in rows])
    return Batch(
        input_ids.to(device), mask.to(device), labels.to(device),
        torch.tensor([examples[k][i].harmful for k, i in rows], device=device),
        torch.where(is_general, general_replay, 1.0).to(device),
    )


class SafetyRouting:
    """Which experts safety routing relies on *now*: running hit frequencies [L, E] of harmful-
    request tokens and of all other tokens (exponential average over unmasked training steps),
    started from the D_stat profile. Its top pairs by harmful-minus-other frequency are what a
    top-N masking attack would pick on the model being trained (masking augmentation)."""

    def __init__(self, harmful: np.ndarray, other: np.ndarray, top_k: int, decay: float = 0.9):
        self.harmful, self.other = np.asarray(harmful, float), np.asarray(other, float)
        self.top_k, self.decay = top_k, decay

    def update(self, logits: Sequence[torch.Tensor], spec: RouterSpec, harmful: torch.Tensor,
               valid: torch.Tensor) -> None:
        """Fold in one step's routing; with several data-parallel workers, all see the same sum."""
        kinds = torch.stack([harmful & valid, ~harmful & valid]).float()  # [2, N]
        selected = [route(current.detach(), spec)[1] for current in logits]
        hits = torch.stack([
            kinds @ torch.zeros(current.shape, device=current.device).scatter_(1, chosen, 1.0)
            for current, chosen in zip(logits, selected)
        ])  # [L, 2, E]: hit counts per kind
        counts = torch.cat([hits.flatten(), kinds.sum(dim=1)])
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(counts)
        hits, tokens = counts[:-2].view(hits.shape).cpu().numpy(), counts[-2:].cpu().numpy()
        for kind, running in enumerate((self.harmful, self.other)):
            if tokens[kind] > 0:
                running[:] = self.decay * running + (1 - self.decay) * hits[:, kind] / tokens[kind]

    def top(self, n: int) -> list[tuple[int, int]]:
        """The n most safety-critical pairs, leaving at least top_k routable experts per layer."""
        risk = self.harmful - self.other
        return top_pairs(risk, min(n, risk.shape[0] * (risk.shape[1] - self.top_k)), top_k=self.top_k)

    def state_dict(self) -> dict:
        return {"harmful": self.harmful.tolist(), "other": self.other.tolist()}

    def load_state_dict(self, state: dict) -> None:
        self.harmful, self.other = np.asarray(state["harmful"]), np.asarray(state["other"])


def augmentation_mask(step: int, seed: int, training: TrainingConfig, routing: SafetyRouting | None
                      ) -> list[tuple[int, int]]:
    """The (layer, expert) pairs masked during `step` (empty for most steps): with probability
    `mask_augmentation`, the current top-N safety-critical pairs, N uniform in 1..mask_max.
    A pure function of (seed, step, routing state), so resumed runs draw the same masks."""
    if routing is None or training.mask_augmentation == 0:
        return []
    rng = random.Random(seed * 7919 + step)
    if rng.random() >= training.mask_augmentation:
        return []
    return routing.top(rng.randint(1, training.mask_max))


def training_loss(model: nn.Module, trainable: Trainable, capture: RouterLogits | None, batch: Batch, *,
                  spec: RouterSpec, selected: torch.Tensor, training: TrainingConfig,
                  reference_model: nn.Module | None = None, router_loss: bool = True,
                  masked: Sequence[tuple[int, int]] = ()) -> tuple:
    """(loss, sft, router, router logits or None) of one batch. With `capture` and `router_loss`
    (mesa), the OT-KL router loss against the reference, computed by a second, gradient-free
    forward of the same model in reference mode. `masked` pairs are masked in both forwards (the
    captured logits are the router's own, before the mask)."""
    from torch.nn.utils import parametrize

    reference_model = reference_model or model
    mask = mask_experts(reference_model, masked) if masked else nullcontext()
    with mask:
        with parametrize.cached():  # W + delta once per layer, not once per expert access
            output = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
        sft = weighted_lm_loss(output.logits, batch.labels, batch.row_weight)
        router = torch.zeros((), device=sft.device)
        logits = capture.take() if capture is not None else None
        if logits is None or not router_loss:
            return sft, sft, router, logits
        with torch.no_grad(), trainable.reference(), parametrize.cached():
            reference_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
        reference_logits = capture.take()
    tokens = batch.input_ids.shape[1]
    router = ot_kl_loss(logits, reference_logits, spec, batch.harmful.repeat_interleave(tokens),
                        batch.attention_mask.bool().reshape(-1), selected, training.router_tau)
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


def train_worker(job: dict) -> None:
    """Ray Train's per-worker loop. `job`: config (dict), checkpoint, experts (the trained
    (layer, expert) pairs), selected (the router target's experts, mesa)."""
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

    model, tokenizer = _load_model(job["checkpoint"], training.dtype, str(device))
    moe = describe(model)
    model, trainable = make_trainable(
        model, training.method, [tuple(p) for p in job["experts"]], lora_rank=training.lora_rank
    )
    selected = torch.zeros(moe.num_layers, moe.num_experts, dtype=torch.bool, device=device)
    for layer, expert in job.get("selected", []):
        selected[layer, expert] = True

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
    if world > 1:
        model = ray.train.torch.prepare_model(model, move_to_device=False)
    use_router_loss = training.method == "mesa" and training.gamma > 0
    routing = None
    if training.mask_augmentation > 0:
        routing = SafetyRouting(job["safety_frequency"], job["general_frequency"], moe.top_k)
        if state is not None:
            routing.load_state_dict(state["routing"])
    capture = RouterLogits(moe) if use_router_loss or routing is not None else None
    model.train()
    # Training-loop seconds, summed over resumed runs (Ray start-up and data loading excluded).
    elapsed = next((h["seconds"] for h in reversed(history) if "seconds" in h), 0.0)
    started = time.monotonic()
    for step in range(start, training.steps):
        rows = step_batch(step, config.seed, training, len(data.safety), len(data.general))[rank::world]
        batch = make_batch(rows, encoded, examples, tokenizer.pad_token_id, training.general_replay, device)
        masked = augmentation_mask(step, config.seed, training, routing)
        loss, sft, router, logits = training_loss(
            model, trainable, capture, batch, spec=moe.router, selected=selected, training=training,
            reference_model=inner, router_loss=use_router_loss, masked=masked,
        )
        if routing is not None and not masked:
            tokens = batch.input_ids.shape[1]
            routing.update(logits, moe.router, batch.harmful.repeat_interleave(tokens),
                           batch.attention_mask.bool().reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(trainable.params.values()), training.grad_clip)
        optimizer.step()
        scheduler.step()
        done = step + 1
        history.append({"step": done, "loss": loss.item(), "sft": sft.item(), "router": router.item(),
                        "masked": len(masked), "seconds": round(elapsed + time.monotonic() - started, 1)})
        metrics = history[-1]
        if done % training.checkpoint_every == 0 or done == training.steps:
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
    if capture is not None:
        capture.close()


# --- export -------------------------------------------------------------------------------------


def export_checkpoint(config: AlignmentConfig, base_checkpoint: str | Path, trained_dir: str | Path,
                      experts: Sequence[tuple[int, int]], output_dir: str | Path, info: dict) -> Path:
    """The base checkpoint with the trained values applied, saved as an ordinary HF checkpoint
    (LoRA merged), plus `alignment.json` and the base's held-out `eval_sets.json`. Atomic."""
    output_dir = Path(output_dir)
    model, tokenizer = _load_model(str(base_checkpoint), "float32", "cpu")
    dtype = model.dtype
    model, trainable = make_trainable(
        model, config.training.method, experts, lora_rank=config.training.lora_rank
    )
    trainable.load_state(torch.load(Path(trained_dir) / TRAINABLE_FILE, map_location="cpu"))
    trainable.bake()
    if config.training.method == "lora":
        model = model.merge_and_unload()
    model = model.to(dtype)
    tokenizer.padding_side = "left"
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
