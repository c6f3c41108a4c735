"""The audit log: one JSON line per finished request, through `logging` with size-based rotation.

A line holds who (key id, never the key), what (model, endpoint, tokens), the gateway's decision
and the outcome (status code); the prompt text only when `audit.include_prompts` is set. `risk`
is the prompt's routing risk score (nats per token, `moe_routing.risk`), `answer_risk` the same
score of the generated tokens; null when the model has no routing profile, telemetry is off, or
(answer) nothing was generated.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
from datetime import UTC, datetime
from itertools import count
from pathlib import Path

# flagged and blocked: the routing guard (serving.guard)
DECISIONS = ("allowed", "flagged", "blocked", "rate_limited", "unauthorized")
_instances = count()


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def audit_record(*, key_id: str | None, model: str, endpoint: str, status: int, decision: str,
                 request_id: str | None, prompt_tokens: int = 0, completion_tokens: int = 0,
                 duration_s: float | None = None, risk: float | None = None,
                 answer_risk: float | None = None, prompt=None,
                 time: str | None = None) -> dict:
    """One line's fields, in a fixed order (`prompt` only when given)."""
    if decision not in DECISIONS:
        raise ValueError(f"decision must be one of {DECISIONS}, got {decision!r}")
    record = {"time": time or utc_now(), "request_id": request_id, "key_id": key_id, "model": model,
              "endpoint": endpoint, "status": status, "decision": decision,
              "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
              "risk": None if risk is None else round(risk, 5),
              "answer_risk": None if answer_risk is None else round(answer_risk, 5),
              "duration_s": None if duration_s is None else round(duration_s, 4)}
    if prompt is not None:
        record["prompt"] = prompt
    return record


class AuditLog:
    """JSON lines to `path`, rotated at `max_bytes` keeping `backup_count` old files. Its logger is
    private (not in logging's registry, no propagation), so audit lines never reach other logs
    and two gateways in one process do not share a file handle."""

    def __init__(self, path: str | Path, *, max_bytes: int, backup_count: int, include_prompts: bool = False):
        self.path, self.include_prompts = Path(path), include_prompts
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._handler = logging.handlers.RotatingFileHandler(
            self.path, maxBytes=max_bytes, backupCount=backup_count, encoding="utf-8")
        self._handler.setFormatter(logging.Formatter("%(message)s"))
        self._logger = logging.Logger(f"mesa.audit.{next(_instances)}", logging.INFO)
        self._logger.propagate = False
        self._logger.addHandler(self._handler)

    def write(self, record: dict) -> None:
        if not self.include_prompts:
            record = {k: v for k, v in record.items() if k != "prompt"}
        self._logger.info(json.dumps(record, ensure_ascii=False, default=str))

    def close(self) -> None:
        self._logger.removeHandler(self._handler)
        self._handler.close()


def prompt_text(request) -> object:
    """What the client asked, for the audit log: chat messages as {role, content} or the prompt."""
    messages = getattr(request, "messages", None)
    if messages is not None:
        return [{"role": m.get("role"), "content": m.get("content")} if isinstance(m, dict)
                else {"role": getattr(m, "role", None), "content": getattr(m, "content", None)}
                for m in messages]
    return getattr(request, "prompt", None)
