"""Per-model alert baselines (issue 17, item 3): the served model's routing profile, the baselines
and safety experts the gateway derives from it, their export, and the rules that compare live
values with them. The organism's weights differ between machines, so every check is a relation
(the same definition on the same counts, live above or below baseline + margin), never a figure."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest
import yaml
from conftest import require_binary
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError

from moe_routing.stats import (
    RoutingCounts,
    concentration,
    expert_frequency,
    risk_difference,
    safety_critical_ranking,
    top_pairs,
)
from serving.config import (
    TelemetryConfig,
    baseline_prompts,
    find_routing_profile,
    resolve_routing_reference,
    resolve_safety_experts,
)
from serving.metrics import GatewayMetrics
from serving.telemetry import (
    RoutingProfile,
    RoutingShape,
    RoutingTelemetry,
    counts_from_requests,
    json_safe,
    routing_baseline,
    safety_share,
)

L, E, K = 3, 8, 2
SHAPE = RoutingShape(L, E, K)


def _counts(seed: int, skew: float, sequences: int = 12) -> RoutingCounts:
    """Valid top-k counts: every token picks K distinct experts per layer, from a skewed draw."""
    rng = np.random.default_rng(seed)
    weights = rng.dirichlet(np.full(E, skew), size=L)
    tokens = rng.integers(3, 20, size=sequences)
    hits = np.zeros((sequences, L, E), np.int64)
    for s, n in enumerate(tokens):
        for layer in range(L):
            for _ in range(n):
                hits[s, layer, rng.choice(E, size=K, replace=False, p=weights[layer])] += 1
    return RoutingCounts(hits, tokens, None, K)


@pytest.fixture(scope="module")
def counts():
    return _counts(1, skew=0.5), _counts(2, skew=2.0)  # harmful, benign


def test_baseline_applies_the_live_definitions_to_the_profiled_counts(counts):
    harmful, benign = counts
    profile = RoutingProfile.from_counts(harmful, benign, "test")
    experts = [(0, 1), (2, 5)]
    baseline = routing_baseline(profile, top_n=K, safety_experts=experts)
    for traffic, c in (("harmful", harmful), ("benign", benign)):
        # Frequencies or hit counts: the same top share and safety share.
        np.testing.assert_allclose(baseline.top_share[traffic], concentration(c.hits, K).top_share)
        assert baseline.safety_share[traffic] == pytest.approx(safety_share(c.hits, experts))
    assert baseline.source == "test" and baseline.top_n == K


def test_safety_experts_of_a_profile_are_its_top_pairs_by_risk_difference(counts):
    harmful, benign = counts
    profile = RoutingProfile.from_counts(harmful, benign, "test")
    experts = profile.safety_experts(6)
    assert experts == top_pairs(risk_difference(harmful, benign), 6, top_k=K)
    ranking = safety_critical_ranking(harmful, benign, top_n=6, n_bootstrap=0, per_layer_cap=E - K)
    assert experts == [(s.layer, s.expert) for s in ranking]
    assert len(profile.safety_experts(10_000)) == L * (E - K)  # capped: a mask leaves top_k experts


def test_a_profile_of_another_model_is_refused(counts):
    profile = RoutingProfile.from_counts(*counts, "other.npz")
    profile.check_matches(SHAPE)
    with pytest.raises(ValueError, match="other.npz.*served model has 4 x 8"):
        profile.check_matches(RoutingShape(4, E, K))
    with pytest.raises(ValueError, match="top-4"):
        profile.check_matches(RoutingShape(L, E, 4))


def test_counts_from_tracked_requests(counts):
    harmful, _ = counts
    rebuilt = counts_from_requests(harmful.sequence_hits.tolist(), K)
    np.testing.assert_array_equal(rebuilt.sequence_tokens, harmful.sequence_tokens)
    np.testing.assert_array_equal(rebuilt.hits, harmful.hits)
    with pytest.raises(ValueError, match="at least one request"):
        counts_from_requests([], K)


def test_profiles_from_counts_files_evaluation_reports_and_the_alignment_layout(tmp_path, counts):
    harmful, benign = counts
    expected = RoutingProfile.from_counts(harmful, benign, "x")
    harmful.save(tmp_path / "h.npz")
    benign.save(tmp_path / "b.npz")
    paths = {"harmful": str(tmp_path / "h.npz"), "benign": str(tmp_path / "b.npz")}
    files = TelemetryConfig(baseline_profile=paths)
    profile = find_routing_profile(files, str(tmp_path))
    np.testing.assert_array_equal(profile.harmful, expected.harmful)
    np.testing.assert_array_equal(profile.benign, expected.benign)
    assert "h.npz" in profile.source

    report = tmp_path / "report.json"  # an evaluation report: rounded frequencies, top_k
    report.write_text(json.dumps({"top_k": K, "safety_critical": [], "routing": {
        "harmful_frequency": expert_frequency(harmful).round(5).tolist(),
        "benign_frequency": expert_frequency(benign).round(5).tolist()}}))
    for config in (TelemetryConfig(baseline_profile=str(report)), TelemetryConfig(safety_report=str(report))):
        profile = find_routing_profile(config, str(tmp_path))
        np.testing.assert_allclose(profile.harmful, expected.harmful, atol=1e-5)
        assert profile.source == str(report)

    run = tmp_path / "run"  # the alignment job: run/model is the aligned checkpoint
    (run / "model").mkdir(parents=True)
    (run / "profile").mkdir()
    harmful.save(run / "profile" / "aligned-safety.npz")
    benign.save(run / "profile" / "aligned-general.npz")
    assert find_routing_profile(TelemetryConfig(), str(run / "model")) is None  # not an alignment export
    (run / "model" / "alignment.json").write_text(json.dumps({"trained_experts": []}))
    profile = find_routing_profile(TelemetryConfig(), str(run / "model"))
    np.testing.assert_array_equal(profile.benign, expected.benign)
    assert "aligned-safety.npz" in profile.source


def test_bad_profile_configs_say_what_is_wrong(tmp_path, counts):
    with pytest.raises(ValueError, match="not found"):
        find_routing_profile(TelemetryConfig(baseline_profile=str(tmp_path / "none.json")), ".")
    other = tmp_path / "alignment-report.json"
    other.write_text(json.dumps({"trained_experts": [[0, 1]]}))
    with pytest.raises(ValueError, match="not an evaluation report"):
        find_routing_profile(TelemetryConfig(baseline_profile=str(other)), ".")
    counts[0].save(tmp_path / "h.npz")
    with pytest.raises(ValueError, match="routing counts not found"):
        find_routing_profile(TelemetryConfig(baseline_profile={"harmful": str(tmp_path / "h.npz"),
                                                               "benign": str(tmp_path / "b.npz")}), ".")
    with pytest.raises(ValidationError, match="baseline_prompts"):
        TelemetryConfig(baseline_prompts=3)
    with pytest.raises(ValidationError, match="harmfull"):
        TelemetryConfig(baseline_profile={"harmfull": "h.npz", "benign": "b.npz"})


def test_named_safety_experts_win_and_an_alignment_without_trained_experts_names_none(tmp_path):
    named = TelemetryConfig(safety_experts=[[1, 2]])
    assert resolve_safety_experts(named, str(tmp_path)) == ([(1, 2)], "config")
    assert resolve_safety_experts(TelemetryConfig(safety_experts=[]), str(tmp_path)) == ([], "config")
    (tmp_path / "alignment.json").write_text(json.dumps({"trained_experts": []}))  # e.g. LoRA
    assert resolve_safety_experts(TelemetryConfig(), str(tmp_path)) == ([], "")  # ranked on the profile


def test_without_a_profile_the_replica_profiles_identification_prompts_at_start(tmp_path, counts):
    from safety_eval.harness import EvalSets

    lines = []
    config = TelemetryConfig(baseline_prompts=8)
    profile, prompts = resolve_routing_reference(config, str(tmp_path), lines.append)
    assert profile is None
    harmful, benign = prompts
    assert len(harmful) == len(benign) == 8
    assert (harmful, benign) == baseline_prompts(str(tmp_path), 8)  # the same prompts every start
    held_out = EvalSets.for_checkpoint(str(tmp_path))
    assert not set(harmful + benign) & set(held_out.harmful + held_out.benign)  # never the test prompts
    assert "profiles 8 harmful and 8 benign" in lines[-1]
    assert resolve_routing_reference(TelemetryConfig(baseline_prompts=0), ".", lines.append) == (None, None)
    assert resolve_routing_reference(TelemetryConfig(enabled=False), ".", lines.append) == (None, None)
    counts[0].save(tmp_path / "h.npz")
    counts[1].save(tmp_path / "b.npz")
    files = {"harmful": str(tmp_path / "h.npz"), "benign": str(tmp_path / "b.npz")}
    profile, prompts = resolve_routing_reference(TelemetryConfig(baseline_profile=files), ".", lines.append)
    assert prompts is None and "h.npz" in profile.source and "alert baselines from" in lines[-1]


def _telemetry(counts, safety=((0, 1), (1, 3)), registry=None):
    metrics = GatewayMetrics(registry or CollectorRegistry())
    baseline = routing_baseline(RoutingProfile.from_counts(*counts, "profile"), K, list(safety))
    telemetry = RoutingTelemetry("m", SHAPE, metrics, window_s=60, safety_experts=list(safety),
                                 baseline=baseline, safety_experts_source="ranked")
    return telemetry, metrics, baseline


def _gauge(metrics, name: str, **labels) -> float:
    return getattr(metrics, name).labels(**labels)._value.get()


def test_the_telemetry_exports_the_baselines_and_shows_their_sources(counts):
    telemetry, metrics, baseline = _telemetry(counts)
    for traffic in ("benign", "harmful"):
        for layer in range(L):
            assert _gauge(metrics, "top_share_baseline", model="m", layer=str(layer), traffic=traffic) == \
                pytest.approx(baseline.top_share[traffic][layer])
        assert _gauge(metrics, "safety_expert_share_baseline", model="m", traffic=traffic) == \
            pytest.approx(baseline.safety_share[traffic])
    summary = json.loads(json.dumps(json_safe(telemetry.summary()), allow_nan=False))
    assert summary["safety_experts_source"] == "ranked"
    assert summary["baseline"]["source"] == "profile"
    assert summary["baseline"]["top_share"]["benign"] == pytest.approx(baseline.top_share["benign"], abs=1e-5)


def test_traffic_before_the_start_snapshot_stays_out_of_the_counters(counts):
    telemetry, metrics, _ = _telemetry(counts)
    profiled = np.zeros((2, L, E), np.int64)
    profiled[0, :, :K] = 10  # the baseline profile's 10 prompt tokens
    telemetry.start_from({"hits": profiled.tolist(), "tokens": [10, 0]})
    later = profiled.copy()
    later[0, :, K : 2 * K] += 3  # 3 user tokens
    telemetry.update({"hits": later.tolist(), "tokens": [13, 0]}, now=1.0)
    assert metrics.routed_tokens.labels("m", "prompt")._value.get() == 3
    summary = telemetry.summary()
    assert summary["total"]["prompt"]["tokens"] == 3 and summary["window"]["prompt"]["tokens"] == 3
    assert np.asarray(summary["total"]["prompt"]["hits"]).sum() == 3 * K * L


def _exported_series(metrics_registry) -> list[dict]:
    """The gateway's exposition as promtool input series (one constant value over the test)."""
    series = []
    for family in text_string_to_metric_families(generate_latest(metrics_registry).decode()):
        for sample in family.samples:
            labels = sample.labels | {"instance": "127.0.0.1:8000", "job": "mesa-gateway"}
            text = ", ".join(f'{k}="{v}"' for k, v in labels.items())
            series.append({"series": f"{sample.name}{{{text}}}", "values": f"{sample.value}x40"})
    return series


