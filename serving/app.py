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
`serving.audit` (the audit log), `serving.routes` (routes and the middleware), and here the
deployment that owns the engine.
"""

from __future__ import annotations

import asyncio
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

from moe_routing.fingerprint import MANIFEST_FILE, ManifestError, combine, compare, read_manifest
from serving.audit import AuditLog, prompt_text
from serving.auth import KeyChecker, route_path  # noqa: F401  (route_path: its historical import path)
from serving.config import (
    GatewayConfig,
    check_limit_keys,
    resolve_keys,
    resolve_model,
    resolve_safety_experts,
)
from serving.limits import KeyLimiter
from serving.metrics import exposition, gateway_metrics
from serving.protocol import (
    CHAT_ROLES,
    SUMMARY_HEADER,
    digest_key_id,
    endpoint_label,
    openai_error,
    usage_tokens,
)
from serving.routes import create_app
from serving.routing_worker import TRACK_MARKER
from serving.telemetry import RoutingShape, RoutingTelemetry, json_safe, request_summary

logger = logging.getLogger("ray.serve")
WORKER_EXTENSION = "serving.routing_worker.RoutingRecorder"
MAX_REPORTED_MISMATCHES = 50  # /admin/config stays small on a 48-layer x 128-expert model
INTEGRITY_GAUGE = {"ok": 1, "mismatch": 0}  # anything else (no or unreadable manifest, error): -1


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
        if telemetry.enabled:
            if not engine_args.enforce_eager:
                logger.warning("routing telemetry needs eager mode: setting enforce_eager=True")
            engine_args.enforce_eager = True
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
        self.integrity: dict = {"status": "not checked"}
        await self.run_integrity_check()
        self.probe_runner = probe_runner  # a handle to serving.probes.ProbeRunner, or None
        self._probe_seen = {"runs": 0, "failures": 0, "finished_at": None}
        self._probe_poller = None
        if probe_runner is not None:
            self._probe_poller = asyncio.get_running_loop().create_task(self._poll_probes())
        logger.info("gateway ready: model %s (%s), telemetry %s, probes %s", self.name, settings.checkpoint,
                    "on" if telemetry.enabled else "off", "on" if probe_runner is not None else "off")

    def __serve_build_asgi_app__(self):
        return self.http_app

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
        record = raw_request.scope.get("mesa")  # serving.routes.RequestLog
        if record is not None and self.audit is not None and self.audit.include_prompts:
            record.prompt = prompt_text(request)
        result = await create(request, raw_request)
        if isinstance(result, ErrorResponse):
            return JSONResponse(result.model_dump(), status_code=result.error.code)
        if isinstance(result, ChatCompletionResponse | CompletionResponse):
            self._count_usage(result.usage, record)
            body = result.model_dump()
            if key:
                body["routing_summary"] = await self._request_summary(key)
            return JSONResponse(json_safe(body))
        if record is not None:
            record.streaming = True
        stream = self._stream(result, key, raw_request, record)
        return StreamingResponse(stream, media_type="text/event-stream")

    async def _stream(self, chunks, key: str | None, raw_request: Request, record=None):
        async for chunk in chunks:
            if chunk.startswith("data: [DONE]"):
                if key:
                    summary = {"object": "routing.summary", "choices": [],
                               "routing_summary": await self._request_summary(key)}
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
                "safety_experts_source": self.settings.safety_experts_source,
                "integrity": json_safe(self.integrity)}

    async def run_integrity_check(self) -> dict:
        """Compare the engine's router and expert fingerprints with the checkpoint's manifest
        (README, Serving: model integrity); sets the gauge and `self.integrity`. Never raises:
        a failed check is reported, and serving goes on."""
        started = time.monotonic()
        try:
            manifest = read_manifest(self.settings.checkpoint)
        except ManifestError as error:
            result = {"status": "invalid manifest", "error": str(error)}
        else:
            result = {"status": "no manifest"} if manifest is None else await self._compare_engine(manifest)
        result |= {"checked_at": time.time(), "duration_s": round(time.monotonic() - started, 3)}
        self.metrics.integrity_ok.labels(self.name).set(INTEGRITY_GAUGE.get(result["status"], -1))
        if result["status"] == "mismatch":
            logger.warning("model integrity check FAILED for %s: %s of %s (layer, expert) pairs differ "
                           "from %s", self.name, result.get("mismatch_count", "all"),
                           result.get("checked_pairs", "?"), MANIFEST_FILE)
        elif result["status"] != "ok":
            logger.warning("model integrity not checked for %s: %s", self.name, result["status"])
        self.integrity = result
        return result

    async def _compare_engine(self, manifest: dict) -> dict:
        try:
            served = combine(await self.engine.collective_rpc("routing_fingerprint"))
        except Exception as error:  # e.g. an engine layout the fingerprint cannot read
            return {"status": "error", "error": f"{type(error).__name__}: {str(error)[:300]}"}
        try:
            result = compare(manifest, served)
        except ManifestError as error:  # the manifest describes another model: not a match
            return {"status": "mismatch", "error": str(error)}
        mismatches = result.pop("mismatches")
        return {"status": "ok" if result.pop("ok") else "mismatch", **result,
                "mismatch_count": len(mismatches), "mismatches": mismatches[:MAX_REPORTED_MISMATCHES]}

    async def check_integrity(self):
        """POST /admin/integrity: run the check now (e.g. after an incident) and return it."""
        return JSONResponse(json_safe(await self.run_integrity_check()))

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
        if getattr(self, "audit", None) is not None:
            self.audit.close()
        for task in (getattr(self, "_poller", None), getattr(self, "_probe_poller", None)):
            if task is not None:
                task.cancel()
        if getattr(self, "engine", None) is not None:
            self.engine.shutdown()


def gateway_settings(args: dict, log=print) -> GatewaySettings:
    """Validate a Serve application's `args` and resolve model, keys and safety experts."""
    config = GatewayConfig.model_validate(args)
    checkpoint, name = resolve_model(config, log=log)
    users, admin = resolve_keys(config)
    safety, source = resolve_safety_experts(config.telemetry, checkpoint)
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
    return GatewaySettings(config, checkpoint, name, users, admin, safety, source, audit_path)


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
