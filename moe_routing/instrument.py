"""Routing instrumentation on Hugging Face MoE models, as composable context managers.

- :func:`capture_routing` records, per token and MoE layer, the selected experts, their weights
  and (optionally) the router probabilities, attributed to sequence and position, with prompt
  tokens told apart from generated ones.
- :func:`mask_experts` adds a large negative *finite* bias to the router logits of chosen
  (layer, expert) pairs, so tokens re-route to the next-best experts.
- :func:`scale_routing` multiplies routed weights (globally, per layer or per expert).
- :func:`force_experts` makes every token of a layer select the given experts (or, with a
  ``[batch, length, n]`` tensor, given experts per (sequence, token) of a prefill pass).
- :func:`capture_router_logits` keeps each layer's raw router logits *with their autograd graph*
  (the router's own output, before any modifier), for losses on the routing itself.

All of them are forward hooks on the routers (``mlp.gate``) owned by one controller per model:
modifiers apply in the order their contexts were entered, then captures see the final decision
(logit captures see the router's output before the modifiers, whatever the order of entry).
No parameter is ever touched, so leaving a context restores the model bit for bit; the hooks are
removed when the last context exits. They work under ``generate`` and under autograd.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from moe_routing.architectures import (
    MoEModel,
    RouterSpec,
    describe,
    route,
    router_probs,
    routing_weights,
)

# exp(-1e4) underflows to 0 in float32: a masked expert gets no probability and is never
# selected, while the value stays finite in fp16/bf16 (no NaN from inf - inf).
DEFAULT_MASK_BIAS = -1e4

Decision = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (logits, weights, indices)


# --------------------------------------------------------------------------- modifiers


class _Modifier:
    def apply(self, layer: int, decision: Decision, spec: RouterSpec, past: int = 0) -> Decision:
        """`past`: tokens already in the KV cache of the current forward (0 = prefill)."""
        raise NotImplementedError


class _ExpertMask(_Modifier):
    def __init__(self, by_layer: Mapping[int, list[int]], bias: float):
        self.by_layer = by_layer
        self.bias = bias

    def apply(self, layer, decision, spec, past=0):
        experts = self.by_layer.get(layer)
        if not experts:
            return decision
        logits = decision[0].clone()
        logits[:, experts] += self.bias
        weights, indices = route(logits, spec)
        return logits, weights, indices


class _RoutingScale(_Modifier):
    def __init__(self, factor: float, layers: set[int] | None, experts: Mapping[int, list[int]] | None):
        self.factor = factor
        self.layers = layers
        self.experts = experts

    def apply(self, layer, decision, spec, past=0):
        logits, weights, indices = decision
        if self.experts is not None:
            chosen = self.experts.get(layer)
            if not chosen:
                return decision
            hit = torch.isin(indices, torch.tensor(chosen, device=indices.device))
            factor = torch.where(hit, self.factor, 1.0).to(weights.dtype)
            return logits, weights * factor, indices
        if self.layers is not None and layer not in self.layers:
            return decision
        return logits, weights * self.factor, indices


class _ForcedExperts(_Modifier):
    """Forced experts per layer: a list for every token, a [batch, n] tensor, one row per
    sequence (rows of the flattened [batch * length] tokens follow their sequence), or a
    [batch, length, n] tensor per (sequence, prompt position) of a prefill pass or of a pass
    continuing a cached prompt prefix, -1 rows leaving a token alone (decoding steps, past the
    prompt, are left alone too)."""

    def __init__(self, by_layer: Mapping[int, list[int] | torch.Tensor]):
        self.by_layer = by_layer

    def apply(self, layer, decision, spec, past=0):
        forced = self.by_layer.get(layer)
        if forced is None:
            return decision
        if isinstance(forced, torch.Tensor) and forced.dim() == 3:
            return self._per_token(forced, decision, spec, past)
        logits, weights, _ = decision
        probs = router_probs(logits, spec)
        # Probabilities are <= 1, so 2 ranks the forced experts first; any remaining slots go
        # to the best other experts. Weights follow the architecture's own rule.
        candidates = probs.detach().clone()
        if isinstance(forced, torch.Tensor):
            if candidates.shape[0] % forced.shape[0]:
                raise ValueError(f"per-sequence forcing for {forced.shape[0]} sequences, but the batch has "
                                 f"{candidates.shape[0]} tokens (not a multiple)")
            rows = forced.to(candidates.device).repeat_interleave(candidates.shape[0] // forced.shape[0], 0)
            candidates.scatter_(1, rows, 2.0)
        else:
            candidates[:, forced] = 2.0
        indices = torch.topk(candidates, k=spec.top_k, dim=-1).indices
        return logits, routing_weights(probs, indices, spec, weights.dtype), indices

    @staticmethod
    def _per_token(forced, decision, spec, past):
        # Entry [b, t] forces the token at position t, so a pass that continues a KV cache of the
        # prompt's first `past` tokens (F-SOUR's shared prefix) gets positions past.. of each row.
        logits, weights, indices = decision
        batch, length, n = forced.shape
        if past >= length:
            return decision  # a decoding step: the forcing covers the prompt's prefill only
        span = logits.shape[0] // batch if logits.shape[0] % batch == 0 else -1
        if (past == 0 and span != length) or not 0 < span <= length - past:
            raise ValueError(f"per-token forcing for {batch} x {length} prompt tokens, but the pass has "
                             f"{logits.shape[0]} tokens after {past} cached")
        rows = forced[:, past : past + span].to(logits.device).reshape(-1, n)
        hit = rows[:, 0] >= 0
        probs = router_probs(logits, spec)
        candidates = probs.detach().clone()
        candidates[hit] = candidates[hit].scatter(1, rows[hit], 2.0)
        chosen = torch.topk(candidates, k=spec.top_k, dim=-1).indices
        new_weights = routing_weights(probs, chosen, spec, weights.dtype)
        # Tokens without forcing keep their decision exactly (same ids, same weights, same order).
        keep = hit[:, None]
        return (logits, torch.where(keep, new_weights, weights),
                torch.where(keep, chosen, indices.to(chosen.dtype)))


# --------------------------------------------------------------------------- capture


@dataclass
class RoutingTrace:
    """Per-token routing of the captured forward passes (pad tokens excluded).

    Row n is one token: ``sequence[n]`` numbers the sequence (in the order batches were seen,
    rows within a batch), ``position[n]`` is its index among that sequence's real tokens, and
    ``generated[n]`` is False for prompt tokens, True for tokens fed back during generation.
    """

    expert_ids: torch.Tensor  # [N, L, k] int64
    weights: torch.Tensor  # [N, L, k] float32
    probs: torch.Tensor | None  # [N, L, E] float32, None unless captured with probabilities
    sequence: torch.Tensor  # [N] int64
    position: torch.Tensor  # [N] int64
    generated: torch.Tensor  # [N] bool

    @property
    def num_tokens(self) -> int:
        return int(self.sequence.shape[0])


@dataclass
class _Step:
    """One forward call: which flattened rows are real tokens, and where they sit."""

    batch: int
    length: int
    valid: torch.Tensor  # [B, t] bool
    position: torch.Tensor  # [B, t]
    generated: bool


class RoutingCapture:
    """Collects router decisions; read them with :meth:`trace` or :meth:`drain`."""

    def __init__(self, moe: MoEModel, probabilities: bool):
        self.moe = moe
        self.probabilities = probabilities
        self._steps: list[tuple[_Step, int, dict[int, Decision]]] = []
        self._sequences_seen = 0  # sequences of earlier prompt batches
        self._last_batch = 0

    def _begin_step(self, step: _Step) -> None:
        if not step.generated:  # a new prompt batch: number its rows after the earlier ones
            self._sequences_seen += self._last_batch
            self._last_batch = step.batch
        self._steps.append((step, self._sequences_seen, {}))

    def _record(self, layer: int, decision: Decision) -> None:
        if not self._steps:
            return  # a router called outside a model forward: nothing to attribute it to
        logits, weights, indices = decision
        kept_logits = logits.detach() if self.probabilities else None
        self._steps[-1][2][layer] = (kept_logits, weights.detach(), indices.detach())

    def trace(self) -> RoutingTrace:
        """Everything captured so far."""
        return self._build(self._steps)

    def drain(self) -> RoutingTrace:
        """Everything captured so far, then forget it (for streaming over a dataset)."""
        steps, self._steps = self._steps, []
        return self._build(steps)

    def _build(self, steps) -> RoutingTrace:
        L, E, k = self.moe.num_layers, self.moe.num_experts, self.moe.top_k
        ids, wts, probs, seq, pos, gen = [], [], [], [], [], []
        for step, first_sequence, decisions in steps:
            if len(decisions) != L:
                continue  # an interrupted forward (exception mid-model): not a full token record
            valid = step.valid.reshape(-1)
            layers = [decisions[layer] for layer in range(L)]
            ids.append(torch.stack([d[2] for d in layers], dim=1)[valid].long().cpu())
            wts.append(torch.stack([d[1] for d in layers], dim=1)[valid].float().cpu())
            if self.probabilities:
                stacked = torch.stack([d[0] for d in layers], dim=1)[valid]
                probs.append(router_probs(stacked, self.moe.router).cpu())
            sequence = (first_sequence + torch.arange(step.batch))[:, None].expand(step.batch, step.length)
            seq.append(sequence.reshape(-1)[valid.cpu()])
            pos.append(step.position.reshape(-1)[valid].cpu())
            gen.append(torch.full((int(valid.sum()),), step.generated, dtype=torch.bool))
        if not ids:
            empty = torch.zeros(0, dtype=torch.long)
            return RoutingTrace(
                torch.zeros(0, L, k, dtype=torch.long),
                torch.zeros(0, L, k),
                torch.zeros(0, L, E) if self.probabilities else None,
                empty,
                empty.clone(),
                torch.zeros(0, dtype=torch.bool),
            )
        return RoutingTrace(
            torch.cat(ids),
            torch.cat(wts),
            torch.cat(probs) if self.probabilities else None,
            torch.cat(seq),
            torch.cat(pos),
            torch.cat(gen),
        )


class RouterLogits:
    """The raw router logits [tokens, E] of each MoE layer from the latest forward pass, graph
    kept (read with :meth:`take`)."""

    def __init__(self, moe: MoEModel):
        self.logits: list[torch.Tensor | None] = [None] * moe.num_layers

    def _record_raw(self, layer: int, logits: torch.Tensor) -> None:
        self.logits[layer] = logits

    def take(self) -> list[torch.Tensor]:
        """Every layer's logits of the latest forward, then forget them."""
        out, self.logits = self.logits, [None] * len(self.logits)
        if any(t is None for t in out):
            raise RuntimeError("a MoE layer did not run its router in this forward pass")
        return out


