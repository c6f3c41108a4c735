"""One interface over Hugging Face Mixture-of-Experts models.

Every supported architecture (as implemented in the installed transformers 5.x) has decoder
layers whose ``mlp`` is either a sparse MoE block or a dense MLP. A MoE block holds

- ``mlp.gate``: the router; ``forward(hidden) -> (router_logits [N, E], weights [N, k],
  indices [N, k])``;
- ``mlp.experts``: the routed experts, either fused tensors (``gate_up_proj [E, 2I, H]``,
  ``down_proj [E, H, I]``) or a ``ModuleList`` of per-expert MLPs;
- optionally shared experts that see every token (Qwen2-MoE, DeepSeek-V2).

``describe(model)`` returns a :class:`MoEModel`: the MoE layers in order (the "layer" index used
everywhere in this project counts MoE layers only, 0..L-1), the dense decoder layers, and a
:class:`RouterSpec` that states the routing maths. :func:`route` recomputes a router's decision
from its logits with exactly the maths of the installed implementation, which is what lets the
instrumentation bias logits (masking) and re-route tokens the way the model itself would.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn


class UnsupportedArchitectureError(ValueError):
    """The model is not a Mixture-of-Experts architecture this project can instrument."""


@dataclass(frozen=True)
class RouterSpec:
    """The routing maths of one architecture, as its transformers implementation computes it.

    probs = score(logits) over all E experts (``softmax`` or ``sigmoid``); indices = top-k of probs
    (after group limiting, when ``num_groups`` is set); weights = probs at indices, divided by their
    sum when ``renormalize``, times ``scaling``.
    """

    num_experts: int
    top_k: int
    scoring: Literal["softmax", "sigmoid"] = "softmax"
    renormalize: bool = False
    scaling: float = 1.0
    # DeepSeek "group_limited_greedy": keep the best `topk_groups` of `num_groups` expert groups.
    num_groups: int | None = None
    topk_groups: int | None = None
    # Router logits computed in float32 whatever the model dtype (DeepSeek-V2).
    logits_in_float32: bool = False
    # Weights cast back to the logits dtype (Qwen, OLMoE) or left in float32 (Mixtral, DeepSeek).
    weights_in_logits_dtype: bool = True
    sorted_topk: bool = True


@dataclass(frozen=True)
class MoELayer:
    """One sparse MoE block. ``index`` counts MoE layers; ``decoder_index`` counts decoder layers."""

    index: int
    decoder_index: int
    block: nn.Module
    router: nn.Module
    experts: nn.Module
    shared_experts: tuple[nn.Module, ...]

    @property
    def fused_experts(self) -> bool:
        return isinstance(getattr(self.experts, "gate_up_proj", None), nn.Parameter)

    def expert_parameters(self, expert: int) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, tensor) pairs holding expert ``expert``'s weights.

        For fused experts the tensors are views ``param[expert]`` of the shared ``[E, ...]``
        parameters, so training "only expert e" means masking gradients, not freezing modules.
        """
        if self.fused_experts:
            for name, param in self.experts.named_parameters(recurse=False):
                if param.dim() >= 1 and param.shape[0] == self.router_num_experts:
                    yield f"{name}[{expert}]", param[expert]
        else:
            for name, param in self.experts[expert].named_parameters():
                yield f"{expert}.{name}", param

    @property
    def router_num_experts(self) -> int:
        return int(self.router.weight.shape[0])


@dataclass(frozen=True)
class MoEModel:
    """The MoE view of one model: its routed layers, dense layers and routing maths."""

    architecture: str
    layers: tuple[MoELayer, ...]
    dense_decoder_indices: tuple[int, ...]
    router: RouterSpec

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def num_experts(self) -> int:
        return self.router.num_experts

    @property
    def top_k(self) -> int:
        return self.router.top_k

    def check_expert(self, layer: int, expert: int) -> None:
        """Raise a clear error for a (layer, expert) pair outside the model."""
        if not 0 <= int(layer) < self.num_layers:
            raise ValueError(
                f"MoE layer {layer} out of range: the model has {self.num_layers} MoE layers "
                f"(0..{self.num_layers - 1})"
            )
        if not 0 <= int(expert) < self.num_experts:
            raise ValueError(
                f"expert {expert} out of range in MoE layer {layer}: the model has "
                f"{self.num_experts} routed experts per layer (0..{self.num_experts - 1})"
            )


def _qwen_like(config) -> RouterSpec:
    return RouterSpec(
        num_experts=config.num_experts,
        top_k=config.num_experts_per_tok,
        renormalize=bool(config.norm_topk_prob),
    )


def _mixtral(config) -> RouterSpec:
    return RouterSpec(
        num_experts=config.num_local_experts,
        top_k=config.num_experts_per_tok,
        renormalize=True,
        weights_in_logits_dtype=False,
    )


