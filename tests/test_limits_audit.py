"""Per-key limits, key ids, the audit log and their config, without an engine (serving.limits,
serving.audit, serving.auth, serving.protocol, the limits/audit parts of serving.config)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading

import pytest
from pydantic import ValidationError

from serving.audit import AuditLog, audit_record, prompt_text
from serving.auth import KeyChecker
from serving.config import GatewayConfig, LimitsConfig, check_limit_keys, key_digest
from serving.limits import KeyLimiter
from serving.protocol import ANONYMOUS_KEY_ID, digest_key_id, key_id, openai_error_body, usage_tokens

USER, OTHER, ADMIN = "test-user-key-0001", "test-user-key-0002", "test-admin-key-0001"


class Clock:
    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def limiter(rpm=None, tpm=None, clock=None, **per_key):
    return KeyLimiter(lambda key: per_key.get(key, (rpm, tpm)), clock=clock or Clock())


# ---- the limiter ----


def test_requests_per_minute_admits_exactly_the_budget_then_says_when_to_retry():
    clock = Clock()
    limits = limiter(rpm=3, clock=clock)
    assert [limits.admit("a").allowed for _ in range(3)] == [True, True, True]
    clock.now += 10
    denied = limits.admit("a")
    assert not denied.allowed and denied.limit == "requests" and denied.budget == 3
    assert denied.retry_after_s == 50  # the first request leaves the window 60 s after it came
    clock.now += 49.5
    assert limits.admit("a").retry_after_s == 1  # rounded up, never 0
    clock.now += 0.5  # exactly 60 s after the first three: they have left the window
    assert [limits.admit("a").allowed for _ in range(4)] == [True, True, True, False]


def test_the_window_slides_request_by_request():
    clock = Clock()
    limits = limiter(rpm=2, clock=clock)
    assert limits.admit("a").allowed
    clock.now += 30
    assert limits.admit("a").allowed
    clock.now += 20
    assert limits.admit("a").retry_after_s == 10  # the request at t=0 leaves at t=60
    clock.now += 10
    assert limits.admit("a").allowed  # one slot freed; the t=30 request still counts
    assert limits.admit("a").retry_after_s == 30


def test_denied_requests_are_not_counted():
    clock = Clock()
    limits = limiter(rpm=1, clock=clock)
    assert limits.admit("a").allowed
    for _ in range(100):
        clock.now += 0.5
        assert not limits.admit("a").allowed
    clock.now = 1060.0
    assert limits.admit("a").allowed


def test_tokens_per_minute_admits_under_budget_and_charges_when_known():
    clock = Clock()
    limits = limiter(tpm=100, clock=clock)
    assert limits.admit("a").allowed and limits.admit("a").allowed  # nothing charged yet
    limits.charge("a", 60)
    clock.now += 5
    limits.charge("a", 70)  # 130 >= 100: over, though both requests were admitted
    clock.now += 5
    denied = limits.admit("a")
    assert not denied.allowed and denied.limit == "tokens" and denied.budget == 100
    assert denied.retry_after_s == 50  # the 60 tokens leave at t=60, leaving 70 < 100
    clock.now += 50
    assert limits.admit("a").allowed
    limits.charge("a", 29)  # 70 + 29 = 99 < 100: still under
    assert limits.admit("a").allowed
    limits.charge("a", 1)  # exactly the budget: the next request waits
    assert not limits.admit("a").allowed


def test_tokens_retry_after_waits_until_enough_tokens_have_left():
    clock = Clock()
    limits = limiter(tpm=100, clock=clock)
    for tokens in (40, 40, 40):  # charged at t = 0, 10, 20: 120 in the window
        limits.charge("a", tokens)
        clock.now += 10
    # t = 30: dropping the first 40 leaves 80 < 100, at t = 60
    assert limits.admit("a").retry_after_s == 30
    limits2 = limiter(tpm=50, clock=Clock())
    for tokens in (40, 40, 40):
        limits2.charge("a", tokens)
        limits2.clock.now += 10
    # budget 50: two charges must leave (80 -> 40 at t = 70)
    assert limits2.admit("a").retry_after_s == 40


def test_both_limits_must_clear_and_the_longer_wait_is_reported():
    clock = Clock()
    limits = limiter(rpm=1, tpm=10, clock=clock)
    assert limits.admit("a").allowed
    clock.now += 30
    limits.charge("a", 50)
    denied = limits.admit("a")
    assert denied.limit == "tokens" and denied.retry_after_s == 60  # requests would clear at 30


def test_keys_are_independent_and_have_their_own_limits():
    clock = Clock()
    limits = limiter(rpm=1, clock=clock, b=(2, None), c=(None, None))
    assert limits.admit("a").allowed and not limits.admit("a").allowed
    assert limits.admit("b").allowed and limits.admit("b").allowed and not limits.admit("b").allowed
    assert all(limits.admit("c").allowed for _ in range(1000))  # unlimited
    limits.charge("a", 10**6)  # no token limit: charging does nothing
    clock.now += 60
    assert limits.admit("a").allowed


def test_limits_off_admit_everything():
    limits = limiter()
    assert all(limits.admit("a").allowed for _ in range(10_000))
    assert limits._windows == {}  # nothing is tracked


def test_the_limiter_is_thread_safe():
    limits = KeyLimiter(lambda key: (500, None))
    admitted = []

    def hammer():
        admitted.append(sum(limits.admit("a").allowed for _ in range(200)))

    threads = [threading.Thread(target=hammer) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(admitted) == 500


# ---- config ----


def test_limits_config_defaults_off_and_rejects_bad_values_naming_the_key():
    config = GatewayConfig()
    assert config.limits.for_key("0123abcd") == (None, None)
    assert config.audit.path is None and config.audit.include_prompts is False
    for bad, name in (
        ({"limits": {"requests_per_minut": 5}}, "requests_per_minut"),
        ({"limits": {"requests_per_minute": 0}}, "requests_per_minute"),
        ({"limits": {"tokens_per_minute": -1}}, "tokens_per_minute"),
        ({"limits": {"tokens_per_minute": "lots"}}, "tokens_per_minute"),
        ({"limits": {"keys": {"0123abcd": {"rpm": 1}}}}, "rpm"),
        ({"audit": {"max_bytes": 10}}, "max_bytes"),
        ({"audit": {"backup_count": -1}}, "backup_count"),
        ({"audit": {"include_prompt": True}}, "include_prompt"),
    ):
        with pytest.raises(ValidationError, match=name):
            GatewayConfig.model_validate(bad)
    with pytest.raises(ValidationError, match="key ids, not keys"):
        GatewayConfig.model_validate({"limits": {"keys": {USER: {"requests_per_minute": 1}}}})


def test_per_key_overrides_replace_only_the_fields_they_set():
    limits = LimitsConfig.model_validate({
        "requests_per_minute": 60, "tokens_per_minute": 1000,
        "keys": {"0123abcd": {"tokens_per_minute": 50}, "89abcdef": {"requests_per_minute": None}},
    })
    assert limits.for_key("0123abcd") == (60, 50)
    assert limits.for_key("89abcdef") == (None, 1000)
    assert limits.for_key("ffffffff") == (60, 1000)


def test_overrides_must_name_configured_user_keys():
    users = frozenset({key_digest(USER), key_digest(OTHER)})
    good = GatewayConfig.model_validate({"limits": {"keys": {key_id(USER): {"requests_per_minute": 1}}}})
    check_limit_keys(good, users, key_digest(ADMIN))
    unknown = GatewayConfig.model_validate({"limits": {"keys": {"0123abcd": {"requests_per_minute": 1}}}})
    with pytest.raises(ValueError, match="0123abcd"):
        check_limit_keys(unknown, users, key_digest(ADMIN))
    admin = GatewayConfig.model_validate({"limits": {"keys": {key_id(ADMIN): {"requests_per_minute": 1}}}})
    with pytest.raises(ValueError, match="admin key"):
        check_limit_keys(admin, users, key_digest(ADMIN))


# ---- key ids, auth, protocol ----


def test_key_ids_are_digest_prefixes():
    assert key_id(USER) == key_digest(USER)[:8] == digest_key_id(key_digest(USER))
    assert len(key_id(USER)) == 8 and key_id(USER) != key_id(OTHER)
    assert digest_key_id("") == ANONYMOUS_KEY_ID


def test_key_checker_tells_users_admin_and_strangers_apart():
    keys = KeyChecker(frozenset({key_digest(USER)}), key_digest(ADMIN))
    caller, rejection = keys.check("/v1/chat/completions", f"Bearer {USER}".encode())
    assert rejection is None and caller.key_id == key_id(USER) and not caller.is_admin
    caller, rejection = keys.check("/v1/chat/completions", f"bearer {ADMIN}".encode())
    assert rejection is None and caller.is_admin
    assert keys.check("/v1/models", b"Bearer nope-nope-nope")[1].status_code == 401
    assert keys.check("/v1/models", b"")[1].status_code == 401
    assert keys.check("/admin/config", f"Bearer {USER}".encode())[1].status_code == 403
    assert keys.check("/admin/config", b"")[1].status_code == 401
    assert keys.check("/health", b"") == (None, None)
    no_admin = KeyChecker(frozenset({key_digest(USER)}), None)
    assert no_admin.check("/admin/config", f"Bearer {USER}".encode())[1].status_code == 403
    anonymous = KeyChecker(frozenset(), None, allow_unauthenticated=True)
    caller, rejection = anonymous.check("/v1/models", b"Bearer whatever-it-is")
    assert rejection is None and caller.key_id == ANONYMOUS_KEY_ID


def test_error_bodies_and_usage_parsing():
    body = openai_error_body(429, "slow down", "requests", "rate_limit_exceeded")
    assert body == {"error": {"message": "slow down", "type": "requests", "param": None,
                              "code": "rate_limit_exceeded"}}
    assert openai_error_body(404, "no")["error"] == {"message": "no", "type": "Not Found", "param": None,
                                                     "code": 404}
    assert usage_tokens({"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}) == (3, 4)
    assert usage_tokens(None) == (0, 0)

    class Usage:
        prompt_tokens, completion_tokens = 5, None

    assert usage_tokens(Usage()) == (5, 0)


def test_the_protocol_module_is_light_enough_for_clients():
    """clients/ imports serving.protocol: it must not pull in vLLM, Ray or torch."""
    code = ("import sys, serving.protocol, clients.client; "
            "print(sorted(m for m in ('vllm', 'ray', 'torch', 'starlette') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stderr


# ---- the audit log ----


def _record(**changes):
    fields = dict(key_id=key_id(USER), model="organism", endpoint="/v1/chat/completions", status=200,
                  decision="allowed", request_id="req-1", prompt_tokens=12, completion_tokens=5,
                  duration_s=0.123456, prompt=[{"role": "user", "content": "What is 12 plus 7?"}])
    return audit_record(**(fields | changes))


def test_audit_lines_hold_the_fields_and_never_the_key(tmp_path):
    log = AuditLog(tmp_path / "audit" / "audit.jsonl", max_bytes=10**6, backup_count=2)
    log.write(_record())
    log.write(_record(status=429, decision="rate_limited", prompt_tokens=0, completion_tokens=0))
    log.write(_record(key_id=None, status=401, decision="unauthorized"))
    log.close()
    text = (tmp_path / "audit" / "audit.jsonl").read_text()
    lines = [json.loads(line) for line in text.splitlines()]
    assert len(lines) == 3
    first = lines[0]
    assert list(first) == ["time", "request_id", "key_id", "model", "endpoint", "status", "decision",
                           "prompt_tokens", "completion_tokens", "risk", "answer_risk", "duration_s"]
    assert first["time"].endswith("Z") and "T" in first["time"]
    assert first["key_id"] == key_id(USER) and first["risk"] is None and first["duration_s"] == 0.1235
    assert first["answer_risk"] is None
    assert (first["prompt_tokens"], first["completion_tokens"], first["status"]) == (12, 5, 200)
    assert [line["decision"] for line in lines] == ["allowed", "rate_limited", "unauthorized"]
    assert "prompt" not in first and "12 plus 7" not in text  # prompts are opt-in
    for secret in (USER, key_digest(USER)):
        assert secret not in text
    with pytest.raises(ValueError, match="decision"):
        _record(decision="maybe")


def test_audit_prompts_only_when_opted_in(tmp_path):
    log = AuditLog(tmp_path / "audit.jsonl", max_bytes=10**6, backup_count=1, include_prompts=True)
    log.write(_record())
    log.close()
    line = json.loads((tmp_path / "audit.jsonl").read_text())
    assert line["prompt"] == [{"role": "user", "content": "What is 12 plus 7?"}]

    class Chat:
        messages = [{"role": "user", "content": "hi", "name": "x"}]

    class Completion:
        prompt = "2 + 2 ="

    assert prompt_text(Chat()) == [{"role": "user", "content": "hi"}]
    assert prompt_text(Completion()) == "2 + 2 ="


def test_audit_log_rotates_at_its_size(tmp_path):
    path = tmp_path / "audit.jsonl"
    line_bytes = len(json.dumps(_record(prompt=None))) + 1
    log = AuditLog(path, max_bytes=1024, backup_count=2)
    per_file = 1024 // line_bytes
    for _ in range(per_file):
        log.write(_record(prompt=None))
    assert not (tmp_path / "audit.jsonl.1").exists()  # at the size, not before
    log.write(_record(prompt=None))
    assert (tmp_path / "audit.jsonl.1").exists()
    for _ in range(10 * per_file):
        log.write(_record(prompt=None))
    log.close()
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["audit.jsonl", "audit.jsonl.1", "audit.jsonl.2"]  # backup_count kept
    assert all(p.stat().st_size <= 1024 for p in tmp_path.iterdir())
    for p in tmp_path.iterdir():
        assert all(json.loads(line)["decision"] == "allowed" for line in p.read_text().splitlines())
