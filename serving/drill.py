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

import asyncio
import logging
import time
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from safety_eval.attacks import ExpertMask, RoutingScale

logger = logging.getLogger("ray.serve")
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
    """The drill on one replica's engine, if any: applied through the worker extension, ended by
    its timer or the admin. Cached prompt blocks are dropped at start and end, so no request
    reuses KV computed under the other routing. `active_gauge` is the replica's
    `mesa_routing_drill_active` series."""

    def __init__(self, engine, active_gauge, model_name: str):
        self.engine, self.active_gauge, self.model_name = engine, active_gauge, model_name
        self.attack: dict | None = None
        self.started_at = self.ends_at = None
        self._timer: asyncio.TimerHandle | None = None
        active_gauge.set(0)

    @property
    def active(self) -> bool:
        return self.attack is not None

    async def start(self, attack: dict, duration_s: float) -> None:
        """Apply `attack` (a `drill_attack` dict) for `duration_s`, replacing a running drill. An
        engine that refuses it (e.g. a MoE kernel that fuses expert selection: no routing scale)
        raises, and no drill is left running."""
        try:
            await self.engine.collective_rpc("routing_set_attack", args=(attack,))
        except Exception:
            await self.stop()
            raise
        await self._reset_prefix_cache()
        if self._timer is not None:
            self._timer.cancel()
        self.attack, self.started_at = attack, time.time()
        self.ends_at = self.started_at + duration_s
        self._timer = asyncio.get_running_loop().call_later(
            duration_s, lambda: asyncio.ensure_future(self.stop()))
        self.active_gauge.set(1)
        logger.warning("DRILL started on %s by the admin: %s %s for %.0f s; users are served attacked",
                       self.model_name, attack["kind"], attack.get("pairs") or "every expert", duration_s)

    async def stop(self) -> None:
        """End the drill now (nothing to do when none runs)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        was_active = self.active
        await self.engine.collective_rpc("routing_set_attack", args=(None,))
        self.attack = self.started_at = self.ends_at = None
        self.active_gauge.set(0)
        if was_active:
            await self._reset_prefix_cache()
            logger.warning("DRILL ended on %s: the engine routes as loaded again", self.model_name)

    async def _reset_prefix_cache(self) -> None:
        if not await self.engine.reset_prefix_cache():
            logger.warning("the prefix cache of %s could not be reset (blocks in use): requests may "
                           "reuse KV computed under the other routing", self.model_name)

    def to_dict(self) -> dict:
        if self.attack is None:
            return {"active": False}
        return {"active": True, "attack": self.attack, "started_at": self.started_at, "ends_at": self.ends_at,
                "remaining_s": round(max(0.0, self.ends_at - time.time()), 1)}
