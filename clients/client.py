"""Python client for the gateway: the OpenAI SDK for chat, plus telemetry and admin calls.

    from clients.client import GatewayClient
    gateway = GatewayClient("http://127.0.0.1:8000", api_key=..., admin_key=...)
    gateway.chat("What is 12 plus 7?")                    # -> str
    gateway.openai.chat.completions.create(...)           # the unmodified OpenAI SDK
    gateway.routing()                                      # live routing telemetry (JSON)
    gateway.chat_with_routing("...")                       # (answer, per-request routing summary)
    gateway.run_probes(wait=True)                          # attack probes (admin key): results

Every failure is a `GatewayError` whose message says what to do: the server is unreachable, a
key was rejected, the request was invalid (with the server's own OpenAI-style message).
"""

from __future__ import annotations

import os
import time
from typing import Any

import httpx
import openai

from serving.protocol import SUMMARY_HEADER  # standard library only: no vLLM, Ray or torch


class GatewayError(RuntimeError):
    """A gateway call failed; the message is meant for the user."""


class GatewayClient:
    def __init__(
        self,
        url: str | None = None,
        *,
        api_key: str | None = None,
        admin_key: str | None = None,
        model: str | None = None,
        timeout: float = 120.0,
    ):
        self.url = (url or os.environ.get("MESA_GATEWAY_URL", "http://127.0.0.1:8000")).rstrip("/")
        keys = os.environ.get("MESA_API_KEYS", "")
        self.api_key = api_key or os.environ.get("MESA_API_KEY") or (keys.split(",")[0].strip() or None)
        self.admin_key = admin_key or os.environ.get("MESA_ADMIN_KEY") or None
        self.timeout = timeout
        self._model = model
        self.openai = openai.OpenAI(
            base_url=self.url + "/v1", api_key=self.api_key or "missing", max_retries=0, timeout=timeout
        )

    # ---- HTTP plumbing ----

    def _request(self, method: str, path: str, *, admin: bool = False, **kwargs) -> httpx.Response:
        key = self.admin_key if admin else self.api_key
        if key is None:
            needed = (
                "an admin key (MESA_ADMIN_KEY or --admin-key)"
                if admin
                else "an API key (MESA_API_KEY / MESA_API_KEYS or --api-key)"
            )
            raise GatewayError(f"{path} needs {needed}")
        headers = {"Authorization": f"Bearer {key}"} | kwargs.pop("headers", {})
        try:
            response = httpx.request(method, self.url + path, headers=headers, timeout=self.timeout, **kwargs)
        except httpx.ConnectError:
            raise GatewayError(
                f"cannot reach the gateway at {self.url}: is it running (make serve)?"
            ) from None
        except httpx.TimeoutException:
            raise GatewayError(f"the gateway at {self.url} did not answer within {self.timeout} s") from None
        if response.status_code >= 400:
            raise GatewayError(_describe_error(response, admin))
        return response

    def _call_openai(self, function, **kwargs):
        try:
            return function(**kwargs)
        except openai.APIConnectionError:
            raise GatewayError(
                f"cannot reach the gateway at {self.url}: is it running (make serve)?"
            ) from None
        except openai.AuthenticationError:
            raise GatewayError("the gateway rejected the API key (401): check MESA_API_KEY") from None
        except openai.APIStatusError as error:
            raise GatewayError(_describe_error(error.response, False)) from None

    # ---- chat ----

    @property
    def model(self) -> str:
        """The served model (the first one the gateway lists, unless given)."""
        if self._model is None:
            models = self._call_openai(self.openai.models.list).data
            if not models:
                raise GatewayError("the gateway serves no model")
            self._model = models[0].id
        return self._model

    def chat(self, prompt: str | list[dict], **params) -> str:
        """One completion's text. `params` are OpenAI chat parameters (max_tokens, temperature, ...)."""
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        response = self._call_openai(
            self.openai.chat.completions.create, model=self.model, messages=messages, **params
        )
        return response.choices[0].message.content or ""

    def chat_with_routing(self, prompt: str | list[dict], **params) -> tuple[str, dict | None]:
        """(answer, the request's routing summary: per-layer expert counts, concentration,
        safety-expert share, the prompt's routing risk). Sent with the admin key when one is set:
        gateways show the summary to the admin key only unless their config opens it to all keys."""
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        body = {"model": self.model, "messages": messages} | params
        data = self._request("POST", "/v1/chat/completions", admin=self.admin_key is not None,
                             json=body, headers={SUMMARY_HEADER: "1"}).json()
        return data["choices"][0]["message"]["content"] or "", data.get("routing_summary")

    # ---- telemetry and admin ----

    def health(self) -> dict:
        try:
            return httpx.get(self.url + "/health", timeout=self.timeout).json()
        except httpx.ConnectError:
            raise GatewayError(
                f"cannot reach the gateway at {self.url}: is it running (make serve)?"
            ) from None

    def routing(self) -> dict:
        """Live routing telemetry: window concentration per phase, safety-expert share, totals.
        Sent with the admin key when one is set: only it sees the safety-expert list (a user key
        gets `safety_experts: null`) unless the gateway's config opens it to all keys."""
        return self._request("GET", "/v1/routing", admin=self.admin_key is not None).json()

    def metrics(self) -> str:
        return httpx.get(self.url + "/metrics", timeout=self.timeout).text

    def admin_config(self) -> dict:
        return self._request("GET", "/admin/config", admin=True).json()

    def reset_telemetry(self) -> None:
        self._request("POST", "/admin/telemetry/reset", admin=True)

    def guard(self) -> dict:
        """The routing guard: policy, risk thresholds (prompt, answer), where they came from."""
        return self._request("GET", "/admin/guard", admin=True).json()

    def set_guard(self, **changes) -> dict:
        """Change the guard's `policy` (observe / flag / block), `threshold` and/or
        `answer_threshold` (admin)."""
        return self._request("POST", "/admin/guard", admin=True, json=changes).json()

    # ---- alert drills (admin; the gateway's config must allow them) ----

    def drill(self) -> dict:
        """The running alert drill, if any."""
        return self._request("GET", "/admin/drill", admin=True).json()

    def start_drill(self, attack: str = "expert_mask", *, pairs="safety_experts", factor: float | None = None,
                    duration_s: float = 300) -> dict:
        """Apply a probe attack to the served engine for `duration_s`: `expert_mask` (of `pairs`:
        [[layer, expert], ...] or the model's `safety_experts`) or `routing_scale` by `factor`
        (also `pairs="all"`). Users are served attacked meanwhile."""
        body = {"attack": attack, "pairs": pairs, "duration_s": duration_s}
        if factor is not None:
            body["factor"] = factor
        return self._request("POST", "/admin/drill", admin=True, json=body).json()

    def stop_drill(self) -> dict:
        return self._request("DELETE", "/admin/drill", admin=True).json()

    # ---- attack probes (admin) ----

    def probes(self) -> dict:
        """The probe replica's state: status, current phase, and the latest result."""
        return self._request("GET", "/admin/probes", admin=True).json()

    def start_probes(self) -> dict:
        """Start a probe run; if one is already running, its state (no second run is queued)."""
        try:
            return self._request("POST", "/admin/probes", admin=True).json()
        except GatewayError as error:
            if "already in progress" not in str(error):
                raise
            return self.probes()

    def run_probes(self, *, wait: bool = True, timeout: float = 3600, poll_s: float = 2.0,
                   progress=None) -> dict:
        """Start a run and (by default) wait for it; returns the finished run's result, or the state
        when not waiting. `progress(state)` is called on every poll."""
        state = self.start_probes()
        if not wait:
            return state
        deadline = time.monotonic() + timeout
        while state["status"] == "running":
            if time.monotonic() > deadline:
                raise GatewayError(f"the probe run did not finish within {timeout:.0f} s")
            time.sleep(poll_s)
            state = self.probes()
            if progress is not None:
                progress(state)
        if state["status"] == "failed":
            raise GatewayError(f"the probe run failed: {state['error']}")
        return state["latest"]


