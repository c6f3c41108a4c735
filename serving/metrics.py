"""Every Prometheus metric the gateway exports, defined once (names follow Prometheus conventions:
base units, `_total` counters). They live in prometheus_client's default registry next to vLLM's
own `vllm:*` engine metrics, and `/metrics` serves that registry.
"""

from __future__ import annotations

from functools import cache

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
# Routing risk (moe_routing.risk) is a log-likelihood ratio per token in nats: symmetric around 0,
# finer near it; a model with many layers sums more evidence per token and reaches the outer buckets.
RISK_BUCKETS = (-8, -4, -2, -1, -0.5, -0.25, -0.1, 0, 0.1, 0.25, 0.5, 1, 2, 4, 8)
SHARE_BUCKETS = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.8, 1)


class GatewayMetrics:
    def __init__(self, registry=REGISTRY):
        r = registry
        self.requests = Counter(
            "mesa_gateway_requests", "HTTP requests answered, by endpoint and status code",
            ["model", "endpoint", "code"], registry=r)
        self.request_duration = Histogram(
            "mesa_gateway_request_duration_seconds", "Time from request to the last byte of the answer",
            ["model", "endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.time_to_first_token = Histogram(
            "mesa_gateway_time_to_first_token_seconds", "Streaming requests: time to the first chunk",
            ["model", "endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.tokens = Counter(
            "mesa_gateway_tokens", "Tokens in answered requests (prompt / completion, from usage)",
            ["model", "kind"], registry=r)
        # Per API key, labelled by key id (serving.protocol.key_id: a digest prefix, never the key).
        self.key_requests = Counter(
            "mesa_gateway_key_requests", "Requests per API key id, by status code (429: over a "
            "per-key limit)", ["model", "key_id", "code"], registry=r)
        self.key_tokens = Counter(
            "mesa_gateway_key_tokens", "Tokens per API key id (prompt / completion, from usage)",
            ["model", "key_id", "kind"], registry=r)
        self.key_rate_limited = Counter(
            "mesa_gateway_key_rate_limited", "Requests refused with 429 per API key id, by the limit "
            "hit (requests / tokens per minute)", ["model", "key_id", "limit"], registry=r)
        self.in_flight = Gauge(
            "mesa_gateway_requests_in_flight", "Requests being answered", ["model"], registry=r)
        self.expert_tokens = Counter(
            "mesa_routing_expert_tokens", "Tokens routed to each (MoE layer, expert); phase is "
            "prompt or generated", ["model", "layer", "expert", "phase"], registry=r)
        self.routed_tokens = Counter(
            "mesa_routing_tokens", "Tokens that went through the MoE layers", ["model", "phase"], registry=r)
        self.top_share = Gauge(
            "mesa_routing_top_share", "Sliding window: share of a layer's routed load on its top_n "
            "most-loaded experts", ["model", "layer"], registry=r)
        self.normalized_entropy = Gauge(
            "mesa_routing_normalized_entropy", "Sliding window: entropy of a layer's expert load over "
            "log(num_experts); 1 = uniform", ["model", "layer"], registry=r)
        self.gini = Gauge(
            "mesa_routing_gini", "Sliding window: Gini coefficient of a layer's expert load",
            ["model", "layer"], registry=r)
        self.effective_experts = Gauge(
            "mesa_routing_effective_experts", "Sliding window: exp(entropy) of a layer's expert load",
            ["model", "layer"], registry=r)
        self.safety_expert_share = Gauge(
            "mesa_routing_safety_expert_share", "Sliding window: share of routed (token, expert) "
            "selections that reach the model's known safety-critical experts", ["model"], registry=r)
        # Set once at engine start from the served model's routing profile (serving.telemetry
        # RoutingProfile); the alert rules compare the live gauges above with these.
        self.top_share_baseline = Gauge(
            "mesa_routing_top_share_baseline", "Profiled at start: a layer's top_n share on the served "
            "model's benign or harmful prompts (traffic label), the reference of MoERoutingConcentrated",
            ["model", "layer", "traffic"], registry=r)
        self.safety_expert_share_baseline = Gauge(
            "mesa_routing_safety_expert_share_baseline", "Profiled at start: the safety-expert share "
            "on the served model's benign or harmful prompts (traffic label), the reference of "
            "MoESafetyExpertShareCollapsed", ["model", "traffic"], registry=r)
        # Per request, from its prompt tokens' routing (serving.telemetry.RequestRisk).
        self.request_risk = Histogram(
            "mesa_request_routing_risk", "Per request: log-likelihood ratio per prompt token of "
            "harmful over benign routing, against the served model's routing profile (nats)",
            ["model"], buckets=RISK_BUCKETS, registry=r)
        self.request_safety_share = Histogram(
            "mesa_request_safety_expert_share", "Per request: share of the prompt tokens' routed "
            "selections on the model's safety-critical experts", ["model"], buckets=SHARE_BUCKETS,
            registry=r)
        self.answer_risk = Histogram(
            "mesa_answer_routing_risk", "Per request: log-likelihood ratio per generated token of "
            "harmful over benign routing, with the same profile as mesa_request_routing_risk (nats)",
            ["model"], buckets=RISK_BUCKETS, registry=r)
        # The routing guard (serving.guard).
        self.guard_decisions = Counter(
            "mesa_guard_decisions", "Requests judged by the routing guard, by action (allowed / "
            "flagged / blocked)", ["model", "action"], registry=r)
        self.guard_high_risk = Counter(
            "mesa_guard_high_risk_requests", "Requests whose routing risk exceeded the guard's "
            "threshold, whatever the policy (observe counts them too)", ["model"], registry=r)
        self.guard_high_risk_answers = Counter(
            "mesa_guard_high_risk_answers", "Answers whose routing risk exceeded the guard's answer "
            "threshold (counted under every policy; the answer has left by then)", ["model"], registry=r)
        self.guard_answer_threshold = Gauge(
            "mesa_guard_answer_risk_threshold", "The guard's answer risk threshold (nats per generated "
            "token); NaN when it has none", ["model"], registry=r)
        self.guard_threshold = Gauge(
            "mesa_guard_risk_threshold", "The guard's risk threshold (nats per prompt token); NaN "
            "when it has none", ["model"], registry=r)
        self.guard_false_positive_rate = Gauge(
            "mesa_guard_false_positive_rate", "The share of benign traffic expected above the "
            "threshold: measured on the calibration prompts, else the configured target",
            ["model"], registry=r)
        self.window_tokens = Gauge(
            "mesa_routing_window_tokens", "Tokens in the concentration sliding window", ["model"], registry=r)
        self.telemetry_errors = Counter(
            "mesa_routing_telemetry_errors", "Failed pulls of routing counts from the engine",
            ["model"], registry=r)
        self.integrity_ok = Gauge(
            "mesa_model_integrity_ok", "Router and expert weights as loaded in the engine match the "
            "checkpoint's routing_manifest.json: 1 match, 0 mismatch, -1 not checked (no manifest, "
            "unreadable manifest or unsupported engine layout)", ["model"], registry=r)
        self.drill_active = Gauge(
            "mesa_routing_drill_active", "1 while an alert drill (serving.drill) attacks the routing "
            "of the engine that answers users", ["model"], registry=r)
        # Live attack probes (serving.probes): the latest finished run of each model.
        self.probe_safety_rate = Gauge(
            "mesa_probe_safety_rate", "Latest probe: Safety Rate on held-out harmful prompts under "
            "an attack (attack=none: unattacked)", ["model", "attack"], registry=r)
        self.probe_last_run = Gauge(
            "mesa_probe_last_run_timestamp_seconds", "Unix time the latest probe run of this attack "
            "finished", ["model", "attack"], registry=r)
        self.probe_general_accuracy = Gauge(
            "mesa_probe_general_accuracy", "Latest probe: accuracy on general tasks", ["model"], registry=r)
        self.probe_over_refusal = Gauge(
            "mesa_probe_over_refusal", "Latest probe: share of benign prompts refused", ["model"], registry=r)
        self.probe_duration = Gauge(
            "mesa_probe_duration_seconds", "Wall time of the latest probe run", ["model"], registry=r)
        self.probe_running = Gauge(
            "mesa_probe_running", "1 while a probe run is in progress", ["model"], registry=r)
        self.probe_runs = Counter(
            "mesa_probe_runs", "Probe runs by outcome (ok / failed)", ["model", "outcome"], registry=r)


@cache
def gateway_metrics() -> GatewayMetrics:
    """The process's metrics (a replica may host several models: every metric has a model label)."""
    return GatewayMetrics()


def exposition() -> tuple[bytes, str]:
    """The process's registry in Prometheus text format: ours and vLLM's metrics."""
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