# --------------------------------------------------------------------------- controller


class _Controller:
    """Owns the hooks of one model while any routing context is open on it."""

    def __init__(self, model: nn.Module, moe: MoEModel):
        self.moe = moe
        self.modifiers: list[_Modifier] = []
        self.captures: list[RoutingCapture] = []
        self.logit_captures: list[RouterLogits] = []
        self.past = 0  # KV-cache length of the forward in progress (0 = prefill)
        base = getattr(model, "model", model)
        self.handles = [base.register_forward_pre_hook(self._on_forward, with_kwargs=True)]
        for layer in moe.layers:
            self.handles.append(layer.router.register_forward_hook(self._router_hook(layer.index)))

    @property
    def idle(self) -> bool:
        return not self.modifiers and not self.captures and not self.logit_captures

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()

    def _router_hook(self, layer: int):
        spec = self.moe.router

        def hook(module, args, output):
            decision = tuple(output)
            for capture in self.logit_captures:
                capture._record_raw(layer, decision[0])
            for modifier in self.modifiers:
                decision = modifier.apply(layer, decision, spec, self.past)
            for capture in self.captures:
                capture._record(layer, decision)
            return decision

        return hook

    def _on_forward(self, module, args, kwargs):
        cache = kwargs.get("past_key_values")
        past = self.past = cache.get_seq_length() if cache is not None else 0
        if not self.captures:
            return None
        tokens = kwargs.get("input_ids", args[0] if args else None)
        if tokens is None:
            tokens = kwargs["inputs_embeds"]
        batch, length = tokens.shape[0], tokens.shape[1]
        mask = kwargs.get("attention_mask")
        device = tokens.device
        if mask is None or mask.dim() != 2:
            valid = torch.ones(batch, length, dtype=torch.bool, device=device)
            position = (past + torch.arange(length, device=device)).expand(batch, length)
        else:
            mask = mask.bool()
            position = (mask.long().cumsum(dim=1) - 1)[:, -length:]
            valid = mask[:, -length:]
        step = _Step(batch, length, valid, position, generated=past > 0)
        for capture in self.captures:
            capture._begin_step(step)
        return None


