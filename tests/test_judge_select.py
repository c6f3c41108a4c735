"""Choosing the suite's refusal judge: settings, the factory, the endpoint judge against a real
HTTP server, the model judge on a tiny local checkpoint, and the validation figures of a report."""

from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from pydantic import ValidationError

from safety_eval.judge import (
    ORGANISM_REFUSAL,
    EndpointJudge,
    JudgeError,
    JudgeSettings,
    KeywordJudge,
    ModelJudge,
    build_judge,
    judge_line,
    judge_report,
    load_judge_examples,
    validate_judge,
)

SECRET = "sk-test-Zq8Vd3-do-not-print"
KEY_ENV = "MESA_TEST_JUDGE_KEY"


# ---- a real OpenAI-compatible judge server (stdlib http.server in a thread) ----


class FakeJudgeServer:
    """Answers /v1/chat/completions by `mode`: "rule" says yes exactly when the KeywordJudge calls
    the response a refusal (so the endpoint judge must reproduce the keyword judge's figures);
    "500", "garbage" (not JSON), "shape" (JSON, no choices), "banana" (no yes/no), "401",
    "slow" (sleeps past any short timeout), "probe_then_503" (one good answer, then 503)."""

    def __init__(self, mode: str = "rule"):
        self.mode = mode
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        self.keyword = KeywordJudge()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def _reply(self, status: int, body: bytes | str, content_type="application/json"):
                data = body.encode() if isinstance(body, str) else body
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                server.record(self, None)
                if self.path == "/v1/models":
                    self._reply(200, json.dumps({"object": "list", "data": [{"id": "judge-model"}]}))
                else:
                    self._reply(404, '{"error": "not found"}')

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                count = server.record(self, body)
                mode = server.mode
                if self.path != "/v1/chat/completions":
                    return self._reply(404, '{"error": "not found"}')
                if mode == "500":
                    return self._reply(500, "internal error")
                if mode == "401":
                    return self._reply(401, '{"error": {"message": "invalid key"}}')
                if mode == "garbage":
                    return self._reply(200, "<html>definitely not json</html>", "text/html")
                if mode == "shape":
                    return self._reply(200, json.dumps({"result": "yes"}))
                if mode == "slow":
                    time.sleep(1.5)
                if mode == "probe_then_503" and count > 1:
                    return self._reply(503, "overloaded")
                content = "banana" if mode == "banana" else server.answer(body)
                self._reply(200, json.dumps({
                    "id": "cmpl-1", "object": "chat.completion", "model": body["model"],
                    "choices": [{"index": 0, "finish_reason": "stop",
                                 "message": {"role": "assistant", "content": content}}],
                }))

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def record(self, handler, body) -> int:
        with self.lock:
            self.requests.append({"path": handler.path, "auth": handler.headers.get("Authorization"),
                                  "body": body})
            return sum(r["path"] == "/v1/chat/completions" for r in self.requests)

    def answer(self, body: dict) -> str:
        query = body["messages"][-1]["content"]
        request = query.split("[REQUEST]:\n", 1)[1].split("\n\n[RESPONSE]:\n", 1)[0]
        response = query.split("[RESPONSE]:\n", 1)[1].rsplit("\n\n---\nRules:", 1)[0]
        return "Yes." if self.keyword.refused(request, response) else "No"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    servers = []

    def start(mode="rule"):
        servers.append(FakeJudgeServer(mode))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def endpoint(url: str, **kw) -> JudgeSettings:
    return JudgeSettings(kind="endpoint", base_url=url, **kw)


# ---- settings ----


def test_default_settings_are_the_keyword_judge():
    settings = JudgeSettings()
    judge = build_judge(settings)
    assert isinstance(judge, KeywordJudge) and judge.window == 160
    assert isinstance(build_judge(JudgeSettings(window=40)), KeywordJudge)
    assert build_judge(JudgeSettings(window=40)).window == 40


def test_unknown_kind_is_rejected_by_name():
    with pytest.raises(ValidationError, match="kind"):
        JudgeSettings(kind="oracle")


def test_missing_base_url_and_checkpoint_are_clear_errors():
    with pytest.raises(ValidationError, match="judge kind 'endpoint' needs base_url"):
        JudgeSettings(kind="endpoint")
    with pytest.raises(ValidationError, match="judge kind 'model' needs checkpoint"):
        JudgeSettings(kind="model")


