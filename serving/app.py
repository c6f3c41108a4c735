"""The gateway: a Ray Serve deployment hosting one checkpoint on vLLM's engine.

    serve run deploy/serve.yaml          # import path serving.app:build_app
    mesa-serve deploy/serve.yaml         # the same, with config errors reported before deploying

The OpenAI-compatible endpoints delegate to vLLM's own OpenAI serving classes, built exactly as
`vllm serve` builds them (same argument parser, same `init_app_state`), so request validation,
sampling parameters, streaming and error format are vLLM's. The gateway adds API keys, routing
telemetry (`serving.routing_worker` inside the engine, `serving.telemetry` here), Prometheus
metrics, per-key limits and an audit log, and live attack probes on a separate replica
(`serving.probes`). No `ray[llm]` dependency (README, Engines).

Laid out like vLLM's `entrypoints/openai`: `serving.protocol` (headers, paths, key ids, error
bodies; shared with `clients/`), `serving.auth` (keys), `serving.limits` (per-key limits),
`serving.audit` (the audit log), `serving.routes` (routes and the middleware),
`serving.guard` (the routing guard), `serving.integrity` (weights against the manifest),
`serving.drill` (alert drills), `serving.probes` (the probe replica and its gauges), and here the
deployment that owns the engine and wires them to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from starlette.datastructures import Headers
from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest, ChatCompletionResponse
from vllm.entrypoints.openai.completion.protocol import CompletionResponse
from vllm.entrypoints.serve.engine.protocol import ErrorResponse

from serving import integrity
from serving.audit import AuditLog, prompt_text
from serving.auth import KeyChecker, may_see_routing_summary, route_path  # noqa: F401  (route_path: its historical import path)
from serving.batched_call import BatchedCall
from serving.config import (
    GatewayConfig,
    check_limit_keys,
    guard_calibration_prompts,
    resolve_keys,
    resolve_model,
    resolve_routing_reference,
    resolve_safety_experts,
)
from serving.drill import Drill, DrillRequest, drill_attack
from serving.guard import REFUSAL, GuardDecision, GuardedEngine, RoutingGuard
from serving.limits import KeyLimiter
from serving.metrics import exposition, gateway_metrics
from serving.probes import ProbeGauges
from serving.protocol import (
    CHAT_ROLES,
    GUARD_HEADER,
    SUMMARY_HEADER,
    digest_key_id,
    endpoint_label,
    openai_error,
    refusal_body,
    usage_tokens,
)
from serving.routes import create_app
from serving.routing_worker import (
    TRACK_MARKER,
    WORKER_EXTENSION,
    configure_engine,
    engine_environment,
    tracked_key,
)
from serving.telemetry import (
    RoutingProfile,
    RoutingShape,
    RoutingTelemetry,
    counts_from_requests,
    json_safe,
    request_summary,
    routing_baseline,
)

logger = logging.getLogger("ray.serve")


@dataclass(frozen=True)
class GatewaySettings:
    """What a replica needs; resolved on the driver (keys arrive as digests only)."""

    config: GatewayConfig
    checkpoint: str
    served_model_name: str
    user_key_digests: frozenset[str]
    admin_key_digest: str | None
    safety_experts: list[tuple[int, int]] = field(default_factory=list)
    safety_experts_source: str = ""
    audit_path: str | None = None  # absolute, resolved on the driver
    # The alert baselines' source: a profile read from a file, or (harmful, benign) prompts to
    # profile through the engine at start, or neither (no baseline).
    routing_profile: RoutingProfile | None = None
    baseline_prompts: tuple[list[str], list[str]] | None = None
    guard_prompts: list[str] | None = None  # validation benign prompts to calibrate the guard on


@serve.deployment(max_ongoing_requests=256, health_check_period_s=10, health_check_timeout_s=60)
@serve.ingress()
class Gateway:
    async def __init__(self, settings: GatewaySettings, probe_runner=None):
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.entrypoints.launchers.api_server.app_state import init_app_state
        from vllm.v1.engine.async_llm import AsyncLLM

        from serving.config import vllm_parser

        self.settings, self.config = settings, settings.config
        self.name = settings.served_model_name
        self.metrics = gateway_metrics()
        self.keys = KeyChecker(settings.user_key_digests, settings.admin_key_digest,
                               self.config.allow_unauthenticated)
        self.limiter = KeyLimiter(self.config.limits.for_key)  # per replica
        self.audit = None
        if settings.audit_path:
            path = settings.audit_path
            if self.config.num_replicas > 1:  # one file per replica: rotation is not multi-process safe
                path += "." + serve.get_replica_context().replica_id.unique_id
            audit = self.config.audit
            self.audit = AuditLog(path, max_bytes=audit.max_bytes, backup_count=audit.backup_count,
                                  include_prompts=audit.include_prompts)
        args = vllm_parser().parse_args(["--model", settings.checkpoint,
                                         "--served-model-name", settings.served_model_name])
        for key, value in self.config.engine_options().items():
            setattr(args, key, value)
        engine_args = AsyncEngineArgs.from_cli_args(args)
        telemetry = self.config.telemetry
        # The extension also computes the integrity fingerprint, so it is there even without telemetry.
        engine_args.worker_extension_cls = WORKER_EXTENSION
        compiled = telemetry.enabled and telemetry.compiled
        if telemetry.enabled:
            if not compiled and not engine_args.enforce_eager:
                logger.warning("routing telemetry on an eager engine (telemetry.compiled: false): "
                               "setting enforce_eager=True")
            if engine_args.pipeline_parallel_size != 1:
                raise ValueError("routing telemetry does not support pipeline parallelism")
            configure_engine(engine_args, compiled=compiled)
        with engine_environment(compiled) if telemetry.enabled else contextlib.nullcontext():
            self.engine = AsyncLLM.from_engine_args(engine_args)
        self._peek_routing = self._batched("routing_peek_requests")
        self._pop_routing = self._batched("routing_pop_requests")
        self.guard = RoutingGuard(self.config.guard, self.metrics, self.name, self._peek_routing)
        self.http_app = create_app(self)
        # vLLM's serving classes reach the engine through the guard (serving.guard), which needs telemetry.
        serving_engine = self.engine
        if telemetry.enabled:
            serving_engine = GuardedEngine(self.engine, self._judge, self._note_prompt,
                                           lambda: self.guard.state.policy)
        tasks = await self.engine.get_supported_tasks()
        await init_app_state(serving_engine, self.http_app.state, args, tasks)
        self.state = self.http_app.state
        self.telemetry: RoutingTelemetry | None = None
        self._poller = None
        if telemetry.enabled:
            shape = (await self.engine.collective_rpc("routing_install"))[0]
            self.telemetry = await self._start_telemetry(
                RoutingShape(shape["num_layers"], shape["num_experts"], shape["top_k"]))
            self._poller = asyncio.get_running_loop().create_task(self._poll_routing())
            self.metrics.telemetry_errors.labels(self.name)  # exported at 0, so increase() sees the first
        self.drill = Drill(self.engine, self.metrics.drill_active.labels(self.name), self.name)
        self.integrity: dict = {"status": "not checked"}
        await self.run_integrity_check()
        self.probe_runner = probe_runner  # a handle to serving.probes.ProbeRunner, or None
        self.probe_gauges = ProbeGauges(self.metrics, self.name)
        self._probe_poller = None
        if probe_runner is not None:
            self._probe_poller = asyncio.get_running_loop().create_task(
                self.probe_gauges.follow(probe_runner))
        mode = ("on, compiled engine" if compiled else "on, eager engine") if telemetry.enabled else "off"
        logger.info("gateway ready: model %s (%s), telemetry %s, probes %s", self.name, settings.checkpoint,
                    mode, "on" if probe_runner is not None else "off")

    def __serve_build_asgi_app__(self):
        return self.http_app

    async def _start_telemetry(self, shape: RoutingShape) -> RoutingTelemetry:
        """The telemetry with its alert baselines and, unless config or a report names them, the
        safety experts, both from the served model's routing profile."""
        settings, config = self.settings, self.config.telemetry
        profile = settings.routing_profile
        if profile is None and settings.baseline_prompts:
            try:
                profile = await self._profile_at_start(shape, *settings.baseline_prompts)
            except Exception:  # serve anyway; MoERoutingBaselineMissing tells the operator
                logger.exception("profiling the routing baseline at start failed")
        safety, safety_source, baseline = settings.safety_experts, settings.safety_experts_source, None
        if profile is not None:
            profile.check_matches(shape)
            if not safety_source:
                safety = profile.safety_experts(config.safety_top_n)
                safety_source = (f"top {len(safety)} by risk difference on the routing profile "
                                 f"({profile.source})")
            baseline = routing_baseline(profile, config.top_n or shape.top_k, safety)
        logger.info("routing baseline of %s: %s; safety experts %s from %s", self.name,
                    profile.source if profile else "none (the baseline alerts stay silent)",
                    safety, safety_source or "nowhere (no safety-expert share)")
        telemetry = RoutingTelemetry(
            self.name, shape, self.metrics, window_s=config.window_s, top_n=config.top_n,
            safety_experts=safety, per_expert_metrics=config.per_expert_metrics,
            baseline=baseline, safety_experts_source=safety_source,
            risk_weights=None if profile is None else profile.risk_weights())
        if telemetry.risk_weights is not None and self.guard.needs_calibration and settings.guard_prompts:
            try:  # the validation benign prompts and the engine's answers to them, routed by the engine
                routed = await self._prefill_routing(settings.guard_prompts,
                                                     max(self.config.guard.answer_tokens, 1))
                self.guard.calibrate(telemetry, routed)
            except Exception:  # serve anyway: the guard judges nothing high risk without a threshold
                logger.exception("calibrating the guard's threshold at start failed")
        telemetry.start_from((await self.engine.collective_rpc("routing_snapshot"))[0])
        self.guard.telemetry = telemetry
        return telemetry

    async def _prefill_routing(self, prompts: list[str], max_tokens: int = 1) -> list[dict | None]:
        """Route the prompts' chat turns through the served engine itself, with the live
        telemetry's instrument: their hits. One new token each by default (so only prompt tokens
        are routed); with `max_tokens`, greedy answers of up to that many tokens."""
        from vllm import SamplingParams

        from moe_routing.chat import chat_prompt_ids

        tokenizer = self.engine.get_tokenizer()
        longest = self.engine.model_config.max_model_len - max_tokens
        params = SamplingParams(max_tokens=max_tokens, temperature=0)

        async def prefill(prompt: str):
            ids = chat_prompt_ids(tokenizer, prompt) if getattr(tokenizer, "chat_template", None) \
                else tokenizer(prompt)["input_ids"]
            key = TRACK_MARKER + uuid.uuid4().hex
            async for _ in self.engine.generate({"prompt_token_ids": ids[:longest]}, params, key):
                pass
            return await self._pop_routing(key)

        return await asyncio.gather(*(prefill(p) for p in prompts))

    def _batched(self, method: str) -> BatchedCall:
        """A worker extension method over many tracking keys, called for many requests at once."""
        async def call(keys: list[str]):
            return (await self.engine.collective_rpc(method, args=(keys,)))[0]

        return BatchedCall(call)

    async def _profile_at_start(self, shape: RoutingShape, harmful: list[str],
                                benign: list[str]) -> RoutingProfile:
        started = time.monotonic()
        hits = await self._prefill_routing(harmful + benign)
        counts = [counts_from_requests([h["prompt"] for h in part if h is not None], shape.top_k)
                  for part in (hits[: len(harmful)], hits[len(harmful):])]
        source = (f"measured at start through the engine on {len(harmful)} harmful and {len(benign)} "
                  f"benign identification prompts ({time.monotonic() - started:.1f} s)")
        return RoutingProfile.from_counts(counts[0], counts[1], source)

    async def _judge(self, request_id: str, prompt) -> bool:
        """GuardedEngine's question at a request's first output (serving.guard.RoutingGuard.judge)."""
        key = tracked_key(request_id)
        return True if key is None else await self.guard.judge(key, prompt)

    def _note_prompt(self, request_id: str, prompt) -> None:
        key = tracked_key(request_id)
        if key is not None:
            self.guard.note_prompt(key, prompt)

    # ---- metrics helpers (used by the middleware) ----

    def count(self, path: str, code: int, elapsed: float) -> None:
        endpoint = endpoint_label(path)
        self.metrics.requests.labels(self.name, endpoint, str(code)).inc()
        if code < 400:
            self.metrics.request_duration.labels(self.name, endpoint).observe(elapsed)

    async def _poll_routing(self) -> None:
        interval = self.config.telemetry.poll_interval_s
        while True:
            await asyncio.sleep(interval)
            try:
                snapshot = (await self.engine.collective_rpc("routing_snapshot"))[0]
                self.telemetry.update(snapshot)
            except asyncio.CancelledError:
                raise
            except Exception:  # keep serving; the error counter and the log say what happened
                self.metrics.telemetry_errors.labels(self.name).inc()
                logger.exception("routing telemetry pull failed")

    # ---- OpenAI-compatible endpoints ----

    async def generate(self, request, raw_request: Request, create):
        track = raw_request.headers.get(SUMMARY_HEADER, "").lower() in ("1", "true", "yes")
        client_ids = (request.request_id or "", raw_request.headers.get("x-request-id", ""))
        if any(TRACK_MARKER in i for i in client_ids):
            return openai_error(400, f"request ids containing {TRACK_MARKER!r} are reserved")
        if isinstance(request, ChatCompletionRequest):
            for i, message in enumerate(request.messages):
                role = message.get("role") if isinstance(message, dict) else getattr(message, "role", None)
                if role not in CHAT_ROLES:
                    return openai_error(400, f"messages[{i}].role must be one of {sorted(CHAT_ROLES)}, "
                                        f"got {role!r}", "invalid_request_error")
        if track and self.telemetry is None:
            return openai_error(400, f"{SUMMARY_HEADER} needs routing telemetry, which is off")
        record = raw_request.scope.get("mesa")  # serving.routes.RequestLog
        access = self.config.telemetry.routing_summary
        if track and not may_see_routing_summary(record.caller if record else None, access):
            return openai_error(403, f"{SUMMARY_HEADER} needs the admin key: the summary carries the "
                                "guard's risk score (telemetry.routing_summary: keys opens it to every key)",
                                "permission_error")
        key = None
        if self.telemetry is not None:  # every request is tracked in the engine, for its risk score
            key = TRACK_MARKER + uuid.uuid4().hex
            # vLLM takes the id from X-Request-Id when present (Ray Serve's proxy always sets it);
            # the client's id stays its prefix.
            base = client_ids[1] or client_ids[0]
            request.request_id = f"{base}-{key}" if base else key
            raw_request.scope["headers"] = [(k, v) for k, v in raw_request.scope["headers"]
                                            if k != b"x-request-id"]
            raw_request.scope["headers"].append((b"x-request-id", request.request_id.encode()))
            raw_request._headers = Headers(scope=raw_request.scope)  # Starlette caches headers
        if record is not None and self.audit is not None and self.audit.include_prompts:
            record.prompt = prompt_text(request)
        try:
            result = await create(request, raw_request)
        except AssertionError:  # vLLM's completions handler asserts an output that a blocked request lacks
            decision = self.guard.decision(key)
            if decision is None or decision.action != "blocked":
                raise
            result = None
        if result is None or isinstance(result, ErrorResponse | ChatCompletionResponse | CompletionResponse):
            summary, decision = await self._request_routing(key, record) if key else (None, None)
            if decision is not None and decision.action == "blocked":
                return self._refusal(request, decision, record)
            if isinstance(result, ErrorResponse):
                return JSONResponse(result.model_dump(), status_code=result.error.code)
            self._count_usage(result.usage, record)
            body = result.model_dump()
            if track:
                body["routing_summary"] = summary
            return JSONResponse(json_safe(body), headers=_guard_headers(decision))
        if record is not None:
            record.streaming = True
        # The guard decides at the engine's first output, before the first chunk exists.
        first = await anext(result, None)
        decision = self.guard.decision(key)
        if decision is not None and decision.action == "blocked":
            await result.aclose()
            await self._request_routing(key, record)
            return self._refusal(request, decision, record, stream=True)
        stream = self._stream(first, result, key, track, raw_request, record)
        return StreamingResponse(stream, media_type="text/event-stream", headers=_guard_headers(decision))

    async def _stream(self, first: str | None, chunks, key: str | None, track: bool, raw_request: Request,
                      record=None):
        async def all_chunks():
            if first is not None:
                yield first
            async for chunk in chunks:
                yield chunk

        async for chunk in all_chunks():
            if chunk.startswith("data: [DONE]"):
                if key:
                    summary, _ = await self._request_routing(key, record)
                    if track:
                        summary = {"object": "routing.summary", "choices": [], "routing_summary": summary}
                        yield f"data: {json.dumps(json_safe(summary))}\n\n"
                break
            yield chunk
        # vLLM's stream generator leaves the request's total usage (every choice, whether or not
        # the client asked for a usage chunk) on the request state once the last token is out;
        # None when the stream ended in an error.
        metadata = getattr(raw_request.state, "request_metadata", None)
        self._count_usage(getattr(metadata, "final_usage_info", None), record)
        yield "data: [DONE]\n\n"

    def _count_usage(self, usage, record=None) -> None:
        prompt, completion = usage_tokens(usage)
        for kind, n in (("prompt", prompt), ("completion", completion)):
            if n:
                self.metrics.tokens.labels(self.name, kind).inc(n)
        if record is not None:
            record.prompt_tokens, record.completion_tokens = prompt, completion

    async def _request_routing(self, key: str, record=None) -> tuple[dict | None, GuardDecision | None]:
        """Collect a finished request's routing from the engine (freeing its slot) and the guard's
        decision on it: (its routing summary, the decision); the audit record gets both. A
        request served under `observe` is scored here, on the same prompt counts a judgement at
        its first output would have read."""
        hits = await self._pop_routing(key)
        decision = self.guard.collect(key, None if hits is None else hits["prompt"])
        if record is not None and decision is not None:
            record.risk = decision.risk.score
            if decision.action != "allowed":
                record.decision = decision.action
        if hits is None:
            return None, decision
        t = self.telemetry
        answer = self.guard.score_answer(hits["generated"])
        if record is not None:
            record.answer_risk = answer
        risk = decision.risk if decision is not None else t.request_risk(hits["prompt"])
        return request_summary(hits, t.shape, t.top_n, t.safety_experts, risk, answer), decision

    def _refusal(self, request, decision: GuardDecision, record, stream: bool = False):
        """The OpenAI-format answer to a blocked request (streamed when the request streams)."""
        kind = "chat" if isinstance(request, ChatCompletionRequest) else "completion"
        body = refusal_body(kind, request.request_id, self.name, REFUSAL, decision.prompt_tokens,
                            int(time.time()), chunk=stream)
        if record is not None:
            record.prompt_tokens, record.completion_tokens = decision.prompt_tokens, 0
        headers = _guard_headers(decision)
        if not stream:
            return JSONResponse(body, headers=headers)

        async def chunks():
            yield f"data: {json.dumps(body)}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(chunks(), media_type="text/event-stream", headers=headers)

    async def models(self):
        listing = await self.state.openai_serving_models.show_available_models()
        return JSONResponse(listing.model_dump())

    # ---- health, metrics, telemetry, admin ----

    async def health(self):
        try:
            await self.engine.check_health()
        except Exception as error:  # the engine died: tell the load balancer, not a 500
            return openai_error(503, f"engine unhealthy: {type(error).__name__}")
        return {"status": "ok", "model": self.name}

    async def prometheus_metrics(self):
        body, content_type = exposition()
        return Response(body, media_type=content_type)

    async def routing(self, raw_request):
        """GET /v1/routing: the live telemetry. Which experts carry safety is the target list of
        an expert-masking attack, so only callers who may see the routing summary get it."""
        if self.telemetry is None:
            return openai_error(404, "routing telemetry is off for this model")
        summary = json_safe(self.telemetry.summary())
        record = raw_request.scope.get("mesa")  # serving.routes.RequestLog
        caller = record.caller if record else None
        if not may_see_routing_summary(caller, self.config.telemetry.routing_summary):
            summary["safety_experts"] = None
        return JSONResponse(summary)

    async def reset_telemetry(self):
        """Clear the sliding window (e.g. after an incident), keeping the cumulative counters."""
        if self.telemetry is None:
            return openai_error(404, "routing telemetry is off for this model")
        self.telemetry.reset_window()
        return {"status": "ok"}

    async def admin_config(self):
        """The running configuration, without credentials."""
        config = self.config.model_dump(exclude={"api_keys", "admin_key"})
        return {"model": self.name, "checkpoint": self.settings.checkpoint, "config": config,
                **json_safe(self._routing_sources()),
                "guard": self.guard.state.to_dict(),
                "integrity": json_safe(self.integrity),
                "drill": self.drill.to_dict()}

    async def guard_state(self):
        return {"model": self.name, **self.guard.state.to_dict()}

    async def update_guard(self, update: dict):
        """POST /admin/guard: change the policy and/or the thresholds at run time (an incident, a
        new calibration); `serving.routes.GuardUpdate` has validated the body."""
        if self.telemetry is None:
            return openai_error(409, "the guard needs routing telemetry, which is off for this model")
        self.guard.update(update)
        return {"model": self.name, **self.guard.state.to_dict()}

    def _routing_sources(self) -> dict:
        """Which safety experts and alert baselines the telemetry uses, and where they came from."""
        t = self.telemetry
        if t is None:
            return {"safety_experts": [list(p) for p in self.settings.safety_experts],
                    "safety_experts_source": self.settings.safety_experts_source, "baseline": None}
        return {"safety_experts": [list(p) for p in t.safety_experts],
                "safety_experts_source": t.safety_experts_source,
                "baseline": None if t.baseline is None else t.baseline.to_dict()}

    async def run_integrity_check(self) -> dict:
        """Check the engine's weights against the checkpoint's manifest (serving.integrity) and
        export the result as the gauge; never raises."""
        self.integrity = await integrity.check_engine(self.engine, self.settings.checkpoint, self.name)
        self.metrics.integrity_ok.labels(self.name).set(integrity.GAUGE.get(self.integrity["status"], -1))
        return self.integrity

    async def check_integrity(self):
        """POST /admin/integrity: run the check now (e.g. after an incident) and return it."""
        return JSONResponse(json_safe(await self.run_integrity_check()))

    # ---- alert drills (serving.drill) ----

    async def drill_state(self):
        return {"model": self.name, "drills": self.config.drills, **self.drill.to_dict()}

    async def start_drill(self, request: DrillRequest):
        """POST /admin/drill: apply the attack to this engine for `duration_s` (replacing a
        running drill; serving.drill)."""
        if not self.config.drills:
            return openai_error(403, "drills are off for this model: a drill serves users attacked, so "
                                "only a staging or test gateway should set drills: true", "permission_error")
        t = self.telemetry  # drills: true needs telemetry (serving.config)
        try:
            attack = drill_attack(request, t.safety_experts, t.shape.num_layers, t.shape.num_experts)
        except ValueError as error:
            return openai_error(400, str(error), "invalid_request_error")
        try:
            await self.drill.start(attack, request.duration_s)
        except Exception as error:
            return openai_error(409, f"the engine refused the drill: {str(error)[:300]}")
        return await self.drill_state()

    async def stop_drill(self):
        """DELETE /admin/drill: end the drill now (nothing to do when none runs)."""
        await self.drill.stop()
        return await self.drill_state()

    async def start_probes(self):
        """Start a probe run on the probe replica (202), or report the one already running (409)."""
        if self.probe_runner is None:
            return openai_error(404, "probes are off for this model (set probes.enabled: true)")
        state = await self.probe_runner.start.remote()
        started = state.pop("started")
        self.probe_gauges.export(state)
        if not started:
            conflict = openai_error(409, "a probe run is already in progress")
            body = json.loads(conflict.body) | {"probes": json_safe(state)}
            return JSONResponse(body, status_code=409)
        return JSONResponse(json_safe(state), status_code=202)

    async def probes(self):
        """The probe replica's state and its latest result (per-attack Safety Rates)."""
        if self.probe_runner is None:
            return openai_error(404, "probes are off for this model (set probes.enabled: true)")
        state = await self.probe_runner.status.remote()
        self.probe_gauges.export(state)
        return JSONResponse(json_safe(state | {"model": self.name}))

    async def check_health(self) -> None:  # Ray Serve's replica health check
        await self.engine.check_health()

    def __del__(self):
        if getattr(self, "audit", None) is not None:
            self.audit.close()
        for task in (getattr(self, "_poller", None), getattr(self, "_probe_poller", None)):
            if task is not None:
                task.cancel()
        if getattr(self, "engine", None) is not None:
            self.engine.shutdown()


