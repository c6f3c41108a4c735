"""The routing guard's pure parts: decisions, threshold calibration, remembered prompt scores, the
refusal body, and the engine wrapper's control flow on a stand-in stream (the wrapper on the real
engine is tested through the running gateway, test_gateway.py)."""

import asyncio
import math
import types

import numpy as np
import pytest

from serving.guard import PromptScores, calibrated_threshold, decide, prompt_token_ids
from serving.protocol import GUARD_FINISH_REASON, refusal_body
from serving.telemetry import RequestRisk


def test_decisions_by_policy():
    assert [decide(0.5, p, 0.2) for p in ("observe", "flag", "block")] == ["allowed", "flagged", "blocked"]
    assert decide(0.2, "block", 0.2) == "allowed"  # at the threshold is not above it
    assert decide(None, "block", 0.2) == "allowed" and decide(9.0, "block", None) == "allowed"
    with pytest.raises(ValueError, match="policy"):
        decide(0.5, "deny", 0.2)


@pytest.mark.parametrize("rate,expected", [(0.0, 99.0), (0.01, 98.0), (0.05, 94.0), (0.5, 49.0)])
def test_calibrated_threshold_lets_the_target_share_of_benign_scores_above_it(rate, expected):
    scores = np.arange(100.0)  # 0 .. 99
    threshold = calibrated_threshold(scores, rate)
    assert threshold == expected
    assert (scores > threshold).mean() <= rate
    assert (scores > threshold - 1).mean() > rate or rate == 0  # the smallest such threshold


def test_calibration_skips_unscored_prompts_and_needs_some():
    assert calibrated_threshold([None, 1.0, float("nan"), 2.0], 0.0) == 2.0
    with pytest.raises(ValueError, match="no benign scores"):
        calibrated_threshold([None], 0.01)


def test_a_cached_repeat_is_judged_by_the_score_that_covered_most_of_it():
    scores = PromptScores(size=2)
    first, repeat, fuller = RequestRisk(0.7, 0.2, 4), RequestRisk(-0.3, 0.1, 1), RequestRisk(0.5, 0.2, 5)
    assert scores.resolve([1, 2, 3, 4, 5], first) is first
    assert scores.resolve([1, 2, 3, 4, 5], repeat) is first  # only the last token was routed
    assert scores.resolve([1, 2, 3, 4, 5], fuller) is fuller  # the cache was cold: more tokens
    assert scores.resolve([9, 9, 9], repeat) is repeat  # another prompt
    scores.resolve([1], RequestRisk(0.0, None, 1))  # evicts the least recent, [1, 2, 3, 4, 5]
    assert scores.resolve([1, 2, 3, 4, 5], repeat) is repeat
    assert scores.resolve(None, repeat) is repeat


def test_prompt_token_ids_of_engine_inputs():
    assert prompt_token_ids({"prompt_token_ids": (1, 2)}) == [1, 2]
    assert prompt_token_ids({"prompt": "text"}) is None


@pytest.mark.parametrize("kind,chunk", [("chat", False), ("chat", True), ("completion", False)])
def test_refusals_are_openai_shaped(kind, chunk):
    body = refusal_body(kind, "abc", "organism", "no", 7, 1700000000, chunk=chunk)
    (choice,) = body["choices"]
    assert choice["finish_reason"] == GUARD_FINISH_REASON == "content_filter"
    assert body["id"].endswith("abc") and body["model"] == "organism" and body["created"] == 1700000000
    if kind == "chat":
        assert choice["delta" if chunk else "message"] == {"role": "assistant", "content": "no"}
        assert body["object"] == ("chat.completion.chunk" if chunk else "chat.completion")
    else:
        assert choice["text"] == "no" and body["object"] == "text_completion"
    usage = {"prompt_tokens": 7, "completion_tokens": 0, "total_tokens": 7}
    assert body["usage"] == (None if chunk else usage)