def _deepseek_v2(config) -> RouterSpec:
    grouped = config.topk_method == "group_limited_greedy"
    if config.topk_method not in ("greedy", "group_limited_greedy"):
        raise UnsupportedArchitectureError(
            f"deepseek_v2 with topk_method={config.topk_method!r} is not supported "
            "(supported: 'greedy', 'group_limited_greedy')"
        )
    # The transformers 5 router ignores norm_topk_prob; we follow the implementation.
    return RouterSpec(
        num_experts=config.n_routed_experts,
        top_k=config.num_experts_per_tok,
        renormalize=False,
        scaling=float(config.routed_scaling_factor),
        num_groups=config.n_group if grouped else None,
        topk_groups=config.topk_group if grouped else None,
        logits_in_float32=True,
        weights_in_logits_dtype=False,
        sorted_topk=False,
    )


# model_type -> (router spec from config, attribute names of shared experts in the MoE block)
_ARCHITECTURES = {
    "qwen3_moe": (_qwen_like, ()),
    "qwen2_moe": (_qwen_like, ("shared_expert", "shared_expert_gate")),
    "mixtral": (_mixtral, ()),
    "olmoe": (_qwen_like, ()),
    "deepseek_v2": (_deepseek_v2, ("shared_experts",)),
}

SUPPORTED_ARCHITECTURES: tuple[str, ...] = tuple(_ARCHITECTURES)


def check_supported(config) -> str:
    """Return the config's model_type, or raise naming the supported architectures."""
    model_type = getattr(config, "model_type", None)
    if model_type not in _ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"unsupported model architecture {model_type!r}: supported MoE architectures are "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    return model_type


def router_spec_from_config(config) -> RouterSpec:
    """The routing rule of a Hugging Face config (also used inside vLLM, which has no HF modules)."""
    return _ARCHITECTURES[check_supported(config)][0](config)


def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    base = getattr(model, "model", model)
    layers = getattr(base, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise UnsupportedArchitectureError(
            f"{type(model).__name__} has no decoder layers at .model.layers; expected a causal LM "
            f"of one of: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    return layers


def describe(model: nn.Module) -> MoEModel:
    """The MoE view of a transformers model (``*ForCausalLM`` or its base model)."""
    model_type = check_supported(getattr(model, "config", None))
    spec = router_spec_from_config(model.config)
    shared_names = _ARCHITECTURES[model_type][1]
    layers, dense = [], []
    for decoder_index, decoder_layer in enumerate(_decoder_layers(model)):
        block = getattr(decoder_layer, "mlp", None)
        router = getattr(block, "gate", None)
        experts = getattr(block, "experts", None)
        if router is None or experts is None or not hasattr(router, "weight"):
            dense.append(decoder_index)
            continue
        if router.weight.shape[0] != spec.num_experts:
            raise UnsupportedArchitectureError(
                f"decoder layer {decoder_index}: router has {router.weight.shape[0]} outputs but "
                f"the config says {spec.num_experts} experts"
            )
        shared = tuple(getattr(block, n) for n in shared_names if getattr(block, n, None) is not None)
        layers.append(MoELayer(len(layers), decoder_index, block, router, experts, shared))
    if not layers:
        raise UnsupportedArchitectureError(f"{model_type} model has no MoE layers")
    return MoEModel(model_type, tuple(layers), tuple(dense), spec)


def router_probs(logits: torch.Tensor, spec: RouterSpec) -> torch.Tensor:
    """Router probabilities over all E experts, in float32."""
    logits = logits.float()
    if spec.scoring == "softmax":
        return torch.softmax(logits, dim=-1)
    return torch.sigmoid(logits)


def routing_weights(
    probs: torch.Tensor, indices: torch.Tensor, spec: RouterSpec, dtype: torch.dtype
) -> torch.Tensor:
    """Combination weights of the selected experts: the architecture's own rule."""
    weights = probs.gather(-1, indices)
    if spec.renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    if spec.scaling != 1.0:
        weights = weights * spec.scaling
    return weights.to(dtype) if spec.weights_in_logits_dtype else weights


def selected_experts(logits: torch.Tensor, spec: RouterSpec) -> torch.Tensor:
    """The expert indices of `route` [N, k], cheaply: without group limiting, the top-k of the
    logits is the top-k of the probabilities (softmax and sigmoid are monotone), so the
    probabilities and weights need not be computed. Order within a row is not specified."""
    if spec.num_groups:
        return route(logits, spec)[1]
    return torch.topk(logits, k=spec.top_k, dim=-1, sorted=False).indices


def route(logits: torch.Tensor, spec: RouterSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights [N, k], indices [N, k]) from router logits [N, E], as the model computes them."""
    probs = router_probs(logits, spec)
    candidates = probs
    if spec.num_groups:
        per_group = spec.num_experts // spec.num_groups
        group_scores = probs.view(-1, spec.num_groups, per_group).max(dim=-1).values
        best_groups = torch.topk(group_scores, k=spec.topk_groups, dim=-1, sorted=False)[1]
        keep = torch.zeros_like(group_scores).scatter_(1, best_groups, 1.0).bool()
        keep = keep.unsqueeze(-1).expand(-1, spec.num_groups, per_group).reshape(-1, spec.num_experts)
        candidates = probs.masked_fill(~keep, 0.0)
    _, indices = torch.topk(candidates, k=spec.top_k, dim=-1, sorted=spec.sorted_topk)
    weights_dtype = torch.float32 if spec.logits_in_float32 else logits.dtype
    return routing_weights(probs, indices, spec, weights_dtype), indices
