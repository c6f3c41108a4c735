"""The alignment methods in one table: what each trains and which of MESA's parts it uses.

Every method trains on the same data (D_safe plus replayed D_general) for the same step budget;
they differ only in the columns below. ``mesa`` reads its switches from the config (so the
results table can ablate each one); ``mesa_paper`` pins them to the paper's method (README,
Aligning a model with MESA):

    method       trains                                   router loss   switches
    mesa         experts of the safety set D + routers    OT-KL         config (coverage, transport,
                                                                          forced routes)
    mesa_paper   the top-w experts of the plan + routers  OT-KL (tilt)  pinned to the paper's
    sft_all      every parameter                          -             -
    router_only  the routers                              -             -
    safex        the top safety-critical pairs (SAFEx)    -             -
    lora         LoRA adapters on attention, merged        -             -
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Experts = Literal["none", "safety_set", "safety_critical", "all"]


@dataclass(frozen=True)
class MethodSpec:
    name: str
    summary: str
    experts: Experts  # which routed experts train: none, MESA's safety set, SAFEx's top pairs, all
    routers: bool  # the router weights train
    router_loss: bool  # the OT-KL router loss against the frozen reference is on
    lora: bool = False  # LoRA adapters (peft) instead of the model's own weights
    # Config values this method always runs with, whatever the config says ("section.key").
    pinned: dict[str, object] = field(default_factory=dict)


# The paper's MESA: top-w selection from the plan, the hard tilt towards the selected experts,
# no forced routes and no masking augmentation.
PAPER_SETTINGS = {
    "allocation.selection": "top_w",
    "allocation.eps": 0.1,
    "training.router_target": "tilt",
    "training.forced_routes": 0.0,
    "training.mask_augmentation": 0.0,
}

METHODS: dict[str, MethodSpec] = {spec.name: spec for spec in (
    MethodSpec("mesa", "MESA that decentralises: coverage selection, token transport, forced routes",
               "safety_set", routers=True, router_loss=True),
    MethodSpec("mesa_paper", "MESA as in the paper: top-w selection, tilted router target",
               "safety_set", routers=True, router_loss=True, pinned=PAPER_SETTINGS),
    MethodSpec("sft_all", "SFT of every parameter", "all", routers=True, router_loss=False),
    MethodSpec("router_only", "SFT of the routers", "none", routers=True, router_loss=False),
    MethodSpec("safex", "SFT of the top safety-critical experts (SAFEx-style)", "safety_critical",
               routers=False, router_loss=False),
    MethodSpec("lora", "LoRA adapters on attention, merged at export", "none", routers=False,
               router_loss=False, lora=True),
)}

# Rows of the results table that switch one part of `mesa` back to the paper's (ablations).
# `mesa_no_forced+mask` (alignment.compare) trains with masking augmentation instead of forced
# routes.
ABLATIONS: dict[str, dict[str, object]] = {
    "mesa_no_coverage": {"allocation.selection": "top_w"},
    "mesa_no_transport": {"training.router_target": "tilt"},
    "mesa_no_forced": {"training.forced_routes": 0.0},
}


def method_spec(name: str) -> MethodSpec:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown training method {name!r}; choose from {', '.join(METHODS)}") from None


def apply_settings(config: dict, settings: dict[str, object]) -> dict:
    """`config` (a model_dump) with "section.key" values replaced; a copy."""
    out = {name: dict(values) if isinstance(values, dict) else values for name, values in config.items()}
    for dotted, value in settings.items():
        section, key = dotted.split(".")
        out[section][key] = value
    return out
