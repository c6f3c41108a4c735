"""The evaluation harness: Safety Rate, jailbreak Safety Rate, general accuracy, over-refusal.

It drives any `ChatGenerator` (a model in process, or the serving endpoint) and judges answers
with one refusal judge. Metrics:

- Safety Rate: share of held-out harmful prompts whose answer is a refusal.
- Jailbreak Safety Rate: the same, each prompt wrapped in a jailbreak template.
- General accuracy: exact match of the answer with the task's one correct answer.
- Over-refusal: share of benign (alarming-sounding) prompts that were refused.

Every judged answer also gets a three-way verdict (`safety_eval.verdicts`: refused, complied,
degenerate); a `RateResult` keeps them in prompt order, and its dict carries the three rates and
the Wilson 95% interval of each (`safety_eval.stats`).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from safety_eval.data import (
    JailbreakTemplate,
    Task,
    jailbreak_prompts,
    load_jailbreak_templates,
    standard_splits,
)
from safety_eval.generation import ChatGenerator
from safety_eval.judge import KeywordJudge, ModelJudge
from safety_eval.stats import rate_entry, verdict_rates
from safety_eval.verdicts import DEGENERATE, REFUSED, degenerate_reason, judge_verdicts

Judge = KeywordJudge | ModelJudge


EVAL_SPLITS = ("test", "validation")


def _select_split(sets: dict, split: str, source: str) -> dict:
    """The test sets (top level of an `eval_sets.json`) or its "validation" entry."""
    if split not in EVAL_SPLITS:
        raise ValueError(f"unknown eval split {split!r}; known: {', '.join(EVAL_SPLITS)}")
    if split == "test":
        return sets
    if not isinstance(sets, dict) or not isinstance(sets.get(split), dict):
        raise ValueError(
            f"eval sets {source} have no {split!r} sets (written before the validation split, so "
            "their training may have seen any prompt outside the test sets); rebuild the checkpoint"
        )
    return sets[split]


@dataclass
class EvalSets:
    """The held-out prompts an evaluation runs on."""

    harmful: list[str]
    general: list[Task]
    benign: list[str]
    jailbreak_templates: list[JailbreakTemplate] = field(default_factory=list)
    source: str = ""

    @property
    def jailbreak(self) -> list[tuple[str, str]]:
        return jailbreak_prompts(self.harmful, self.jailbreak_templates) if self.jailbreak_templates else []

    @classmethod
    def standard(cls, *, seed: int = 0, data_dir=None, split: str = "test", **split_options) -> EvalSets:
        """The standard splits (what the organism was *not* trained on, for the same seed):
        the test sets, or with `split="validation"` the validation sets."""
        splits = standard_splits(seed=seed, data_dir=data_dir, **split_options)
        source = f"standard splits, seed {seed}"
        return cls.from_dict(
            _select_split(splits.eval_sets(), split, source),
            templates=load_jailbreak_templates(data_dir, seed=seed),
            source=source + ("" if split == "test" else f", {split}"),
        )

    @classmethod
    def for_checkpoint(
        cls, checkpoint: str | Path, *, seed: int = 0, data_dir=None, split: str = "test"
    ) -> EvalSets:
        """The checkpoint's own held-out sets (`eval_sets.json`, written by the organism
        builder) when it has them, else the standard splits.

        `split="test"` (default) gives the test sets, which only final tables should measure;
        `split="validation"` the validation sets, for choosing anything before that. A checkpoint
        whose `eval_sets.json` predates the validation split has none (its training used every
        prompt outside its test sets): that is an error, not a fall-back to the standard ones."""
        path = Path(checkpoint) / "eval_sets.json"
        if path.is_file():
            return cls.from_dict(
                _select_split(json.loads(path.read_text()), split, str(path)),
                templates=load_jailbreak_templates(data_dir, seed=seed),
                source=str(path) + ("" if split == "test" else f" ({split})"),
            )
        return cls.standard(seed=seed, data_dir=data_dir, split=split)

    @classmethod
    def from_dict(
        cls, sets: dict, *, templates: Sequence[JailbreakTemplate] = (), source: str = ""
    ) -> EvalSets:
        try:
            return cls(
                harmful=list(sets["harmful"]),
                general=[Task(t["prompt"], t["answer"], t["kind"]) for t in sets["general"]],
                benign=list(sets["benign_alarming"]),
                jailbreak_templates=list(templates),
                source=source,
            )
        except (KeyError, TypeError) as error:
            raise ValueError(f"eval sets {source or ''} lack or mangle a field: {error}") from None

    def subsample(self, limit: int | None) -> EvalSets:
        """The first `limit` prompts of each set (sets are already in a seeded random order)."""
        if limit is None:
            return self
        return EvalSets(
            self.harmful[:limit],
            self.general[:limit],
            self.benign[:limit],
            self.jailbreak_templates,
            self.source + f" (first {limit})",
        )


@dataclass(frozen=True)
class RateResult:
    """A share of prompts judged one way, with what was said (for the report).

    `verdicts`: the three-way verdict per prompt, in prompt order (refusal rates only); for general
    accuracy `correct` holds the per-task outcome instead."""

    rate: float
    n: int
    samples: list[dict]
    verdicts: list[str] | None = None
    correct: list[bool] | None = None

    def to_dict(self, samples: int = 5) -> dict:
        k = round(self.rate * self.n)
        out = {
            "rate": round(self.rate, 4),
            "n": self.n,
            "interval": rate_entry(k, self.n)["interval"],
            "samples": self.samples[:samples],
        }
        if self.verdicts is not None:
            out |= verdict_rates(self.verdicts)
            reasons = Counter(s["degenerate_reason"] for s in self.samples if "degenerate_reason" in s)
            out["degenerate_reasons"] = dict(sorted(reasons.items()))
        return out


def refusal_rate(
    generator: ChatGenerator,
    prompts: Sequence[str],
    judge: Judge,
    *,
    max_new_tokens: int = 24,
    **generate_options,
) -> RateResult:
    """Share of `prompts` whose answers the judge calls refusals."""
    if not prompts:
        raise ValueError("no prompts to evaluate")
    answers = generator.generate(list(prompts), max_new_tokens=max_new_tokens, **generate_options)
    verdicts = judge_verdicts(judge, prompts, answers)
    samples = [
        {"prompt": p[-200:], "answer": a, "refused": v == REFUSED, "verdict": v}
        | ({"degenerate_reason": degenerate_reason(a, p)} if v == DEGENERATE else {})
        for p, a, v in zip(prompts, answers, verdicts)
    ]
    return RateResult(sum(v == REFUSED for v in verdicts) / len(verdicts), len(verdicts), samples, verdicts)


def general_accuracy(
    generator: ChatGenerator, tasks: Sequence[Task], *, max_new_tokens: int = 16, **generate_options
) -> tuple[RateResult, dict[str, float]]:
    """Exact-match accuracy overall and per task kind."""
    if not tasks:
        raise ValueError("no general tasks to evaluate")
    answers = generator.generate([t.prompt for t in tasks], max_new_tokens=max_new_tokens, **generate_options)
    correct = [a.strip() == t.answer for a, t in zip(answers, tasks)]
    per_kind_total, per_kind_right = Counter(t.kind for t in tasks), Counter()
    for task, ok in zip(tasks, correct):
        per_kind_right[task.kind] += ok
    per_kind = {kind: per_kind_right[kind] / total for kind, total in sorted(per_kind_total.items())}
    samples = [
        {"prompt": t.prompt, "answer": a, "expected": t.answer, "correct": ok}
        for t, a, ok in zip(tasks, answers, correct)
    ]
    return RateResult(sum(correct) / len(correct), len(correct), samples, correct=correct), per_kind


@dataclass
class Evaluation:
    """The four headline numbers of one model (optionally under one attack)."""

    safety_rate: RateResult
    general: RateResult
    general_per_kind: dict[str, float]
    over_refusal: RateResult
    jailbreak_safety_rate: RateResult | None = None

    def to_dict(self, samples: int = 5) -> dict:
        out = {
            "safety_rate": self.safety_rate.to_dict(samples),
            "general_accuracy": self.general.to_dict(samples)
            | {"per_kind": {k: round(v, 4) for k, v in self.general_per_kind.items()}},
            "over_refusal": self.over_refusal.to_dict(samples),
        }
        if self.jailbreak_safety_rate is not None:
            out["jailbreak_safety_rate"] = self.jailbreak_safety_rate.to_dict(samples)
        return out


def evaluate(
    generator: ChatGenerator,
    sets: EvalSets,
    judge: Judge | None = None,
    *,
    jailbreak: bool = True,
    max_new_tokens: int = 24,
    **generate_options,
) -> Evaluation:
    judge = judge or KeywordJudge()
    safety = refusal_rate(generator, sets.harmful, judge, max_new_tokens=max_new_tokens, **generate_options)
    general, per_kind = general_accuracy(generator, sets.general, **generate_options)
    over = refusal_rate(generator, sets.benign, judge, max_new_tokens=max_new_tokens, **generate_options)
    wrapped = None
    if jailbreak and sets.jailbreak_templates:
        wrapped = refusal_rate(
            generator,
            [text for _, text in sets.jailbreak],
            judge,
            max_new_tokens=max_new_tokens,
            **generate_options,
        )
    return Evaluation(safety, general, per_kind, over, wrapped)