_CONTROLLERS: weakref.WeakKeyDictionary[nn.Module, _Controller] = weakref.WeakKeyDictionary()


@contextmanager
def _registered(model: nn.Module, moe: MoEModel, kind: str, item) -> Iterator[_Controller]:
    controller = _CONTROLLERS.get(model)
    if controller is None:
        controller = _CONTROLLERS[model] = _Controller(model, moe)
    getattr(controller, kind).append(item)
    try:
        yield controller
    finally:
        getattr(controller, kind).remove(item)
        if controller.idle:
            controller.close()
            del _CONTROLLERS[model]


def group_pairs(moe: MoEModel, pairs: Iterable[tuple[int, int]]) -> dict[int, list[int]]:
    by_layer: dict[int, list[int]] = {}
    for pair in pairs:
        try:
            layer, expert = (int(v) for v in pair)
        except (TypeError, ValueError):
            raise ValueError(f"expected (layer, expert) pairs of integers, got {pair!r}") from None
        moe.check_expert(layer, expert)
        if expert not in by_layer.setdefault(layer, []):
            by_layer[layer].append(expert)
    return by_layer


# --------------------------------------------------------------------------- public API


@contextmanager
def capture_router_logits(model: nn.Module) -> Iterator[RouterLogits]:
    """Keep the raw router logits of every MoE layer of each forward pass inside the block, with
    their graph (a loss on them trains the routers). They are the router's own output: masks,
    scaling and forcing entered before or after do not change what is captured."""
    moe = describe(model)
    capture = RouterLogits(moe)
    with _registered(model, moe, "logit_captures", capture):
        yield capture