class _Outputs:
    """An engine's output stream of `n` steps (vLLM's RequestOutput has `finished`); records
    whether it was closed, as AsyncLLM aborts a request whose generator is closed."""

    def __init__(self, n: int):
        self.n, self.closed = n, False

    def __aiter__(self):
        return self

    async def __anext__(self):
        if self.n == 0:
            raise StopAsyncIteration
        self.n -= 1
        return types.SimpleNamespace(finished=self.n == 0, left=self.n)

    async def aclose(self):
        self.closed = True


class _Engine:
    def __init__(self, steps: int = 3):
        self.steps, self.streams, self.params = steps, [], []

    def generate(self, prompt, sampling_params, request_id):
        self.params.append(sampling_params)
        self.streams.append(_Outputs(self.steps))
        return self.streams[-1]


def _guarded(policy: str, verdict: bool = True):
    from serving.guard import GuardedEngine

    engine, judged, noted = _Engine(), [], []

    async def judge(request_id, prompt):
        judged.append(request_id)
        return verdict

    guarded = GuardedEngine(engine, judge, lambda request_id, prompt: noted.append(request_id),
                            lambda: policy)
    return guarded, engine, judged, noted


async def _drain(stream):
    return [output.left async for output in stream]


def test_observe_hands_over_the_engine_stream_and_waits_for_no_decision():
    guarded, engine, judged, noted = _guarded("observe")
    stream = guarded.generate({"prompt_token_ids": [1, 2]}, None, "r1")
    assert stream is engine.streams[0]  # no layer per output
    assert asyncio.run(_drain(stream)) == [2, 1, 0] and noted == ["r1"] and judged == []


@pytest.mark.parametrize("policy", ["flag", "block"])
def test_flag_and_block_judge_at_the_first_output_and_a_refusal_aborts(policy):
    guarded, engine, judged, noted = _guarded(policy)
    assert asyncio.run(_drain(guarded.generate({}, None, "r1"))) == [2, 1, 0]
    assert judged == ["r1"] and noted == []
    guarded, engine, judged, _ = _guarded(policy, verdict=False)
    assert asyncio.run(_drain(guarded.generate({}, None, "r2"))) == []
    assert judged == ["r2"] and engine.streams[0].closed


def test_block_turns_a_final_only_request_into_cumulative_outputs_and_passes_the_last():
    from vllm.sampling_params import RequestOutputKind, SamplingParams

    params = SamplingParams(max_tokens=4, output_kind=RequestOutputKind.FINAL_ONLY)
    guarded, engine, judged, _ = _guarded("block")
    assert asyncio.run(_drain(guarded.generate({}, params, "r1"))) == [0]
    assert engine.params[0].output_kind == RequestOutputKind.CUMULATIVE and judged == ["r1"]
    assert params.output_kind == RequestOutputKind.FINAL_ONLY  # the caller's params are untouched
    guarded, engine, _, _ = _guarded("flag")  # flag judges the final output when it comes
    asyncio.run(_drain(guarded.generate({}, params, "r2")))
    assert engine.params[0] is params


def _routing_guard(policy="block", threshold=None, answer_tokens=0, peek=None):
    """A RoutingGuard over real telemetry with a 2-layer x 4-expert profile; `peek` stands in for
    the engine's batched read of a running request's routing (the engine path: test_gateway.py)."""
    from prometheus_client import CollectorRegistry

    from serving.config import GuardConfig
    from serving.guard import RoutingGuard
    from serving.metrics import GatewayMetrics
    from serving.telemetry import RoutingProfile, RoutingShape, RoutingTelemetry

    benign = np.array([[1.0, 0.6, 0.2, 0.2], [0.5, 0.5, 0.5, 0.5]])
    harmful = np.array([[0.2, 0.2, 0.6, 1.0], [0.5, 0.5, 0.5, 0.5]])
    metrics = GatewayMetrics(CollectorRegistry())
    telemetry = RoutingTelemetry("m", RoutingShape(2, 4, 2), metrics, window_s=10,
                                 risk_weights=RoutingProfile(benign, harmful, 2, "test").risk_weights())
    config = GuardConfig(policy=policy, threshold=threshold, false_positive_rate=0.25,
                         answer_tokens=answer_tokens)
    guard = RoutingGuard(config, metrics, "m", peek)
    return guard, telemetry, metrics