def test_bad_values_and_unknown_keys_are_rejected():
    with pytest.raises(ValidationError, match="base_url must be an http"):
        JudgeSettings(kind="endpoint", base_url="127.0.0.1:8000")
    with pytest.raises(ValidationError, match="device"):
        JudgeSettings(kind="model", checkpoint="x", device="gpu")
    with pytest.raises(ValidationError, match="concurrency"):
        endpoint("http://h", concurrency=0)
    with pytest.raises(ValidationError, match="extra"):
        JudgeSettings.model_validate({"kind": "keyword", "windw": 3})


def test_settings_of_another_kind_are_rejected():
    with pytest.raises(ValidationError, match="base_url is for kind endpoint"):
        JudgeSettings(base_url="http://127.0.0.1:8000")  # kind keyword by default
    with pytest.raises(ValidationError, match="checkpoint is for kind model"):
        JudgeSettings(kind="endpoint", base_url="http://h", checkpoint="/ckpt")
    # A dumped configuration (every field, defaults included) validates again.
    dumped = endpoint("http://h:1/v1", model="m").model_dump()
    assert JudgeSettings.model_validate(dumped) == endpoint("http://h:1/v1", model="m")
    assert JudgeSettings.model_validate(JudgeSettings().model_dump()) == JudgeSettings()


def test_a_key_in_the_config_is_refused_without_echoing_it():
    for data in (
        {"kind": "endpoint", "base_url": "http://h", "api_key": SECRET},
        {"kind": "endpoint", "base_url": "http://h", "token": SECRET},
        {"kind": "endpoint", "base_url": "http://h", "api_key_env": SECRET},  # the key, not its name
    ):
        with pytest.raises(JudgeError) as error:
            JudgeSettings.model_validate(data)
        assert SECRET not in str(error.value)
        assert "api_key_env" in str(error.value)


def test_judge_settings_in_a_suite_config(tmp_path):
    from moe_routing.config import load_yaml_config
    from safety_eval.settings import SuiteSettings

    if "judge" not in SuiteSettings.model_fields:
        pytest.skip("SuiteSettings has no judge field yet (safety_eval/settings.py)")
    path = tmp_path / "suite.yaml"
    path.write_text("judge:\n  kind: endpoint\n  base_url: http://127.0.0.1:8001/v1\n  model: m\n"
                    f"  api_key_env: {KEY_ENV}\n")
    settings = load_yaml_config(SuiteSettings, path, "suite config")
    assert settings.judge.kind == "endpoint" and settings.judge.api_key_env == KEY_ENV
    assert SuiteSettings().judge == JudgeSettings()
    path.write_text("judge:\n  kind: endpoint\n")
    with pytest.raises(ValidationError, match="needs base_url"):
        load_yaml_config(SuiteSettings, path, "suite config")


# ---- the report entry ----


def test_keyword_judge_report_entry():
    settings = JudgeSettings()
    examples = load_judge_examples()
    entry = judge_report(settings, build_judge(settings))
    expected = validate_judge(KeywordJudge(), examples)
    assert entry["kind"] == "keyword"
    assert entry["settings"] == {"kind": "keyword", "window": 160, "examples": None, "min_accuracy": None}
    v = entry["validation"]
    assert v["n"] == len(examples) == expected.n
    assert v["accuracy"]["k"] == expected.tp + expected.tn and v["accuracy"]["n"] == expected.n
    low, high = v["accuracy"]["interval"]
    assert low <= v["accuracy"]["rate"] <= high
    refusal, compliance = v["confusion"]["refusal"], v["confusion"]["compliance"]
    assert (refusal["judged_refusal"], refusal["judged_compliance"]) == (expected.tp, expected.fn)
    assert (compliance["judged_refusal"], compliance["judged_compliance"]) == (expected.fp, expected.tn)
    assert refusal["n"] + compliance["n"] == v["n"]
    assert refusal["recall"]["interval"] is not None and compliance["recall"]["interval"] is not None
    assert v["misjudged"] == len(expected.errors) and "unparsed" not in v
    line = judge_line(entry)
    assert line.startswith("judge: keyword") and f"on {v['n']} labelled examples" in line
    json.dumps(entry)  # goes into report.json as is


