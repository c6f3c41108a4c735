"""Per-key limits and the audit log through the real gateway (`mesa-serve`: vLLM CPU engine behind
Ray Serve) on the quick organism: a key over its limit gets 429 with Retry-After and an
OpenAI-format body (the OpenAI SDK raises RateLimitError), other keys are still served, and every
finished request has its audit line, with key ids and never a key."""

from __future__ import annotations

import json
import re
import time

import httpx
import openai
import pytest

from launch.processes import gateway_app, running_gateway
from serving.protocol import key_id

pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.vllm]

LIMITED, OTHER, TOKENS, ADMIN = ("limit-user-key-0001", "limit-user-key-0002", "limit-user-key-0003",
                                 "limit-admin-key-0001")
CHAT = {"model": "organism", "messages": [{"role": "user", "content": "What is 12 plus 7?"}],
        "max_tokens": 4, "temperature": 0}


def _post(url: str, key: str | None, path: str = "/v1/chat/completions", body=None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(url + path, json=body or CHAT, headers=headers, timeout=120)


def _samples(text: str) -> dict[tuple, float]:
    """Per-key samples of model organism: (name, key id, code / limit / kind) -> value."""
    from prometheus_client.parser import text_string_to_metric_families

    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = sample.labels
            if "key_id" in labels and labels.get("model") == "organism":
                third = labels.get("code") or labels.get("limit") or labels.get("kind")
                samples[(sample.name, labels["key_id"], third)] = sample.value
    return samples


def _audit_lines(path, count: int, timeout_s: float = 10) -> list[dict]:
    """The audit lines once `count` are there (a line is written just after its response)."""
    deadline = time.monotonic() + timeout_s
    while True:
        lines = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
        if len(lines) >= count or time.monotonic() > deadline:
            return lines
        time.sleep(0.2)


def test_a_key_over_its_limit_gets_429_while_other_keys_are_served(quick_organism, tmp_path):
    audit = tmp_path / "audit" / "audit.jsonl"
    app = gateway_app(
        model=str(quick_organism),
        engine={"dtype": "float32", "gpu_memory_utilization": 0.2, "max_model_len": 512, "max_num_seqs": 8},
        limits={"requests_per_minute": 3,
                "keys": {key_id(TOKENS): {"requests_per_minute": None, "tokens_per_minute": 1}}},
        audit={"path": str(audit), "max_bytes": 1_000_000, "backup_count": 1},
    )
    env = {"MESA_API_KEYS": f"{LIMITED},{OTHER},{TOKENS}", "MESA_ADMIN_KEY": ADMIN}
    with running_gateway([app], env=env, log_path=tmp_path / "gateway.log") as gateway:
        url = gateway.url
        sdk = openai.OpenAI(base_url=url + "/v1", api_key=LIMITED, max_retries=0, timeout=120)
        # three requests within the budget: plain, streamed (no usage chunk asked for), completion
        assert _post(url, LIMITED).status_code == 200
        streamed = list(sdk.chat.completions.create(stream=True, **CHAT))
        # (the barely trained organism may stop at once: a finished stream is what counts here)
        assert any(c.choices and c.choices[0].finish_reason for c in streamed)
        completion = {"model": "organism", "prompt": "2 plus 2 is", "max_tokens": 4}
        assert _post(url, LIMITED, "/v1/completions", completion).status_code == 200

        refused = _post(url, LIMITED)
        assert refused.status_code == 429
        retry_after = refused.headers["retry-after"]
        assert re.fullmatch(r"\d+", retry_after) and 1 <= int(retry_after) <= 60
        error = refused.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert error["type"] == "requests" and error["code"] == "rate_limit_exceeded"
        assert key_id(LIMITED) in error["message"] and LIMITED not in error["message"]
        with pytest.raises(openai.RateLimitError) as raised:
            sdk.chat.completions.create(**CHAT)
        assert raised.value.status_code == 429 and raised.value.response.headers["retry-after"]

        # other keys are unaffected; the admin key is never limited
        assert all(_post(url, OTHER).status_code == 200 for _ in range(3))
        assert all(_post(url, ADMIN).status_code == 200 for _ in range(4))
        # a tokens-per-minute budget: the first request is admitted, its tokens are charged
        assert _post(url, TOKENS).status_code == 200
        over = _post(url, TOKENS)
        assert over.status_code == 429 and over.json()["error"]["type"] == "tokens"
        assert _post(url, None).status_code == 401

        metrics = _samples(httpx.get(url + "/metrics").text)
        limited = key_id(LIMITED)
        assert metrics[("mesa_gateway_key_rate_limited_total", limited, "requests")] == 2
        assert metrics[("mesa_gateway_key_requests_total", limited, "200")] == 3
        assert metrics[("mesa_gateway_key_requests_total", limited, "429")] == 2
        assert metrics[("mesa_gateway_key_requests_total", key_id(OTHER), "200")] == 3
        assert metrics[("mesa_gateway_key_requests_total", key_id(ADMIN), "200")] == 4
        assert metrics[("mesa_gateway_key_rate_limited_total", key_id(TOKENS), "tokens")] == 1
        assert metrics[("mesa_gateway_key_tokens_total", limited, "completion")] > 0

        lines = _audit_lines(audit, 15)
        log_text = gateway.log_path.read_text(errors="replace")
    assert f"user key ids: {', '.join(sorted(key_id(k) for k in (LIMITED, OTHER, TOKENS)))}" in log_text
    assert " 500 " not in log_text.replace("HTTP/1.1", "")

    assert len(lines) == 15, lines  # 5 + 3 + 4 + 2 + 1; /metrics is not audited
    mine = [line for line in lines if line["key_id"] == limited]
    assert [(line["status"], line["decision"]) for line in mine] == (
        [(200, "allowed")] * 3 + [(429, "rate_limited")] * 2)
    assert [line["endpoint"] for line in mine[:3]] == ["/v1/chat/completions"] * 2 + ["/v1/completions"]
    for line in mine[:3]:  # tokens known for every finished request, streamed ones included
        assert line["prompt_tokens"] > 0 and line["completion_tokens"] > 0
        # the prompt's routing risk (the gateway profiled the organism at start)
        assert line["model"] == "organism" and isinstance(line["risk"], float) and line["request_id"]
        assert isinstance(line["answer_risk"], float)  # and its answer's (more than one token generated)
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", line["time"])
    assert mine[3]["prompt_tokens"] == mine[3]["completion_tokens"] == 0
    assert mine[3]["risk"] is None and mine[3]["answer_risk"] is None  # refused before the engine saw it
    tokens_key = [line["decision"] for line in lines if line["key_id"] == key_id(TOKENS)]
    assert tokens_key == ["allowed", "rate_limited"]
    assert sum(line["key_id"] == key_id(ADMIN) and line["status"] == 200 for line in lines) == 4
    assert [line["decision"] for line in lines if line["key_id"] is None] == ["unauthorized"]
    assert all("prompt" not in line for line in lines)  # audit.include_prompts is off
    text = audit.read_text()
    for key in (LIMITED, OTHER, TOKENS, ADMIN):
        assert key not in text
