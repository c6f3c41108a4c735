"""The routing guard: a decision on every request from its prompt's routing risk, taken after
prefill and before the first token leaves the gateway.

`GuardedEngine` stands between vLLM's OpenAI serving classes and the engine. At a request's first
output (its prompt is prefilled and one token sampled; nothing has been sent to the client yet)
it asks the gateway for a decision; a blocked request's generator is closed, which aborts it in
the engine (vLLM's `AsyncLLM.generate` aborts on GeneratorExit), and the serving classes see a
stream that ended before its first output. The gateway then answers with an OpenAI-format
refusal (`finish_reason: "content_filter"`). Other requests in the same batch are untouched.

Under `flag` a non-streaming request keeps vLLM's final-output-only mode and is judged when its
output comes, at the end (there is nothing to stop); under `block` it is judged after prefill
like a streaming one (`GuardedEngine`). Under `observe` no request waits for its score: it is
computed at the request's end from the same prompt counts (prompt tokens are routed once, at
prefill, so the score is the one a first-output judgement would give).

Policies (per model, `guard.policy`; the admin may change it at run time):
    observe  score and count (histograms, audit `risk`); never changes a response
    flag     also mark high-risk requests: response header `X-Mesa-Guard: flagged`, audit `flagged`
    block    refuse high-risk requests

High risk: score > `threshold` (nats per prompt token, `moe_routing.risk`). Unset, the threshold
is calibrated at start on the checkpoint's validation benign prompts scored through the engine:
the smallest value that at most `false_positive_rate` of them exceed.

A high-risk answer: the routing risk of the generated tokens > `answer_threshold`, calibrated the
same way on the engine's own answers to those prompts (`answer_tokens` each). It is counted and
logged (metrics, audit `answer_risk`), never acted on: the answer has left by the time it is known.
"""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

logger = logging.getLogger("ray.serve")

POLICIES = ("observe", "flag", "block")
ACTIONS = ("allowed", "flagged", "blocked")
REFUSAL = "This request was blocked by the gateway's safety guard."
MAX_REMEMBERED = 10_000  # decisions of requests in flight; scores of recent prompts


@dataclass(frozen=True)
class GuardDecision:
    action: str  # one of ACTIONS
    risk: object  # serving.telemetry.RequestRisk
    prompt_tokens: int  # the prompt's length (the risk may cover fewer: cached tokens are not routed)


@dataclass
class GuardState:
    """A model's guard as it runs: the policy, and the threshold with where it came from."""

    policy: str
    threshold: float | None
    threshold_source: str
    false_positive_rate: float  # measured on the calibration prompts, else the configured target
    answer_threshold: float | None = None
    answer_threshold_source: str = "none"

    def to_dict(self) -> dict:
        return {"policy": self.policy, "threshold": self.threshold, "threshold_source": self.threshold_source,
                "false_positive_rate": self.false_positive_rate, "answer_threshold": self.answer_threshold,
                "answer_threshold_source": self.answer_threshold_source}


def high_risk(score: float | None, threshold: float | None) -> bool:
    """Above the threshold; no score or no threshold is never high risk (nothing to judge by)."""
    return score is not None and threshold is not None and score > threshold


def decide(score: float | None, policy: str, threshold: float | None) -> str:
    """The action for a request's risk score: high risk is flagged or blocked by those policies."""
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    if policy == "observe" or not high_risk(score, threshold):
        return "allowed"
    return "flagged" if policy == "flag" else "blocked"


def calibrated_threshold(benign_scores, false_positive_rate: float) -> float:
    """The smallest threshold that at most `false_positive_rate` of the benign scores exceed: the
    ceil((1 - rate) * n)-th smallest score (a score equal to it is not high risk)."""
    scores = np.sort(np.asarray([s for s in benign_scores if s is not None and s == s], dtype=np.float64))
    if not len(scores):
        raise ValueError("no benign scores to calibrate the guard's threshold on")
    if not 0 <= false_positive_rate < 1:
        raise ValueError(f"false_positive_rate must be in [0, 1), got {false_positive_rate}")
    rank = int(np.ceil((1 - false_positive_rate) * len(scores)))  # 1-based
    return float(scores[max(rank, 1) - 1])


class PromptScores:
    """Risk of recently scored prompts, by their token ids. The engine's prefix cache skips the
    prompt tokens it already holds (a shared chat-template prefix, or all but the last token of a
    repeated prompt), and the score covers the tokens it routed: a repeated prompt is judged by
    the score that covered most of its tokens, normally its first."""

    def __init__(self, size: int = MAX_REMEMBERED):
        self.size, self._scores = size, OrderedDict()

    @staticmethod
    def digest(token_ids) -> bytes:
        return hashlib.blake2b(np.asarray(token_ids, dtype=np.int64).tobytes(), digest_size=16).digest()

    def resolve(self, token_ids, risk):
        """The risk to judge this prompt by: the remembered one when it covered at least as many
        tokens as `risk`, else `risk` (then remembered)."""
        if token_ids is None:
            return risk
        key = self.digest(token_ids)
        known = self._scores.get(key)
        if known is None or risk.prompt_tokens > known.prompt_tokens:
            self._scores[key] = known = risk
        self._scores.move_to_end(key)
        while len(self._scores) > self.size:
            self._scores.popitem(last=False)
        return known