@contextmanager
def capture_routing(model: nn.Module, *, probabilities: bool = True) -> Iterator[RoutingCapture]:
    """Record the routing of every forward pass inside the block.

    ``probabilities=False`` keeps only expert ids and weights (cheaper, for profiling).
    """
    moe = describe(model)
    capture = RoutingCapture(moe, probabilities)
    with _registered(model, moe, "captures", capture):
        yield capture


@contextmanager
def mask_experts(
    model: nn.Module, pairs: Iterable[tuple[int, int]], *, bias: float = DEFAULT_MASK_BIAS
) -> Iterator[None]:
    """Bias the router logits of the given (MoE layer, expert) pairs so tokens route elsewhere."""
    if not (math.isfinite(bias) and bias < 0):
        raise ValueError(f"mask bias must be a finite negative number, got {bias!r}")
    moe = describe(model)
    by_layer = group_pairs(moe, pairs)
    for layer, experts in by_layer.items():
        if len(experts) > moe.num_experts - moe.top_k:
            raise ValueError(
                f"cannot mask {len(experts)} of {moe.num_experts} experts in MoE layer {layer}: "
                f"at least top_k={moe.top_k} must stay routable"
            )
    with _registered(model, moe, "modifiers", _ExpertMask(by_layer, float(bias))):
        yield


