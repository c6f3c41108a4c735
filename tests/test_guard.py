"""The routing guard's pure parts: decisions, threshold calibration, remembered prompt scores and
the refusal body (the engine wrapper is tested through the running gateway, test_gateway.py)."""

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