def _describe_error(response: httpx.Response, admin: bool) -> str:
    try:
        message = response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = response.text[:300] or response.reason_phrase
    if response.status_code == 401:
        which = "admin key (MESA_ADMIN_KEY)" if admin else "API key (MESA_API_KEY)"
        return f"the gateway rejected the {which} (401): {message}"
    if response.status_code == 403:
        return f"forbidden (403): {message}"
    return f"the gateway answered {response.status_code}: {message}"


def summarize_routing(telemetry: dict) -> list[str]:
    """Human-readable lines for a `/v1/routing` answer (used by the CLI)."""
    window = telemetry["window"]["all"]
    concentration = window["concentration"]
    lines = [
        f"model {telemetry['model']}: {telemetry['num_layers']} MoE layers x {telemetry['num_experts']} "
        f"experts, top-{telemetry['top_k']}; window {telemetry['window_s']:.0f} s, "
        f"{window['tokens']} tokens"
    ]
    share = window["safety_expert_share"]
    lines.append(
        "safety-expert share: "
        + (
            "unknown (no safety experts configured)"
            if share is None and telemetry["safety_experts"] == []
            else _fmt(share)
        )
    )
    lines.append("layer  top-share  entropy  gini   effective-experts")
    for layer in range(telemetry["num_layers"]):
        lines.append(
            f"{layer:>5}  {_fmt(concentration['top_share'][layer]):>9}  "
            f"{_fmt(concentration['normalized_entropy'][layer]):>7}  "
            f"{_fmt(concentration['gini'][layer]):>5}  "
            f"{_fmt(concentration['effective_experts'][layer], 2):>6}"
        )
    return lines


def summarize_probes(result: dict) -> list[str]:
    """Human-readable lines for a finished probe run (used by the CLI)."""
    finished = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(result["finished_at"]))
    lines = [
        f"model {result['model']}: probe finished {finished} in {result['duration_s']:.0f} s",
        f"general accuracy {_fmt(result['general_accuracy'])}, over-refusal {_fmt(result['over_refusal'])}, "
        f"effective safety experts {_fmt(result['effective_safety_experts'], 2)}",
        "attack                       Safety Rate",
    ]
    for attack, rate in result["safety_rate"].items():
        lines.append(f"{attack:<28} {_fmt(rate)}")
    lines.append(f"full report: {result['report_path']}")
    return lines


def _fmt(value: Any, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"
