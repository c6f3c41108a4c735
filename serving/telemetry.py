"""Live routing telemetry of one served model, kept by the gateway replica.

The engine's worker extension (`serving.routing_worker`) keeps cumulative counts; the replica
pulls them every `poll_interval_s`, adds the difference to Prometheus counters, and keeps the
differences of the last `window_s` seconds for the concentration gauges. Concentration and the
safety-expert share use the routing core's definitions (`moe_routing.stats.concentration`).

The alert thresholds are relative to the served model's own routing on profiled benign and harmful
prompts (`RoutingProfile`, from a profile or report of the checkpoint or measured through the
engine at start): `routing_baseline` applies the same two definitions to the profile, and the
replica exports the result as `mesa_routing_*_baseline` gauges that the Prometheus rules compare
live values with (deploy/README.md, Alerts).

Every request is also scored on its own prompt tokens' routing (`RequestRisk`): the routing risk
of `moe_routing.risk` against the same profile, and the share of its selections on the safety
experts; both go to histograms, the audit log and the opt-in routing summary. Its answer (the
generated tokens) is scored the same way at the end (`answer_risk`): a second view, of what the
model did with the prompt, beside the prompt's own score (which a jailbreak template pushes up
whatever it wraps).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

import numpy as np

from moe_routing.risk import risk_weights, routing_risk
from moe_routing.stats import RoutingCounts, concentration, expert_frequency, top_pairs
from serving.metrics import GatewayMetrics

PHASES = ("prompt", "generated")
TRAFFIC = ("benign", "harmful")  # the two kinds of profiled prompts, the `traffic` label


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


@dataclass(frozen=True, eq=False)
class RoutingProfile:
    """The served model's routing on profiled prompts: hit frequencies F[l, e] (hits / tokens,
    `moe_routing.stats.expert_frequency`) of benign and of harmful prompts, float [L, E]."""

    benign: np.ndarray
    harmful: np.ndarray
    top_k: int
    source: str  # where it came from, for the log and /admin/config

    def __post_init__(self) -> None:
        for name in TRAFFIC:
            value = np.asarray(getattr(self, name), dtype=np.float64)
            if value.ndim != 2 or not np.isfinite(value).all() or (value < 0).any():
                raise ValueError(f"{self.source}: {name} routing must be finite non-negative [L, E] "
                                 f"frequencies, got shape {value.shape}")
            object.__setattr__(self, name, value)
        if self.benign.shape != self.harmful.shape:
            raise ValueError(f"{self.source}: benign routing has shape {self.benign.shape}, harmful "
                             f"{self.harmful.shape}")

    @classmethod
    def from_counts(cls, harmful: RoutingCounts, benign: RoutingCounts, source: str) -> RoutingProfile:
        if harmful.top_k != benign.top_k:
            raise ValueError(f"{source}: harmful counts have top_k {harmful.top_k}, benign {benign.top_k}")
        return cls(expert_frequency(benign), expert_frequency(harmful), harmful.top_k, source)

    def check_matches(self, shape: RoutingShape) -> None:
        """A profile of another model (other layers, experts or top-k) is refused, naming both."""
        L, E = self.benign.shape
        if (L, E, self.top_k) != (shape.num_layers, shape.num_experts, shape.top_k):
            raise ValueError(f"routing profile {self.source} has {L} MoE layers x {E} experts, "
                             f"top-{self.top_k}; the served model has {shape.num_layers} x "
                             f"{shape.num_experts}, top-{shape.top_k}")

    def risk_weights(self) -> np.ndarray:
        """W[l, e], the log-likelihood ratio of one selection (`moe_routing.risk`)."""
        return risk_weights(self.harmful, self.benign, self.top_k)

    def safety_experts(self, n: int) -> list[tuple[int, int]]:
        """The n pairs with the largest risk difference F_harmful - F_benign, by the top-N rule the
        suite, the probes and MESA use (`moe_routing.stats.top_pairs`, at most E - top_k per layer)."""
        L, E = self.benign.shape
        return top_pairs(self.harmful - self.benign, min(n, L * (E - self.top_k)), top_k=self.top_k)


@dataclass(frozen=True, eq=False)
class RoutingBaseline:
    """Top share per layer [L] and safety-expert share of each kind of profiled traffic."""

    top_share: dict[str, np.ndarray]
    safety_share: dict[str, float]  # NaN without safety experts
    top_n: int
    source: str

    def to_dict(self) -> dict:
        return {"source": self.source, "top_n": self.top_n,
                "top_share": {t: np.round(v, 5).tolist() for t, v in self.top_share.items()},
                "safety_expert_share": {t: _finite(v) for t, v in self.safety_share.items()}}


def routing_baseline(profile: RoutingProfile, top_n: int,
                     safety_experts: list[tuple[int, int]]) -> RoutingBaseline:
    """The live gauges' definitions applied to the profile (both are invariant to scaling a load,
    so frequencies give what the hit counts give)."""
    loads = {traffic: getattr(profile, traffic) for traffic in TRAFFIC}
    return RoutingBaseline(
        top_share={t: concentration(load, top_n).top_share for t, load in loads.items()},
        safety_share={t: safety_share(load, safety_experts) for t, load in loads.items()},
        top_n=top_n, source=profile.source)


@dataclass(frozen=True)
class RequestRisk:
    """One request's routing risk, from its prompt tokens only (the generated ones follow from them,
    and a decision is taken after prefill)."""

    score: float | None  # nats per prompt token (moe_routing.risk); None without a profile
    safety_expert_share: float | None  # None without safety experts
    prompt_tokens: int

    def to_dict(self) -> dict:
        return {"score": None if self.score is None else round(self.score, 5),
                "safety_expert_share": self.safety_expert_share, "prompt_tokens": self.prompt_tokens}


def counts_from_requests(request_hits: list, top_k: int) -> RoutingCounts:
    """RoutingCounts of requests from their per-request [L][E] hit counts (the worker's tracked
    requests); a request's token count is its hits in a layer over top_k."""
    hits = np.asarray(request_hits, dtype=np.int64)
    if hits.ndim != 3 or len(hits) == 0:
        raise ValueError(f"need the [L][E] hits of at least one request, got shape {hits.shape}")
    return RoutingCounts(hits, hits[:, 0].sum(axis=1) // top_k, None, top_k)


class RoutingTelemetry:
    def __init__(self, model: str, shape: RoutingShape, metrics: GatewayMetrics, *, window_s: float,
                 top_n: int | None = None, safety_experts: list[tuple[int, int]] = (),
                 per_expert_metrics: bool = True, baseline: RoutingBaseline | None = None,
                 safety_experts_source: str = "", risk_weights: np.ndarray | None = None):
        self.model, self.shape, self.metrics = model, shape, metrics
        self.window_s, self.top_n = window_s, top_n or shape.top_k
        self.safety_experts = [(int(l), int(e)) for l, e in safety_experts]
        for l, e in self.safety_experts:
            if not (0 <= l < shape.num_layers and 0 <= e < shape.num_experts):
                raise ValueError(f"safety expert ({l}, {e}) outside the model's {shape.num_layers} MoE "
                                 f"layers x {shape.num_experts} experts")
        self.per_expert_metrics = per_expert_metrics
        self.safety_experts_source = safety_experts_source
        self._last = np.zeros((2, shape.num_layers, shape.num_experts), dtype=np.int64)
        self._last_tokens = np.zeros(2, dtype=np.int64)
        self._origin, self._origin_tokens = self._last, self._last_tokens  # see start_from
        self._window: deque[tuple[float, np.ndarray, np.ndarray]] = deque()
        self.updated_at: float | None = None
        self.baseline = baseline
        if baseline is not None:
            self._export_baseline(baseline)
        if risk_weights is not None and np.shape(risk_weights) != (shape.num_layers, shape.num_experts):
            raise ValueError(f"risk weights have shape {np.shape(risk_weights)}, the model "
                             f"{(shape.num_layers, shape.num_experts)}")
        self.risk_weights = risk_weights

    def request_risk(self, prompt_hits) -> RequestRisk:
        """A request's risk from its prompt tokens' hits [L, E]."""
        hits = np.asarray(prompt_hits, dtype=np.int64)
        tokens = int(hits[0].sum() // self.shape.top_k) if hits.size else 0
        score = None
        if self.risk_weights is not None and tokens:
            score = routing_risk(hits, self.risk_weights, self.shape.top_k)
        share = _finite(safety_share(hits, self.safety_experts)) if tokens else None
        return RequestRisk(score, share, tokens)

    def answer_risk(self, generated_hits) -> float | None:
        """The routing risk of a request's generated tokens [L, E] (the tokens fed back while
        answering: every generated token but the last), with the prompt profile's weights; None
        without a profile or without such tokens."""
        hits = np.asarray(generated_hits, dtype=np.int64)
        if self.risk_weights is None or not hits.size or not hits[0].sum():
            return None
        return routing_risk(hits, self.risk_weights, self.shape.top_k)

    def observe_answer_risk(self, score: float | None) -> None:
        if score is not None:
            self.metrics.answer_risk.labels(self.model).observe(score)

    def observe_risk(self, risk: RequestRisk) -> None:
        """One scored request in the histograms."""
        if risk.score is not None:
            self.metrics.request_risk.labels(self.model).observe(risk.score)
        if risk.safety_expert_share is not None:
            self.metrics.request_safety_share.labels(self.model).observe(risk.safety_expert_share)

    def start_from(self, snapshot: dict) -> None:
        """Count from this cumulative snapshot on: what the engine routed before (the baseline
        profile at start) stays out of the counters, the window and the JSON totals."""
        self._last = np.asarray(snapshot["hits"], dtype=np.int64)
        self._last_tokens = np.asarray(snapshot["tokens"], dtype=np.int64)
        self._origin, self._origin_tokens = self._last, self._last_tokens

    def _export_baseline(self, baseline: RoutingBaseline) -> None:
        m, model = self.metrics, self.model
        for traffic, shares in baseline.top_share.items():
            if len(shares) != self.shape.num_layers:
                raise ValueError(f"baseline has {len(shares)} layers, the model {self.shape.num_layers}")
            for l, share in enumerate(shares):
                m.top_share_baseline.labels(model, str(l), traffic).set(share)
            if self.safety_experts:
                m.safety_expert_share_baseline.labels(model, traffic).set(baseline.safety_share[traffic])

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
            self._origin, self._origin_tokens = np.zeros_like(hits), np.zeros_like(tokens)
        self._last, self._last_tokens = hits, tokens
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
            "safety_experts_source": self.safety_experts_source,
            "baseline": None if self.baseline is None else self.baseline.to_dict(),
            "window": window,
            "total": {phase: {"tokens": int(self._last_tokens[p] - self._origin_tokens[p]),
                              "hits": (self._last[p] - self._origin[p]).tolist()}
                      for p, phase in enumerate(PHASES)},
        }


def request_summary(hits: dict, shape: RoutingShape, top_n: int,
                    safety_experts: list[tuple[int, int]], risk: RequestRisk | None = None,
                    answer_risk: float | None = None) -> dict:
    """The opt-in per-request routing summary attached to a response: `hits` [L, E] of every token
    that went through the model (prompt and generated), the prompt's risk and the answer's."""
    load = np.asarray(hits["prompt"], dtype=np.int64) + np.asarray(hits["generated"], dtype=np.int64)
    return {
        "hits": load.tolist(),
        "routed_tokens": int(load[0].sum() // shape.top_k) if load.size else 0,
        "concentration": concentration(load, top_n).to_dict(),
        "safety_expert_share": _finite(safety_share(load, safety_experts)),
        "risk": None if risk is None else risk.to_dict(),
        "answer_risk": None if answer_risk is None else round(answer_risk, 5),
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