def test_min_accuracy_fails_a_weak_judge():
    class AlwaysRefuses:
        def judge(self, prompts, responses):
            return [True] * len(prompts)

    with pytest.raises(JudgeError, match="below min_accuracy 0.9"):
        judge_report(JudgeSettings(min_accuracy=0.9), AlwaysRefuses())


def test_custom_examples_file(tmp_path):
    path = tmp_path / "labels.jsonl"
    rows = [{"prompt": "p", "response": ORGANISM_REFUSAL, "refusal": True},
            {"prompt": "p", "response": "Sure: run `kill PID`.", "refusal": False}]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    settings = JudgeSettings(examples=str(path))
    entry = judge_report(settings, build_judge(settings))
    assert entry["validation"]["n"] == 2 and entry["validation"]["source"] == str(path)
    with pytest.raises(JudgeError, match="judge examples"):
        judge_report(JudgeSettings(examples=str(tmp_path / "missing.jsonl")), KeywordJudge())


# ---- the endpoint judge against a real HTTP server ----


def test_endpoint_judge_reproduces_the_rule_and_keeps_the_key_secret(server, monkeypatch):
    fake = server("rule")
    monkeypatch.setenv(KEY_ENV, SECRET)
    settings = endpoint(fake.url, api_key_env=KEY_ENV, concurrency=4)  # server root: /v1 is added
    judge = build_judge(settings)
    assert isinstance(judge, EndpointJudge) and judge.model == "judge-model"  # from /v1/models
    assert SECRET not in repr(judge)
    entry = judge_report(settings, judge)
    keyword = judge_report(JudgeSettings(), KeywordJudge())
    assert entry["kind"] == "endpoint" and entry["served_model"] == "judge-model"
    assert "(judge-model)" in judge_line(entry)
    assert entry["validation"]["confusion"] == keyword["validation"]["confusion"]
    assert entry["validation"]["accuracy"] == keyword["validation"]["accuracy"]
    assert entry["validation"]["unparsed"] == 0
    assert entry["settings"]["base_url"] == fake.url and entry["settings"]["api_key_env"] == KEY_ENV
    chats = [r for r in fake.requests if r["path"] == "/v1/chat/completions"]
    assert len(chats) == 1 + entry["validation"]["n"]  # the probe, then one request per example
    assert all(r["auth"] == f"Bearer {SECRET}" for r in fake.requests)
    body = chats[-1]["body"]
    assert body["model"] == "judge-model" and body["temperature"] == 0 and body["max_tokens"] == 8
    assert "Answer:" in body["messages"][0]["content"]
    assert SECRET not in json.dumps(entry) and SECRET not in judge_line(entry)
    assert judge.judge([], []) == []
    judge.close()


def test_endpoint_judge_at_v1_url_with_a_model_name_and_no_key(server):
    fake = server("rule")
    judge = build_judge(endpoint(fake.url + "/v1/", model="named"))
    assert judge.judge(["q", "q"], [ORGANISM_REFUSAL, "Sure, here it is."]) == [True, False]
    assert not any(r["path"] == "/v1/models" for r in fake.requests)
    assert all(r["auth"] is None for r in fake.requests)
    assert fake.requests[-1]["body"]["model"] == "named"


def test_unset_key_variable_is_named(monkeypatch, server):
    monkeypatch.delenv(KEY_ENV, raising=False)
    with pytest.raises(JudgeError, match=f"environment variable {KEY_ENV} .*not set"):
        build_judge(endpoint(server("rule").url, api_key_env=KEY_ENV))


def test_unreachable_endpoint_is_one_clear_error():
    port = closed_port()
    started = time.monotonic()
    with pytest.raises(JudgeError) as error:
        build_judge(endpoint(f"http://127.0.0.1:{port}", model="m", retries=5))
    message = str(error.value)
    assert message.startswith(f"judge endpoint http://127.0.0.1:{port}/v1/chat/completions: ")
    assert "cannot connect" in message
    assert time.monotonic() - started < 5  # the probe does not retry


@pytest.mark.parametrize(("mode", "reason"), [
    ("500", "HTTP 500: internal error"),
    ("garbage", "not JSON"),
    ("shape", "not an OpenAI chat completion"),
    ("banana", "'banana' has no yes/no"),
    ("401", "HTTP 401 (the key from $MESA_TEST_JUDGE_KEY was rejected)"),
])
def test_a_broken_endpoint_fails_the_probe(server, monkeypatch, mode, reason):
    fake = server(mode)
    monkeypatch.setenv(KEY_ENV, SECRET)
    with pytest.raises(JudgeError) as error:
        build_judge(endpoint(fake.url, model="m", api_key_env=KEY_ENV))
    message = str(error.value)
    assert message.startswith(f"judge endpoint {fake.url}/v1/chat/completions: ")
    assert reason in message and SECRET not in message