def prompt_token_ids(prompt) -> list[int] | None:
    """The token ids of an engine prompt as the serving classes pass it (a dict-like input)."""
    if isinstance(prompt, dict):
        ids = prompt.get("prompt_token_ids")
    else:
        ids = getattr(prompt, "prompt_token_ids", None)
    return list(ids) if ids is not None else None


class GuardedEngine:
    """The engine as vLLM's serving classes see it: every attribute is the engine's, except
    `generate`. Under `flag` and `block` it asks `judge(request_id, prompt)` at the first output
    and ends the request there when the answer is False. Under `observe` nothing waits for a
    decision: `note(request_id, prompt)` keeps the prompt for the scoring at the request's end, and
    the engine's own generator goes to the caller (no extra layer per output, no engine call on
    the way to the first token).

    A non-streaming request asks the engine for its final output only, which comes when the
    generation is over; under `block` such a request is switched to cumulative outputs (each
    step's output holds everything so far), so the first one comes after prefill, and only the
    last is passed on, as the caller asked."""

    def __init__(self, engine, judge, note, policy=lambda: "block"):
        self._engine, self._judge, self._note, self._policy = engine, judge, note, policy

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def generate(self, prompt, sampling_params, request_id, *args, **kwargs):
        policy = self._policy()
        if policy == "observe":
            self._note(request_id, prompt)
            return self._engine.generate(prompt, sampling_params, request_id, *args, **kwargs)
        return self._judged(policy == "block", prompt, sampling_params, request_id, *args, **kwargs)

    async def _judged(self, blocking, prompt, sampling_params, request_id, *args, **kwargs):
        kind = getattr(sampling_params, "output_kind", None)
        final_only = getattr(kind, "name", None) == "FINAL_ONLY" and blocking
        if final_only:
            sampling_params = sampling_params.clone()
            sampling_params.output_kind = type(kind).CUMULATIVE
        outputs = self._engine.generate(prompt, sampling_params, request_id, *args, **kwargs)
        try:
            first = True
            async for output in outputs:
                if first:
                    first = False
                    if not await self._judge(request_id, prompt):
                        return  # `finally` closes the engine's generator: the request is aborted
                if final_only and not output.finished:
                    continue
                yield output
        finally:
            await outputs.aclose()


