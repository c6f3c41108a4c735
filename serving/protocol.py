"""The gateway's wire protocol beyond OpenAI's: header names, public paths, key ids and the
OpenAI-format error body. Standard library only, so `clients/` can import it without pulling in
vLLM, Ray or torch (the JSONResponse builder imports Starlette when it is called)."""

from __future__ import annotations

import hashlib
from http import HTTPStatus

SUMMARY_HEADER = "X-Mesa-Routing-Summary"  # request: "1" asks for the per-request routing summary
REQUEST_ID_HEADER = "X-Request-Id"  # set by Ray Serve's proxy; echoed in the audit log
RETRY_AFTER_HEADER = "Retry-After"  # on a 429: whole seconds until the key is under its limit
GUARD_HEADER = "X-Mesa-Guard"  # response: "flagged" or "blocked" when the routing guard judged it high risk
GUARD_FINISH_REASON = "content_filter"  # a blocked request's finish_reason, as OpenAI's filter gives

PUBLIC_PATHS = frozenset({"/health", "/metrics", "/openapi.json", "/docs"})  # no key needed
GENERATION_PATHS = ("/v1/chat/completions", "/v1/completions")  # the paths per-key limits apply to
KNOWN_ENDPOINTS = GENERATION_PATHS + ("/v1/models", "/v1/routing", "/health", "/metrics")
CHAT_ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
ANONYMOUS_KEY_ID = "anonymous"  # the caller when the gateway runs with allow_unauthenticated
KEY_ID_LENGTH = 8


def endpoint_label(path: str) -> str:
    """A bounded label set: unknown paths collapse to "other"."""
    if path in KNOWN_ENDPOINTS:
        return path
    return "/admin" if path.startswith("/admin/") else "other"


def key_digest(key: str) -> str:
    """Keys are compared by SHA-256 digest, so replicas never hold the keys themselves."""
    return hashlib.sha256(key.encode()).hexdigest()


def key_id(key: str) -> str:
    """The short id of a key in metrics, the audit log and the limits config: the first 8 hex
    characters of its SHA-256 digest. Safe to show; the key cannot be recovered from it."""
    return key_digest(key)[:KEY_ID_LENGTH]


def digest_key_id(digest: str) -> str:
    """The key id of a key known only by its digest ("" = no key: anonymous)."""
    return digest[:KEY_ID_LENGTH] if digest else ANONYMOUS_KEY_ID


def openai_error_body(status: int, message: str, type_: str | None = None,
                      code: int | str | None = None) -> dict:
    """OpenAI's error object. `code` defaults to the HTTP status, as vLLM's own errors do."""
    return {"error": {"message": message, "type": type_ or HTTPStatus(status).phrase,
                      "param": None, "code": status if code is None else code}}


def openai_error(status: int, message: str, type_: str | None = None, *,
                 code: int | str | None = None, headers: dict[str, str] | None = None):
    from starlette.responses import JSONResponse

    return JSONResponse(openai_error_body(status, message, type_, code), status_code=status, headers=headers)


def refusal_body(kind: str, request_id: str, model: str, message: str, prompt_tokens: int,
                 created: int, chunk: bool = False) -> dict:
    """A blocked request's answer in OpenAI's format: one choice, the refusal `message` as its
    content and `finish_reason: "content_filter"`. `kind` is "chat" or "completion"; `chunk`
    gives the streamed form (chat.completion.chunk with a delta, or a text_completion chunk)."""
    if kind == "chat":
        body = {"id": f"chatcmpl-{request_id}", "created": created, "model": model,
                "object": "chat.completion.chunk" if chunk else "chat.completion"}
        content = {"role": "assistant", "content": message}
        choice = {"index": 0, "delta" if chunk else "message": content, "logprobs": None,
                  "finish_reason": GUARD_FINISH_REASON}
    elif kind == "completion":
        body = {"id": f"cmpl-{request_id}", "object": "text_completion", "created": created, "model": model}
        choice = {"index": 0, "text": message, "logprobs": None, "finish_reason": GUARD_FINISH_REASON}
    else:
        raise ValueError(f"kind must be chat or completion, got {kind!r}")
    body["choices"] = [choice]
    body["usage"] = None if chunk else {"prompt_tokens": prompt_tokens, "completion_tokens": 0,
                                        "total_tokens": prompt_tokens}
    return body


def usage_tokens(usage) -> tuple[int, int]:
    """(prompt tokens, completion tokens) of an OpenAI usage object or dict (None: (0, 0))."""
    if usage is None:
        return 0, 0
    get = usage.get if isinstance(usage, dict) else lambda k: getattr(usage, k, None)
    return int(get("prompt_tokens") or 0), int(get("completion_tokens") or 0)