def test_timeout_is_named(server):
    fake = server("slow")
    with pytest.raises(JudgeError, match=r"no answer within the 0.3 s timeout"):
        build_judge(endpoint(fake.url, model="m", timeout=0.3))


def test_endpoint_failing_mid_run_retries_then_raises(server):
    fake = server("probe_then_503")
    judge = build_judge(endpoint(fake.url, model="m", retries=1, concurrency=2))  # the probe passes
    with pytest.raises(JudgeError, match=r"HTTP 503: overloaded \(after 2 tries\)"):
        judge.judge(["q"] * 3, ["a"] * 3)


def test_unparsed_endpoint_answers_fall_back_and_are_counted(server):
    fake = server("rule")
    judge = build_judge(endpoint(fake.url, model="m"))
    fake.mode = "banana"  # after the probe
    assert judge.judge(["q", "q"], [ORGANISM_REFUSAL, "Sure."]) == [True, False]  # keyword fallback
    assert judge.unparsed == 2


# ---- the model judge on a tiny local checkpoint ----


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    from moe_routing.tiny import save_tiny_checkpoint

    # The judge prompt is ~1,200 byte tokens: room for it.
    return save_tiny_checkpoint("qwen3_moe", tmp_path_factory.mktemp("judge") / "tiny",
                                max_position_embeddings=2048)


def test_model_judge_on_a_tiny_checkpoint(tiny_checkpoint):
    settings = JudgeSettings(kind="model", checkpoint=str(tiny_checkpoint), device="cpu",
                             dtype="float32", max_new_tokens=2, batch_size=16)
    judge = build_judge(settings)
    assert isinstance(judge, ModelJudge) and judge.max_new_tokens == 2
    examples = load_judge_examples()
    subset = [e for e in examples if e["refusal"]][:6] + [e for e in examples if not e["refusal"]][:6]
    entry = judge_report(settings, judge, subset)
    v = entry["validation"]
    # A random tiny model's yes/no is noise: check the plumbing and the figures' shape only.
    assert entry["kind"] == "model" and entry["settings"]["checkpoint"] == str(tiny_checkpoint)
    assert v["n"] == 12 and v["confusion"]["refusal"]["n"] == 6 and v["confusion"]["compliance"]["n"] == 6
    assert v["accuracy"]["n"] == 12 and len(v["accuracy"]["interval"]) == 2
    assert 0 <= v["unparsed"] <= 12
    assert judge_line(entry).startswith(f"judge: model {tiny_checkpoint}: accuracy ")


def test_model_judge_checkpoint_that_does_not_load(tmp_path):
    missing = tmp_path / "no-such-checkpoint"
    with pytest.raises(JudgeError, match=f"judge checkpoint {missing}: cannot load it"):
        build_judge(JudgeSettings(kind="model", checkpoint=str(missing), device="cpu"))


# ---- mesa-eval ----


def test_mesa_eval_reports_an_unreachable_judge_in_one_line(tmp_path, capsys, monkeypatch):
    import safety_eval.suite as suite
    from moe_routing.config import load_yaml_config
    from safety_eval.settings import SuiteSettings

    if "judge" not in SuiteSettings.model_fields:  # until safety_eval/settings.py has the field
        class WithJudge(SuiteSettings):
            judge: JudgeSettings = JudgeSettings()

        monkeypatch.setattr(suite, "load_settings", lambda p: load_yaml_config(WithJudge, p, "suite config"))
    port = closed_port()
    config = tmp_path / "suite.yaml"
    config.write_text(f"judge:\n  kind: endpoint\n  base_url: http://127.0.0.1:{port}/v1\n  model: m\n")
    # The judge is checked before the checkpoint is even loaded: none is needed here.
    code = suite.main(["--checkpoint", str(tmp_path / "unused"), "--output", str(tmp_path / "out"),
                       "--config", str(config)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip().count("\n") == 0 and "Traceback" not in err
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    assert err.startswith(f"mesa-eval: judge endpoint {url}: cannot connect")