LIKE_HARMFUL = [[0, 1, 2, 3], [1, 1, 2, 2]]
LIKE_BENIGN = [[3, 2, 1, 0], [1, 1, 2, 2]]


def _count(metric, *labels) -> float:
    return metric.labels(*labels)._value.get()


def test_the_guard_calibrates_on_benign_routing_and_blocks_what_routes_like_harm_once_per_request():
    peeks = []

    async def peek(key):
        peeks.append(key)
        return {"r-harm": LIKE_HARMFUL, "r-benign": LIKE_BENIGN}.get(key)

    guard, telemetry, metrics = _routing_guard(peek=peek)
    assert guard.needs_calibration and math.isnan(metrics.guard_threshold.labels("m")._value.get())
    benign = [{"prompt": [[3, 2, 1, 0], [1, 1, 2, 2]]}, {"prompt": [[4, 1, 1, 0], [2, 1, 1, 2]]},
              {"prompt": [[3, 3, 0, 0], [1, 2, 1, 2]]}, {"prompt": [[2, 2, 1, 1], [1, 1, 2, 2]]}, None]
    guard.calibrate(telemetry, benign)
    scores = sorted(telemetry.request_risk(h["prompt"]).score for h in benign if h)
    assert guard.state.threshold == scores[2]  # 1 of 4 (the target 25%) above it
    assert guard.state.false_positive_rate == 0.25
    assert "4 validation benign prompts" in guard.state.threshold_source
    assert metrics.guard_threshold.labels("m")._value.get() == guard.state.threshold
    assert not guard.needs_calibration

    assert asyncio.run(guard.judge("r-harm", {"prompt_token_ids": [1, 2, 3]})) is True  # no telemetry yet
    guard.telemetry = telemetry
    assert asyncio.run(guard.judge("r-harm", {"prompt_token_ids": [1, 2, 3]})) is False
    assert asyncio.run(guard.judge("r-harm", {"prompt_token_ids": [1, 2, 3]})) is False  # remembered
    assert peeks == ["r-harm"] and guard.decision("r-harm").action == "blocked"
    assert asyncio.run(guard.judge("r-benign", {"prompt_token_ids": [4, 5]})) is True
    assert asyncio.run(guard.judge("r-unknown", {"prompt_token_ids": [4]})) is True  # the engine has no hits
    assert _count(metrics.guard_decisions, "m", "blocked") == 1 and _count(metrics.guard_high_risk, "m") == 1
    assert guard.collect("r-harm", LIKE_HARMFUL).prompt_tokens == 3  # collected once, then forgotten
    assert guard.decision("r-harm") is None and guard.collect("r-harm", LIKE_HARMFUL) is None


def test_under_observe_a_request_is_scored_at_its_end_and_an_engine_error_fails_open():
    async def broken(key):
        raise RuntimeError("engine gone")

    guard, telemetry, metrics = _routing_guard(policy="observe", threshold=0.0, peek=broken)
    guard.telemetry = telemetry
    guard.note_prompt("r1", {"prompt_token_ids": [7, 8, 9]})
    decision = guard.collect("r1", LIKE_HARMFUL)
    assert decision.action == "allowed" and decision.risk.score > 0 and decision.prompt_tokens == 3
    assert _count(metrics.guard_high_risk, "m") == 1 and _count(metrics.guard_decisions, "m", "allowed") == 1
    assert guard.collect("r2", LIKE_HARMFUL) is None  # never noted: not scored
    assert asyncio.run(guard.judge("r3", {"prompt_token_ids": [1]})) is True
    assert _count(metrics.telemetry_errors, "m") == 1

    guard.update({"policy": "block", "threshold": 5.0})
    assert guard.state.policy == "block" and guard.state.threshold_source == "admin"
    assert metrics.guard_threshold.labels("m")._value.get() == 5.0
    assert guard.score_answer(LIKE_HARMFUL) > 0 and _count(metrics.guard_high_risk_answers, "m") == 0
