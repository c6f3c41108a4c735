"""Alert drills: one of the probes' attacks applied, for a bounded time, to the engine that
answers users, so an operator can check end to end that the routing alerts fire.

A drill masks experts (router logit bias, `safety_eval.attacks.ExpertMask`) or rescales routed
weights (`RoutingScale`) through the worker extension (`serving.routing_worker.
routing_set_attack`); no weight is touched, and it ends by itself after `duration_s`. Users are
served attacked while it runs, so drills are refused unless the model's config says
`drills: true` (staging and test gateways), and a running drill is loud: `/admin/drill`,
`/admin/config`, the gauge `mesa_routing_drill_active` and the alert `MoERoutingDrillActive`.

What each drill should trip: masking the safety-critical experts drives the safety-expert share to
0 (`MoESafetyExpertShareCollapsed`). A routing scale leaves a layer's selection, which the
telemetry counts, as it is and changes only what later layers receive, and no weight changes for
the integrity check to see: whether an alert notices it depends on the model.
"""

from __future__ import annotations

import time
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from safety_eval.attacks import ExpertMask, RoutingScale

Pair = tuple[int, int]


class DrillRequest(BaseModel):
    """POST /admin/drill. `pairs`: [layer, expert] pairs, `safety_experts` (the served model's,
    as the telemetry uses them) or, for a routing scale only, `all` (every routed expert)."""

    model_config = ConfigDict(extra="forbid")
    attack: Literal["expert_mask", "routing_scale"]
    pairs: list[Pair] | Literal["safety_experts", "all"] = "safety_experts"
    factor: float | None = Field(None, gt=0, allow_inf_nan=False)  # routing_scale only
    duration_s: float = Field(300.0, gt=0, le=3600)

    @model_validator(mode="after")
    def _consistent(self) -> DrillRequest:
        if self.attack == "routing_scale" and self.factor is None:
            raise ValueError("a routing_scale drill needs a factor (e.g. 0.5)")
        if self.attack == "expert_mask" and self.factor is not None:
            raise ValueError("factor is for routing_scale drills; an expert_mask takes pairs only")
        if self.attack == "expert_mask" and self.pairs == "all":
            raise ValueError("an expert_mask of every expert leaves nothing to route to; name pairs")
        return self


def drill_attack(request: DrillRequest, safety_experts: list[Pair], num_layers: int,
                 num_experts: int) -> dict:
    """The attack's `to_dict()` for `routing_set_attack`; ValueError (a message for the admin)
    when the pairs do not fit the served model or there are none."""
    if request.pairs == "safety_experts":
        pairs = [tuple(p) for p in safety_experts]
        if not pairs:
            raise ValueError("this model has no known safety-critical experts; name pairs")
    elif request.pairs == "all":
        pairs = None
    else:
        pairs = [tuple(p) for p in request.pairs]
        if not pairs:
            raise ValueError("pairs is empty")
        outside = [p for p in pairs if not (0 <= p[0] < num_layers and 0 <= p[1] < num_experts)]
        if outside:
            raise ValueError(f"pairs {outside} are outside this model's {num_layers} MoE layers x "
                             f"{num_experts} experts")
    if request.attack == "expert_mask":
        return ExpertMask(tuple(pairs), label="drill").to_dict()
    scaled = None if pairs is None else tuple(pairs)
    return RoutingScale(request.factor, label="drill", pairs=scaled).to_dict()


class Drill:
    """The drill running on one replica, if any."""

    def __init__(self):
        self.attack: dict | None = None
        self.started_at = self.ends_at = None

    @property
    def active(self) -> bool:
        return self.attack is not None

    def start(self, attack: dict, duration_s: float) -> None:
        self.attack, self.started_at = attack, time.time()
        self.ends_at = self.started_at + duration_s

    def stop(self) -> None:
        self.attack = self.started_at = self.ends_at = None

    def to_dict(self) -> dict:
        if self.attack is None:
            return {"active": False}
        return {"active": True, "attack": self.attack, "started_at": self.started_at, "ends_at": self.ends_at,
                "remaining_s": round(max(0.0, self.ends_at - time.time()), 1)}