def _guard_headers(decision: GuardDecision | None) -> dict | None:
    return {GUARD_HEADER: decision.action} if decision is not None and decision.action != "allowed" else None


def gateway_settings(args: dict, log=print) -> GatewaySettings:
    """Validate a Serve application's `args` and resolve model, keys and safety experts."""
    config = GatewayConfig.model_validate(args)
    checkpoint, name = resolve_model(config, log=log)
    users, admin = resolve_keys(config)
    safety, source = resolve_safety_experts(config.telemetry, checkpoint)
    profile, prompts = resolve_routing_reference(config.telemetry, checkpoint, log)
    guard_prompts, guard = None, config.guard
    if config.telemetry.enabled and guard.threshold is None and guard.calibration_prompts:
        from safety_eval.data import MissingDataError

        try:
            guard_prompts = guard_calibration_prompts(checkpoint, guard.calibration_prompts)
        except (MissingDataError, OSError, ValueError, KeyError) as error:  # serve, without a threshold
            log(f"[serve] guard: no validation prompts to calibrate its threshold on ({error}); "
                "nothing is high risk until an admin sets one (POST /admin/guard)")
    check_limit_keys(config, users, admin)
    if users:  # what limits.keys, metrics and the audit log call each key
        log(f"[serve] user key ids: {', '.join(sorted(digest_key_id(d) for d in users))}")
    audit_path = None
    if config.audit.path:  # replicas may run in another directory
        audit_path = Path(config.audit.path).expanduser().resolve()
        if audit_path.is_dir():
            raise ValueError(f"audit.path is a directory, not a file: {audit_path}")
        audit_path.parent.mkdir(parents=True, exist_ok=True)
        audit_path.open("a").close()  # not writable: an OSError now, not in the replica
        audit_path = str(audit_path)
    return GatewaySettings(config, checkpoint, name, users, admin, safety, source, audit_path,
                           profile, prompts, guard_prompts)


def gateway_application(settings: GatewaySettings) -> serve.Application:
    from serving.probes import ProbeRunner

    config, probes = settings.config, settings.config.probes
    runner = None
    if probes.enabled:
        runner = ProbeRunner.options(
            ray_actor_options={"num_cpus": probes.num_cpus, "num_gpus": probes.num_gpus},
        ).bind(settings.checkpoint, settings.served_model_name, probes.suite, probes.interval_s,
               str(Path(probes.output_dir).expanduser().resolve()), probes.threads, probes.engine,
               probes.engine_options)
    return Gateway.options(
        num_replicas=config.num_replicas,
        ray_actor_options={
            "num_cpus": config.num_cpus,
            "num_gpus": config.num_gpus,
            # Handlers and vLLM's output loop are all async and never block: running them on the
            # replica's own event loop saves a thread hop per streamed chunk.
            "runtime_env": {"env_vars": {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0"}},
        },
    ).bind(settings, runner)


def build_app(args: dict) -> serve.Application:
    """Ray Serve application builder (`import_path: serving.app:build_app`)."""
    return gateway_application(gateway_settings(args))