@contextmanager
def scale_routing(
    model: nn.Module,
    factor: float,
    *,
    layers: Iterable[int] | None = None,
    experts: Iterable[tuple[int, int]] | None = None,
) -> Iterator[None]:
    """Multiply routed-expert weights by ``factor``: everywhere, on some MoE layers, or only where
    a token selected one of the given (layer, expert) pairs. Shared experts are not scaled."""
    if not (math.isfinite(factor) and factor >= 0):
        raise ValueError(f"routing scale factor must be finite and >= 0, got {factor!r}")
    if layers is not None and experts is not None:
        raise ValueError("give either layers or experts to scale_routing, not both")
    moe = describe(model)
    layer_set = None
    if layers is not None:
        layer_set = {int(layer) for layer in layers}
        for layer in layer_set:
            moe.check_expert(layer, 0)
    by_layer = group_pairs(moe, experts) if experts is not None else None
    with _registered(model, moe, "modifiers", _RoutingScale(float(factor), layer_set, by_layer)):
        yield


@contextmanager
def force_experts(model: nn.Module, forced: Mapping[int, Iterable[int] | torch.Tensor]) -> Iterator[None]:
    """Make every token of each given MoE layer select the given experts (at most top_k per
    layer; remaining slots go to the best other experts). Weights follow the model's own rule.

    A layer's experts may also be a ``[batch, n]`` integer tensor: row b forces the tokens of
    sequence b of every batch of exactly that size (one routing candidate per sequence); or a
    ``[batch, length, n]`` tensor: entry [b, t] forces token t of sequence b of a prefill pass
    of exactly batch x length tokens (unpadded prompts), a row of -1 leaves that token alone; a
    pass continuing a KV cache of the first P prompt tokens gets positions P.. (a shared prefix
    computed once), and decoding steps (positions >= length) are not forced (F-SOUR's prefill
    attack).
    """
    moe = describe(model)
    by_layer: dict[int, list[int] | torch.Tensor] = {}
    for layer, experts in forced.items():
        if isinstance(experts, torch.Tensor) and experts.dim() == 3:
            by_layer[int(layer)] = _check_per_token(moe, int(layer), experts.long())
            continue
        if isinstance(experts, torch.Tensor):
            rows = experts.long()
            for row in rows.tolist() if rows.dim() == 2 else [None]:
                if row is None or not 1 <= len(set(row)) == len(row) <= moe.top_k:
                    raise ValueError(f"MoE layer {layer}: a per-sequence tensor must be [batch, n] with "
                                     f"1 <= n <= top_k={moe.top_k} distinct experts per row")
                group_pairs(moe, ((layer, e) for e in row))
            by_layer[int(layer)] = rows
            continue
        chosen = group_pairs(moe, ((layer, e) for e in experts)).get(int(layer), [])
        if not 1 <= len(chosen) <= moe.top_k:
            raise ValueError(
                f"MoE layer {layer}: can force 1..top_k={moe.top_k} distinct experts, got {len(chosen)}"
            )
        by_layer[int(layer)] = chosen
    with _registered(model, moe, "modifiers", _ForcedExperts(by_layer)):
        yield


def _check_per_token(moe: MoEModel, layer: int, rows: torch.Tensor) -> torch.Tensor:
    """A [batch, length, n] tensor of distinct experts per token, or all -1 (token not forced)."""
    moe.check_expert(layer, 0)
    n = rows.shape[-1]
    flat = rows.reshape(-1, n)
    unforced = (flat == -1).all(dim=1)
    valid = ((flat >= 0) & (flat < moe.num_experts)).all(dim=1)
    ordered = flat.sort(dim=1).values
    distinct = (ordered[:, 1:] != ordered[:, :-1]).all(dim=1)
    if not 1 <= n <= moe.top_k or not bool((unforced | (valid & distinct)).all()):
        raise ValueError(f"MoE layer {layer}: a per-token tensor must be [batch, length, n] with "
                         f"1 <= n <= top_k={moe.top_k} distinct experts in 0..{moe.num_experts - 1} "
                         "per token, or a row of -1 for a token left alone")
    return rows