def test_the_shipped_rules_fire_above_the_exported_baseline_plus_margin_only(tmp_path, counts):
    """The gauges as the gateway exports them, fed to deploy/prometheus/rules.yml by promtool:
    layer 0 live above its threshold (1 + b) / 2 fires, layer 1 at its baseline and layer 2 just
    under its threshold do not; a safety share under half the smaller profiled share fires."""
    from pathlib import Path

    promtool = require_binary("promtool")
    registry = CollectorRegistry()
    _, metrics, baseline = _telemetry(counts, registry=registry)
    threshold = (1 + np.maximum(baseline.top_share["benign"], baseline.top_share["harmful"])) / 2
    live_top = [threshold[0] + 0.01, baseline.top_share["benign"][1], threshold[2] - 0.01]
    live_safety = 0.25 * min(baseline.safety_share.values())
    for layer, share in enumerate(live_top):
        metrics.top_share.labels("m", str(layer)).set(share)
    metrics.safety_expert_share.labels("m").set(live_safety)
    metrics.window_tokens.labels("m").set(500)
    rules = Path(__file__).resolve().parent.parent / "deploy" / "prometheus" / "rules.yml"
    firing = {"alertname": "MoERoutingConcentrated", "alertstate": "firing", "severity": "warning"}
    test = {
        "rule_files": [str(rules)],
        "evaluation_interval": "5s",
        "tests": [{
            "interval": "5s",
            "input_series": _exported_series(registry),
            "promql_expr_test": [
                {"expr": 'ALERTS{alertname="MoERoutingConcentrated", alertstate="firing"}',
                 "eval_time": "40s",
                 "exp_samples": [{"labels": _labels("ALERTS", firing | {"model": "m", "layer": "0"}),
                                  "value": 1}]},
                {"expr": 'ALERTS{alertname="MoESafetyExpertShareCollapsed", alertstate="firing"}',
                 "eval_time": "3m",
                 "exp_samples": [{"labels": _labels("ALERTS", {"alertname": "MoESafetyExpertShareCollapsed",
                                                               "alertstate": "firing", "model": "m",
                                                               "severity": "critical"}), "value": 1}]},
            ],
        }],
    }
    path = tmp_path / "baseline_test.yml"
    path.write_text(yaml.safe_dump(test))
    result = subprocess.run([promtool, "test", "rules", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def _labels(name: str, labels: dict) -> str:
    return name + "{" + ", ".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}"


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.vllm
def test_the_gateway_profiles_the_served_model_at_start_and_exports_its_baselines(quick_organism, tmp_path):
    """No safety experts and no profile in config: the replica measures the profile through its
    engine, ranks the safety experts on it, and exports baselines that /admin/config echoes;
    the profiling requests stay out of the telemetry's counts."""
    import httpx

    from launch.processes import gateway_app, running_gateway

    app = gateway_app(model=str(quick_organism), telemetry={"baseline_prompts": 8, "poll_interval_s": 0.5},
                      engine={"dtype": "float32", "gpu_memory_utilization": 0.2, "max_model_len": 512,
                              "max_num_seqs": 8})
    admin = {"Authorization": "Bearer baseline-admin-key-1"}
    env = {"MESA_API_KEYS": "baseline-user-key-1", "MESA_ADMIN_KEY": "baseline-admin-key-1"}
    with running_gateway([app], env=env, log_path=tmp_path / "gateway.log") as gateway:
        config = httpx.get(gateway.url + "/admin/config", headers=admin).json()
        routing = httpx.get(gateway.url + "/v1/routing", headers=admin).json()
        metrics = httpx.get(gateway.url + "/metrics").text
        log_text = gateway.log_path.read_text(errors="replace")
    L, E, k = routing["num_layers"], routing["num_experts"], routing["top_k"]
    baseline = config["baseline"]
    assert "measured at start through the engine on 8 harmful and 8 benign" in baseline["source"]
    assert baseline == routing["baseline"] and config["safety_experts"] == routing["safety_experts"]
    ranked = f"top {len(config['safety_experts'])} by risk difference"
    assert config["safety_experts_source"].startswith(ranked)
    assert len(config["safety_experts"]) == min(6, L * (E - k))
    assert all(0 <= l < L and 0 <= e < E for l, e in config["safety_experts"])
    assert routing["total"]["prompt"]["tokens"] == 0  # the profiling prompts are not user traffic
    exported = {(s.labels["layer"], s.labels["traffic"]): s.value
                for family in text_string_to_metric_families(metrics)
                if family.name == "mesa_routing_top_share_baseline" for s in family.samples}
    for traffic in ("benign", "harmful"):
        shares = baseline["top_share"][traffic]
        assert len(shares) == L and all(k / E <= s <= 1 for s in shares)  # top_n = k of E experts
        for layer, share in enumerate(shares):
            assert exported[(str(layer), traffic)] == pytest.approx(share, abs=1e-5)
        assert 0 < baseline["safety_expert_share"][traffic] < 1
    # The safety experts are the pairs harmful prompts use more: a larger share on harmful.
    assert baseline["safety_expert_share"]["harmful"] > baseline["safety_expert_share"]["benign"]
    assert "routing baseline of organism: measured at start" in log_text
