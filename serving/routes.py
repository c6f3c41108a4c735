"""The replica's HTTP surface: routes (thin: the work is in `serving.app.Gateway`'s methods) and
the ASGI middleware that checks keys and per-key limits, times requests, and writes the
per-key metrics and the audit line of every finished request."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
from vllm.entrypoints.openai.completion.protocol import CompletionRequest
from vllm.entrypoints.serve.exception_handling.register import init_exception_handler
from vllm.entrypoints.serve.utils.api_utils import validate_json_request

from serving.audit import audit_record
from serving.auth import Caller, route_path
from serving.drill import DrillRequest
from serving.protocol import GENERATION_PATHS, PUBLIC_PATHS, RETRY_AFTER_HEADER, endpoint_label, openai_error

if TYPE_CHECKING:
    from serving.app import Gateway


@dataclass
class RequestLog:
    """What the middleware and the handler learn about one request (kept in scope["mesa"])."""

    caller: Caller | None
    request_id: str | None
    decision: str = "allowed"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    prompt: object = None  # filled only when the audit log includes prompts
    risk: float | None = None  # routing risk of the prompt (serving.telemetry.RequestRisk.score)
    answer_risk: float | None = None  # routing risk of the generated tokens
    streaming: bool = False


class GatewayMiddleware:
    """API keys, per-key limits, request metrics and the audit log, as plain ASGI (streaming
    responses pass through untouched).

    /v1/*: a user or the admin key (401 otherwise); /admin/*: the admin key only (403 for a user
    key); /health and /metrics are open, for probes and scrapers. Over a per-key limit: 429."""

    def __init__(self, app, gateway: Gateway):
        self.app, self.gateway = app, gateway

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        gateway, path = self.gateway, route_path(scope)
        headers = dict(scope["headers"])
        caller, rejection = gateway.keys.check(path, headers.get(b"authorization", b""))
        record = None
        if path not in PUBLIC_PATHS:
            record = RequestLog(caller, headers.get(b"x-request-id", b"").decode("latin-1") or None)
            scope["mesa"] = record
        if rejection is None and caller is not None and path in GENERATION_PATHS:
            rejection = self.admit(caller)
        if rejection is not None:
            record.decision = "rate_limited" if rejection.status_code == 429 else "unauthorized"
            await rejection(scope, receive, send)
            self.finish(path, rejection.status_code, 0.0, record)
            return
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
            self.finish(path, state["code"], time.perf_counter() - started, record)
            if state["first"] is not None and record is not None and record.streaming:
                metrics.time_to_first_token.labels(model, endpoint).observe(state["first"])

    def admit(self, caller: Caller):
        """None, or the 429 for a key over its limit. The admin key is never limited: it is the
        operator's way in during an incident."""
        if caller.is_admin:
            return None
        decision = self.gateway.limiter.admit(caller.key_id)
        if decision.allowed:
            return None
        self.gateway.metrics.key_rate_limited.labels(self.gateway.name, caller.key_id, decision.limit).inc()
        wait = decision.retry_after_s
        return openai_error(
            429, f"Rate limit reached for key {caller.key_id} on {decision.limit} per minute: limit "
            f"{decision.budget} per minute on this replica. Please try again in {wait}s.",
            decision.limit, code="rate_limit_exceeded", headers={RETRY_AFTER_HEADER: str(wait)})

    def finish(self, path: str, code: int, elapsed: float, record: RequestLog | None) -> None:
        gateway = self.gateway
        gateway.count(path, code, elapsed)
        if record is None:  # a public path: no key, no audit line
            return
        caller, tokens = record.caller, record.prompt_tokens + record.completion_tokens
        if caller is not None:
            m, labels = gateway.metrics, (gateway.name, caller.key_id)
            m.key_requests.labels(*labels, str(code)).inc()
            for kind, n in (("prompt", record.prompt_tokens), ("completion", record.completion_tokens)):
                if n:
                    m.key_tokens.labels(*labels, kind).inc(n)
            if not caller.is_admin:
                gateway.limiter.charge(caller.key_id, tokens)
        if gateway.audit is not None:
            gateway.audit.write(audit_record(
                key_id=caller.key_id if caller else None, model=gateway.name, endpoint=endpoint_label(path),
                status=code, decision=record.decision, request_id=record.request_id,
                prompt_tokens=record.prompt_tokens, completion_tokens=record.completion_tokens,
                duration_s=elapsed, risk=record.risk, answer_risk=record.answer_risk,
                prompt=record.prompt))


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


class GuardUpdate(BaseModel):
    """POST /admin/guard: what to change (a field left out stays as it is; threshold null: none)."""

    model_config = ConfigDict(extra="forbid")
    policy: Literal["observe", "flag", "block"] | None = None
    threshold: float | None = Field(None, allow_inf_nan=False)
    answer_threshold: float | None = Field(None, allow_inf_nan=False)


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

    @app.get("/v1/routing")
    async def routing(raw_request: Request):
        return await gateway.routing(raw_request)

    app.post("/admin/telemetry/reset")(gateway.reset_telemetry)
    app.get("/admin/config")(gateway.admin_config)
    app.post("/admin/integrity")(gateway.check_integrity)
    app.get("/admin/guard")(gateway.guard_state)

    @app.post("/admin/guard")
    async def update_guard(update: GuardUpdate):
        changes = update.model_dump(exclude_unset=True)
        if changes.get("policy", "") is None:
            changes.pop("policy")
        return await gateway.update_guard(changes)

    app.get("/admin/drill")(gateway.drill_state)

    @app.post("/admin/drill")
    async def start_drill(drill: DrillRequest):
        return await gateway.start_drill(drill)

    app.delete("/admin/drill")(gateway.stop_drill)
    app.post("/admin/probes")(gateway.start_probes)
    app.get("/admin/probes")(gateway.probes)
    return app
