"""The gateway: a Ray Serve deployment hosting one checkpoint on vLLM's engine.

    serve run deploy/serve.yaml          # import path serving.app:build_app
    mesa-serve deploy/serve.yaml         # the same, with config errors reported before deploying

The OpenAI-compatible endpoints delegate to vLLM's own OpenAI serving classes, built exactly as
`vllm serve` builds them (same argument parser, same `init_app_state`), so request validation,
sampling parameters, streaming and error format are vLLM's. The gateway adds API keys, routing
telemetry (`serving.routing_worker` inside the engine, `serving.telemetry` here), Prometheus
metrics, and live attack probes on a separate replica (`serving.probes`). No `ray[llm]`
dependency (DESIGN.md section 3).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from ray import serve
from starlette.datastructures import Headers
from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest, ChatCompletionResponse
from vllm.entrypoints.openai.completion.protocol import CompletionRequest, CompletionResponse
from vllm.entrypoints.serve.engine.protocol import ErrorResponse
from vllm.entrypoints.serve.exception_handling.register import init_exception_handler
from vllm.entrypoints.serve.utils.api_utils import validate_json_request

from serving.config import GatewayConfig, key_digest, resolve_keys, resolve_model, resolve_safety_experts
from serving.metrics import exposition, gateway_metrics
from serving.routing_worker import TRACK_MARKER
from serving.telemetry import RoutingShape, RoutingTelemetry, json_safe, request_summary

logger = logging.getLogger("ray.serve")
WORKER_EXTENSION = "serving.routing_worker.RoutingRecorder"
SUMMARY_HEADER = "x-mesa-routing-summary"
CHAT_ROLES = {"system", "developer", "user", "assistant", "tool", "function"}
PUBLIC_PATHS = {"/health", "/metrics", "/openapi.json", "/docs"}


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


def openai_error(status: int, message: str, type_: str | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": type_ or HTTPStatus(status).phrase,
                      "param": None, "code": status}}
    return JSONResponse(body, status_code=status)


class GatewayMiddleware:
    """API keys and request metrics, as plain ASGI (streaming responses pass through untouched).

    /v1/*: a user or the admin key (401 otherwise); /admin/*: the admin key only (403 for a user
    key); /health and /metrics are open, for probes and scrapers."""

    def __init__(self, app, gateway: Gateway):
        self.app, self.gateway = app, gateway

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        gateway, path = self.gateway, route_path(scope)
        rejection = gateway.authorize(path, dict(scope["headers"]).get(b"authorization", b""))
        if rejection is not None:
            gateway.count(path, rejection.status_code, 0.0)
            return await rejection(scope, receive, send)
        started, state = time.perf_counter(), {"code": 500, "first": None}

        async def timed_send(message):
            if message["type"] == "http.response.start":
                state["code"] = message["status"]
            elif message["type"] == "http.response.body" and state["first"] is None and message.get("body"):
                state["first"] = time.perf_counter() - started
            await send(message)

        metrics, model, endpoint = gateway.metrics, gateway.name, endpoint_label(path)
        metrics.in_flight.labels(model).inc()
        try:
            await self.app(scope, receive, timed_send)
        finally:
            metrics.in_flight.labels(model).dec()
            elapsed = time.perf_counter() - started
            gateway.count(path, state["code"], elapsed)
            if state["first"] is not None and scope.get("mesa_streaming"):
                metrics.time_to_first_token.labels(model, endpoint).observe(state["first"])


def route_path(scope) -> str:
    """The path inside the application: Serve keeps the full path in `path` and puts an
    application's route_prefix (e.g. /aligned) in `root_path`; keys and labels judge the rest."""
    path, root = scope["path"], scope.get("root_path", "")
    if root and (path == root or path.startswith(root + "/")):
        return path[len(root):] or "/"
    return path


def guard_validation(model):
    """A dependency that runs the request model's validators before FastAPI does and turns a
    validator that crashes on an unexpected type (e.g. vLLM's structured_outputs check on an
    integer) into a 400, where FastAPI would answer 500. Pydantic's own errors pass through to
    FastAPI, which reports them with field locations."""

    async def check(raw_request: Request) -> None:
        try:
            body = await raw_request.json()
        except Exception:  # malformed JSON: FastAPI reports it
            return
        try:
            model.model_validate(body)
        except ValidationError:
            return
        except Exception as error:
            raise RequestValidationError([{"type": "value_error", "loc": ("body",), "input": None,
                                           "msg": f"invalid request: {error}"}]) from None

    return Depends(check)


def endpoint_label(path: str) -> str:
    """A bounded label set: unknown paths collapse to "other"."""
    known = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/v1/routing", "/health", "/metrics")
    if path in known:
        return path
    return "/admin" if path.startswith("/admin/") else "other"


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
        args = vllm_parser().parse_args(["--model", settings.checkpoint,
                                         "--served-model-name", settings.served_model_name])
        for key, value in self.config.engine_options().items():
            setattr(args, key, value)
        engine_args = AsyncEngineArgs.from_cli_args(args)
        telemetry = self.config.telemetry
        if telemetry.enabled:
            if not engine_args.enforce_eager:
                logger.warning("routing telemetry needs eager mode: setting enforce_eager=True")
            engine_args.enforce_eager = True
            engine_args.worker_extension_cls = WORKER_EXTENSION
            if engine_args.pipeline_parallel_size != 1:
                raise ValueError("routing telemetry does not support pipeline parallelism")
        self.engine = AsyncLLM.from_engine_args(engine_args)
        self.http_app = create_app(self)
        await init_app_state(self.engine, self.http_app.state, args, await self.engine.get_supported_tasks())
        self.state = self.http_app.state
        self.telemetry: RoutingTelemetry | None = None
        self._poller = None
        if telemetry.enabled:
            shape = (await self.engine.collective_rpc("routing_install"))[0]
            self.telemetry = RoutingTelemetry(
                self.name, RoutingShape(shape["num_layers"], shape["num_experts"], shape["top_k"]),
                self.metrics, window_s=telemetry.window_s, top_n=telemetry.top_n,
                safety_experts=settings.safety_experts, per_expert_metrics=telemetry.per_expert_metrics)
            self._poller = asyncio.get_running_loop().create_task(self._poll_routing())
            self.metrics.telemetry_errors.labels(self.name)  # exported at 0, so increase() sees the first
        self.probe_runner = probe_runner  # a handle to serving.probes.ProbeRunner, or None
        self._probe_seen = {"runs": 0, "failures": 0, "finished_at": None}
        self._probe_poller = None
        if probe_runner is not None:
            self._probe_poller = asyncio.get_running_loop().create_task(self._poll_probes())
        logger.info("gateway ready: model %s (%s), telemetry %s, probes %s", self.name, settings.checkpoint,
                    "on" if telemetry.enabled else "off", "on" if probe_runner is not None else "off")

    def __serve_build_asgi_app__(self):
        return self.http_app

    # ---- auth and metrics helpers (used by the middleware) ----

    def authorize(self, path: str, header: bytes) -> JSONResponse | None:
        if path in PUBLIC_PATHS:
            return None
        token = header.decode("latin-1")
        token = token[7:].strip() if token[:7].lower() == "bearer " else ""
        digest = key_digest(token) if token else ""
        is_admin = bool(self.settings.admin_key_digest) and hmac.compare_digest(
            digest, self.settings.admin_key_digest)
        is_user = any(hmac.compare_digest(digest, d) for d in self.settings.user_key_digests)
        if path.startswith("/admin"):
            if is_admin:
                return None
            if self.settings.admin_key_digest is None:
                return openai_error(403, "admin endpoints are disabled: no admin key is configured")
            if is_user:
                return openai_error(403, "this endpoint needs the admin key, not a user key")
            return openai_error(401, "missing or invalid admin key (Authorization: Bearer <key>)")
        if is_user or is_admin or (not self.settings.user_key_digests and self.config.allow_unauthenticated):
            return None
        return openai_error(401, "missing or invalid API key (Authorization: Bearer <key>)",
                            "invalid_request_error")

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

    async def _poll_probes(self, interval_s: float = 2.0) -> None:
        """Export the probe runner's latest result as gauges (every replica exports the same)."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                self.export_probe_state(await self.probe_runner.status.remote())
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("reading the probe runner's state failed")

    def export_probe_state(self, state: dict) -> None:
        m, seen = self.metrics, self._probe_seen
        m.probe_running.labels(self.name).set(1 if state["status"] == "running" else 0)
        for outcome, key in (("ok", "runs"), ("failed", "failures")):
            m.probe_runs.labels(self.name, outcome).inc(max(0, state[key] - seen[key]))
            seen[key] = state[key]
        latest = state.get("latest")
        if latest is None or latest["finished_at"] == seen["finished_at"]:
            return
        seen["finished_at"] = latest["finished_at"]
        for attack, rate in latest["safety_rate"].items():
            m.probe_safety_rate.labels(self.name, attack).set(rate)
            m.probe_last_run.labels(self.name, attack).set(latest["finished_at"])
        m.probe_general_accuracy.labels(self.name).set(latest["general_accuracy"])
        m.probe_over_refusal.labels(self.name).set(latest["over_refusal"])
        m.probe_duration.labels(self.name).set(latest["duration_s"])

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
        key = None
        if track:
            if self.telemetry is None:
                return openai_error(400, f"{SUMMARY_HEADER} needs routing telemetry, which is off")
            key = TRACK_MARKER + uuid.uuid4().hex
            # vLLM takes the id from X-Request-Id when present (Ray Serve's proxy always sets it).
            request.request_id = key
            raw_request.scope["headers"] = [(k, v) for k, v in raw_request.scope["headers"]
                                            if k != b"x-request-id"] + [(b"x-request-id", key.encode())]
            raw_request._headers = Headers(scope=raw_request.scope)  # Starlette caches headers
        result = await create(request, raw_request)
        if isinstance(result, ErrorResponse):
            return JSONResponse(result.model_dump(), status_code=result.error.code)
        if isinstance(result, ChatCompletionResponse | CompletionResponse):
            self._count_usage(result.usage)
            body = result.model_dump()
            if key:
                body["routing_summary"] = await self._request_summary(key)
            return JSONResponse(json_safe(body))
        raw_request.scope["mesa_streaming"] = True
        return StreamingResponse(self._stream(result, key), media_type="text/event-stream")

    async def _stream(self, chunks, key: str | None):
        usage_seen = False
        completion_chunks = 0
        async for chunk in chunks:
            if chunk.startswith("data: [DONE]"):
                if key:
                    summary = {"object": "routing.summary", "choices": [],
                               "routing_summary": await self._request_summary(key)}
                    yield f"data: {json.dumps(json_safe(summary))}\n\n"
                break
            if chunk.startswith("data: {") and '"usage":{' in chunk.replace(" ", ""):
                usage = json.loads(chunk[6:]).get("usage")
                if usage:
                    self._count_usage(usage)
                    usage_seen = True
            else:
                completion_chunks += 1
            yield chunk
        if not usage_seen and completion_chunks:  # no usage asked for: one chunk per token
            self.metrics.tokens.labels(self.name, "completion").inc(completion_chunks)
        yield "data: [DONE]\n\n"

    def _count_usage(self, usage) -> None:
        if usage is None:
            return
        get = usage.get if isinstance(usage, dict) else lambda k: getattr(usage, k, None)
        for kind, name in (("prompt", "prompt_tokens"), ("completion", "completion_tokens")):
            if get(name):
                self.metrics.tokens.labels(self.name, kind).inc(get(name))

    async def _request_summary(self, key: str) -> dict | None:
        hits = (await self.engine.collective_rpc("routing_pop_request", args=(key,)))[0]
        if hits is None:
            return None
        t = self.telemetry
        return request_summary(hits, t.shape, t.top_n, t.safety_experts)

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

    async def routing(self):
        if self.telemetry is None:
            return openai_error(404, "routing telemetry is off for this model")
        summary = self.telemetry.summary()
        summary["safety_experts_source"] = self.settings.safety_experts_source
        return JSONResponse(json_safe(summary))

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
                "safety_experts": [list(p) for p in self.settings.safety_experts],
                "safety_experts_source": self.settings.safety_experts_source}

    async def start_probes(self):
        """Start a probe run on the probe replica (202), or report the one already running (409)."""
        if self.probe_runner is None:
            return openai_error(404, "probes are off for this model (set probes.enabled: true)")
        state = await self.probe_runner.start.remote()
        started = state.pop("started")
        self.export_probe_state(state)
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
        self.export_probe_state(state)
        return JSONResponse(json_safe(state | {"model": self.name}))

    async def check_health(self) -> None:  # Ray Serve's replica health check
        await self.engine.check_health()

    def __del__(self):
        for task in (getattr(self, "_poller", None), getattr(self, "_probe_poller", None)):
            if task is not None:
                task.cancel()
        if getattr(self, "engine", None) is not None:
            self.engine.shutdown()


def create_app(gateway: Gateway) -> FastAPI:
    """The replica's HTTP surface; routes are thin, the work is in Gateway's methods."""
    app = FastAPI(title="MESA gateway", version="0.1.0",
                  description="OpenAI-compatible gateway for MoE models with routing telemetry")
    init_exception_handler(app)  # vLLM's handlers: every error in OpenAI's format, never a bare 500
    app.add_middleware(GatewayMiddleware, gateway=gateway)
    json_body = [Depends(validate_json_request)]

    @app.post("/v1/chat/completions", dependencies=json_body + [guard_validation(ChatCompletionRequest)])
    async def chat_completions(request: ChatCompletionRequest, raw_request: Request):
        return await gateway.generate(request, raw_request,
                                      gateway.state.openai_serving_chat.create_chat_completion)

    @app.post("/v1/completions", dependencies=json_body + [guard_validation(CompletionRequest)])
    async def completions(request: CompletionRequest, raw_request: Request):
        return await gateway.generate(request, raw_request,
                                      gateway.state.openai_serving_completion.create_completion)

    app.get("/v1/models")(gateway.models)
    app.get("/health")(gateway.health)
    app.get("/metrics")(gateway.prometheus_metrics)
    app.get("/v1/routing")(gateway.routing)
    app.post("/admin/telemetry/reset")(gateway.reset_telemetry)
    app.get("/admin/config")(gateway.admin_config)
    app.post("/admin/probes")(gateway.start_probes)
    app.get("/admin/probes")(gateway.probes)
    return app


def gateway_settings(args: dict, log=print) -> GatewaySettings:
    """Validate a Serve application's `args` and resolve model, keys and safety experts."""
    config = GatewayConfig.model_validate(args)
    checkpoint, name = resolve_model(config, log=log)
    users, admin = resolve_keys(config)
    safety, source = resolve_safety_experts(config.telemetry, checkpoint)
    return GatewaySettings(config, checkpoint, name, users, admin, safety, source)


def gateway_application(settings: GatewaySettings) -> serve.Application:
    from serving.probes import ProbeRunner

    config, probes = settings.config, settings.config.probes
    runner = None
    if probes.enabled:
        runner = ProbeRunner.options(
            ray_actor_options={"num_cpus": probes.num_cpus, "num_gpus": probes.num_gpus},
        ).bind(settings.checkpoint, settings.served_model_name, probes.suite, probes.interval_s,
               str(Path(probes.output_dir).expanduser().resolve()), probes.threads)
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
