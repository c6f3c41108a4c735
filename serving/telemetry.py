"""Live routing telemetry of one served model, kept by the gateway replica.

The engine's worker extension (`serving.routing_worker`) keeps cumulative counts; the replica
pulls them every `poll_interval_s`, adds the difference to Prometheus counters, and keeps the
differences of the last `window_s` seconds for the concentration gauges. Concentration and the
safety-expert share use the routing core's definitions (`moe_routing.stats.concentration`).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

import numpy as np

from moe_routing.stats import concentration
from serving.metrics import GatewayMetrics

PHASES = ("prompt", "generated")


@dataclass(frozen=True)
class RoutingShape:
    num_layers: int
    num_experts: int
    top_k: int


def safety_share(hits: np.ndarray, safety_experts: list[tuple[int, int]]) -> float:
    """Share of the routed (token, expert) selections in `hits` [L, E] on the given pairs (NaN if none)."""
    total = float(hits.sum())
    if total == 0 or not safety_experts:
        return float("nan")
    layers, experts = zip(*safety_experts)
    return float(hits[list(layers), list(experts)].sum()) / total


class RoutingTelemetry:
    def __init__(self, model: str, shape: RoutingShape, metrics: GatewayMetrics, *, window_s: float,
                 top_n: int | None = None, safety_experts: list[tuple[int, int]] = (),
                 per_expert_metrics: bool = True):
        self.model, self.shape, self.metrics = model, shape, metrics
        self.window_s, self.top_n = window_s, top_n or shape.top_k
        self.safety_experts = [(int(l), int(e)) for l, e in safety_experts]
        for l, e in self.safety_experts:
            if not (0 <= l < shape.num_layers and 0 <= e < shape.num_experts):
                raise ValueError(f"safety expert ({l}, {e}) outside the model's {shape.num_layers} MoE "
                                 f"layers x {shape.num_experts} experts")
        self.per_expert_metrics = per_expert_metrics
        self._last = np.zeros((2, shape.num_layers, shape.num_experts), dtype=np.int64)
        self._last_tokens = np.zeros(2, dtype=np.int64)
        self.total = self._last  # cumulative, read by the JSON endpoint
        self._window: deque[tuple[float, np.ndarray, np.ndarray]] = deque()
        self.updated_at: float | None = None

    def update(self, snapshot: dict, now: float | None = None) -> None:
        """Take a cumulative snapshot from the worker extension."""
        now = time.monotonic() if now is None else now
        hits = np.asarray(snapshot["hits"], dtype=np.int64)
        tokens = np.asarray(snapshot["tokens"], dtype=np.int64)
        if hits.shape != self._last.shape:
            raise ValueError(f"routing snapshot has shape {hits.shape}, expected {self._last.shape}")
        delta, delta_tokens = hits - self._last, tokens - self._last_tokens
        if (delta < 0).any() or (delta_tokens < 0).any():  # the engine restarted: start over
            delta, delta_tokens = hits, tokens
        self._last, self._last_tokens, self.total = hits, tokens, hits
        m, model = self.metrics, self.model
        for p, phase in enumerate(PHASES):
            if delta_tokens[p]:
                m.routed_tokens.labels(model, phase).inc(int(delta_tokens[p]))
            if self.per_expert_metrics:
                for l, e in zip(*np.nonzero(delta[p])):
                    m.expert_tokens.labels(model, str(l), str(e), phase).inc(int(delta[p, l, e]))
        if delta_tokens.any():
            self._window.append((now, delta, delta_tokens))
        while self._window and self._window[0][0] < now - self.window_s:
            self._window.popleft()
        self.updated_at = now
        self._export_window()

    def reset_window(self) -> None:
        self._window.clear()
        self._export_window()

    def window_hits(self) -> tuple[np.ndarray, np.ndarray]:
        """(hits [2, L, E], tokens [2]) over the sliding window."""
        hits = np.zeros_like(self._last)
        tokens = np.zeros(2, dtype=np.int64)
        for _, h, t in self._window:
            hits += h
            tokens += t
        return hits, tokens

    def _export_window(self) -> None:
        hits, tokens = self.window_hits()
        load = hits.sum(axis=0)
        conc = concentration(load, self.top_n)
        m, model = self.metrics, self.model
        for l in range(self.shape.num_layers):
            # A layer with no traffic in the window has no distribution: export NaN, which
            # Prometheus alert expressions treat as not matching.
            m.top_share.labels(model, str(l)).set(conc.top_share[l])
            m.normalized_entropy.labels(model, str(l)).set(conc.normalized_entropy[l])
            m.gini.labels(model, str(l)).set(conc.gini[l])
            m.effective_experts.labels(model, str(l)).set(conc.effective_experts[l])
        if self.safety_experts:
            m.safety_expert_share.labels(model).set(safety_share(load, self.safety_experts))
        m.window_tokens.labels(model).set(int(tokens.sum()))

    def summary(self) -> dict:
        """The JSON view: cumulative counts, window concentration per phase, safety share."""
        hits, tokens = self.window_hits()
        window = {}
        for p, phase in enumerate((*PHASES, "all")):
            load = hits.sum(axis=0) if phase == "all" else hits[p]
            window[phase] = {
                "tokens": int(tokens.sum() if phase == "all" else tokens[p]),
                "concentration": concentration(load, self.top_n).to_dict(),
                "safety_expert_share": _finite(safety_share(load, self.safety_experts)),
            }
        return {
            "model": self.model,
            "num_layers": self.shape.num_layers,
            "num_experts": self.shape.num_experts,
            "top_k": self.shape.top_k,
            "top_n": self.top_n,
            "window_s": self.window_s,
            "safety_experts": [list(p) for p in self.safety_experts],
            "window": window,
            "total": {phase: {"tokens": int(self._last_tokens[p]), "hits": self.total[p].tolist()}
                      for p, phase in enumerate(PHASES)},
        }


def request_summary(hits: list[list[int]], shape: RoutingShape, top_n: int,
                    safety_experts: list[tuple[int, int]]) -> dict:
    """The opt-in per-request routing summary attached to a response."""
    load = np.asarray(hits, dtype=np.int64)
    return {
        "hits": load.tolist(),
        "routed_tokens": int(load[0].sum() // shape.top_k) if load.size else 0,
        "concentration": concentration(load, top_n).to_dict(),
        "safety_expert_share": _finite(safety_share(load, safety_experts)),
    }


def _finite(x: float) -> float | None:
    return None if x != x else round(x, 5)  # JSON has no NaN


def json_safe(value):
    """NaN -> None, recursively (JSON has no NaN; a layer without traffic has no concentration)."""
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value