class RoutingGuard:
    """One replica's guard over its routing telemetry: the running state, one decision per
    request (taken at its first output under `flag` and `block`, at its end under `observe`) kept
    until the request's end collects it, the thresholds' calibration, and the `mesa_guard_*`
    series. `peek_routing(key)` reads a running request's routing hits from the engine."""

    def __init__(self, config, metrics, model_name: str, peek_routing):
        self.config, self.metrics, self.model_name = config, metrics, model_name
        self.peek_routing = peek_routing
        self.state = GuardState(config.policy, config.threshold,
                                "config" if config.threshold is not None else "none",
                                config.false_positive_rate, config.answer_threshold,
                                "config" if config.answer_threshold is not None else "none")
        self.telemetry = None  # serving.telemetry.RoutingTelemetry, once the gateway has started it
        self._decisions: OrderedDict[str, GuardDecision] = OrderedDict()  # by tracking key, until collected
        self._prompt_ids: OrderedDict[str, list[int] | None] = OrderedDict()  # observe: scored at the end
        self._prompt_scores = PromptScores()
        self.export()

    @property
    def needs_calibration(self) -> bool:
        s = self.state
        return s.threshold is None or (s.answer_threshold is None and self.config.answer_tokens > 0)

    def calibrate(self, telemetry, routed: list[dict | None]) -> None:
        """The thresholds not configured, from validation benign prompts as the engine routed
        them (`routed`: their hits, with the engine's answers of `answer_tokens` tokens at most)."""
        config, g = self.config, self.state
        hits = [h for h in routed if h is not None]
        if g.threshold is None:
            scores = [s for s in (telemetry.request_risk(h["prompt"]).score for h in hits) if s is not None]
            g.threshold = calibrated_threshold(scores, config.false_positive_rate)
            g.false_positive_rate = sum(s > g.threshold for s in scores) / len(scores)
            g.threshold_source = (f"calibrated at start on {len(scores)} validation benign prompts "
                                  f"for a false-positive rate <= {config.false_positive_rate}")
            logger.info("guard of %s: threshold %.4f nats/token (%s; %.3f of them above it), policy %s",
                        self.model_name, g.threshold, g.threshold_source, g.false_positive_rate, g.policy)
        if g.answer_threshold is None and config.answer_tokens > 0:
            answers = [s for s in (telemetry.answer_risk(h["generated"]) for h in hits) if s is not None]
            if answers:
                g.answer_threshold = calibrated_threshold(answers, config.false_positive_rate)
                g.answer_threshold_source = (
                    f"calibrated at start on the engine's answers ({config.answer_tokens} tokens at most) "
                    f"to {len(answers)} validation benign prompts for a false-positive rate <= "
                    f"{config.false_positive_rate}")
                logger.info("guard of %s: answer threshold %.4f nats/token (%s)", self.model_name,
                            g.answer_threshold, g.answer_threshold_source)
        self.export()

    def export(self) -> None:
        g, m, name = self.state, self.metrics, self.model_name
        m.guard_threshold.labels(name).set(float("nan") if g.threshold is None else g.threshold)
        m.guard_answer_threshold.labels(name).set(
            float("nan") if g.answer_threshold is None else g.answer_threshold)
        m.guard_high_risk_answers.labels(name)
        m.guard_false_positive_rate.labels(name).set(g.false_positive_rate)
        for action in ACTIONS:
            m.guard_decisions.labels(name, action)  # exported at 0, so increase() sees the first
        m.guard_high_risk.labels(name)

    async def judge(self, key: str, prompt) -> bool:
        """Go on (True) or end the request (False), asked at its first output under `flag` and
        `block` (GuardedEngine); one decision per request, from its prompt's routing so far."""
        if self.telemetry is None:
            return True
        decision = self._decisions.get(key)
        if decision is None:
            try:
                hits = await self.peek_routing(key)
            except Exception:  # fail open: the engine itself is in trouble, and the error counter says so
                self.metrics.telemetry_errors.labels(self.model_name).inc()
                logger.exception("reading a request's routing for the guard failed")
                return True
            if hits is None:
                return True
            decision = self.decide(hits, prompt_token_ids(prompt), self.state.policy)
            self._decisions[key] = decision  # until the request's end collects it
            while len(self._decisions) > MAX_REMEMBERED:
                self._decisions.popitem(last=False)
        return decision.action != "blocked"

    def note_prompt(self, key: str, prompt) -> None:
        """Under `observe`: the prompt's ids, for its score at the end (`collect`)."""
        self._prompt_ids[key] = prompt_token_ids(prompt)
        while len(self._prompt_ids) > MAX_REMEMBERED:
            self._prompt_ids.popitem(last=False)

    def decide(self, prompt_hits, ids: list[int] | None, policy: str) -> GuardDecision:
        """Score a request's prompt routing and count the decision."""
        t, g = self.telemetry, self.state
        risk = self._prompt_scores.resolve(ids, t.request_risk(prompt_hits))
        t.observe_risk(risk)
        action = decide(risk.score, policy, g.threshold)
        if high_risk(risk.score, g.threshold):
            self.metrics.guard_high_risk.labels(self.model_name).inc()
        self.metrics.guard_decisions.labels(self.model_name, action).inc()
        return GuardDecision(action, risk, len(ids) if ids is not None else risk.prompt_tokens)

    def decision(self, key: str | None) -> GuardDecision | None:
        """The decision taken at a running request's first output, if any."""
        return self._decisions.get(key) if key else None

    def collect(self, key: str, prompt_hits) -> GuardDecision | None:
        """A finished request's decision, forgotten here: the one its first output got, or under
        `observe` its score now, on the same prompt counts a first-output judgement would read."""
        noted, ids = key in self._prompt_ids, self._prompt_ids.pop(key, None)
        decision = self._decisions.pop(key, None)
        if decision is None and noted and prompt_hits is not None:
            decision = self.decide(prompt_hits, ids, "observe")
        return decision

    def score_answer(self, generated_hits) -> float | None:
        """The routing risk of a finished request's generated tokens, observed and counted."""
        answer = self.telemetry.answer_risk(generated_hits)
        self.telemetry.observe_answer_risk(answer)
        if high_risk(answer, self.state.answer_threshold):
            self.metrics.guard_high_risk_answers.labels(self.model_name).inc()
        return answer

    def update(self, changes: dict) -> None:
        """An admin's change of policy and/or thresholds at run time (validated by the route)."""
        g = self.state
        if "policy" in changes:
            g.policy = changes["policy"]
        if "threshold" in changes:
            g.threshold = changes["threshold"]
            g.threshold_source, g.false_positive_rate = "admin", self.config.false_positive_rate
        if "answer_threshold" in changes:
            g.answer_threshold, g.answer_threshold_source = changes["answer_threshold"], "admin"
        logger.warning("guard of %s changed by the admin: policy %s, threshold %s, answer threshold %s",
                       self.model_name, g.policy, g.threshold, g.answer_threshold)
        self.export()
