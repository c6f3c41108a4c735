"""The alignment job's configuration: one pydantic model, loaded from YAML.

Every key is checked at load time: an unknown key or a bad value fails with a message that names
it. The config is written verbatim into the job's report.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from alignment.allocation import AllocationSettings
from alignment.methods import METHODS, apply_settings
from alignment.sharding import check_sharding
from moe_routing.config import load_yaml_config
from safety_eval.settings import SuiteSettings  # light (no torch), unlike safety_eval.suite

# What each method trains and which of MESA's parts it uses: alignment.methods.METHODS.
Method = Literal[tuple(METHODS)]


class DataConfig(BaseModel):
    """Where the three datasets come from.

    Each source is ``packaged`` (the organism's training-side splits, shipped with this package),
    a local JSONL file (``{"prompt", "response"}`` or ``{"messages": [...]}`` per line), or
    ``hf:<dataset id>[:<split>]`` for a hub dataset (needs network and the `datasets` package).
    A D_safe row may carry ``"harmful": false`` for a benign request answered normally; such rows
    are SFT data but not safety inputs (statistics set, router target). Rows without it count as
    harmful requests.
    """

    model_config = ConfigDict(extra="forbid")
    safety: str = "packaged"  # D_safe: SFT data (refusals to harmful requests, answers to benign ones)
    general: str = "packaged"  # D_general: routing of these inputs is kept close to the reference
    statistics_prompts: int = Field(500, ge=8)  # D_stat: this many safety + this many general prompts
    refusal: str | None = None  # packaged data: the refusal text (default: the organism's own)
    max_examples: int | None = Field(None, ge=1)  # cap per dataset (quick runs)


class TrainingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    method: Method = "mesa"
    steps: int = Field(150, ge=1)
    batch_size: int = Field(32, ge=1)  # global: split over workers
    learning_rate: float = Field(1e-3, gt=0, lt=1)
    warmup_steps: int = Field(10, ge=0)
    # Share of each batch drawn from D_general; those rows enter the OT-KL router loss (their
    # routing stays at the reference's) and the SFT loss with weight `general_replay`. Replay is
    # on for every method, so no baseline's alignment tax is overstated by missing general data.
    general_share: float = Field(0.25, ge=0, lt=1)
    general_replay: float = Field(1.0, ge=0)
    # SFT weight of D_safe's harmful rows (its benign rows weigh 1): above 1 leans the trained
    # model towards refusing, a trade of over-refusal for Safety Rate.
    refusal_weight: float = Field(1.0, gt=0)
    gamma: float = Field(1.0, ge=0)  # weight of the OT-KL router loss (mesa, mesa_paper)
    # Router target of safety tokens (alignment.router_loss): transport [ours] spreads them over
    # the safety set with a capacity per expert; tilt [paper] is P_ref * exp(-C~ / router_tau)
    # with C~ = 0 on the safety set and 1 elsewhere (smaller tau pushes harder).
    router_target: Literal["transport", "tilt"] = "transport"
    router_tau: float = Field(0.25, gt=0)
    router_eps: float = Field(1.0, gt=0)  # transport: entropic regularisation of the token plan
    # Forced routes [ours]: with this probability a step trains the harmful rows under routes
    # forced onto random k-subsets of each layer's safety set, so every member learns to refuse
    # on its own, not only in its usual company. 0 = off. 0.25 was chosen on the fine organism's
    # validation prompts: at 0.5 mesa kept less of the plain Safety Rate (README, How the settings
    # were chosen).
    forced_routes: float = Field(0.25, ge=0, le=1)
    # Masking augmentation [ours, not in the paper]: with this probability a step trains under a
    # mask of the currently most safety-critical pairs (N uniform in 1..mask_max), the attack the
    # model must survive. 0 = off (paper MESA).
    mask_augmentation: float = Field(0.0, ge=0, le=1)
    mask_max: int = Field(8, ge=1)
    safex_experts: int = Field(8, ge=1)  # safex: how many top safety-critical pairs to train
    lora_rank: int = Field(8, ge=1)
    max_length: int = Field(256, ge=16)
    grad_clip: float = Field(1.0, gt=0)
    checkpoint_every: int = Field(25, ge=1)
    num_workers: int = Field(1, ge=1)
    use_gpu: bool = False
    # none: every worker holds the whole model (DDP). fsdp: the frozen weights are sharded over
    # the workers (FSDP2), what trains stays replicated (alignment/sharding.py; README, Sharded training).
    sharding: Literal["none", "fsdp"] = "none"
    memory_check: bool = True  # refuse before training when the memory estimate does not fit
    dtype: Literal["float32", "bfloat16"] = "float32"
    # torch threads per worker (default: Ray's, one per CPU the worker reserves, which is one)
    threads: int | None = Field(None, ge=1)


class ProfileConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    batch_size: int = Field(32, ge=1)
    max_length: int = Field(256, ge=8)
    num_workers: int = Field(2, ge=1)


class EvaluationConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    enabled: bool = True
    base: bool = True  # also evaluate the input checkpoint, for the before/after table
    # torch threads of the job's own evaluation (default: every core the job may use; `compare
    # --jobs N` sets cores / N, since more threads than cores spin instead of working).
    threads: int | None = Field(None, ge=1)
    suite: SuiteSettings = SuiteSettings()


class AlignmentConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    # A local HF checkpoint directory, a hub id, or "organism" (the embedded default, built and
    # cached on first use; `organism_seed` picks which one). Resolved by
    # organism.checkpoint.resolve_checkpoint.
    model: str = "organism"
    output_dir: str = "runs/align"
    # Training only: batch order, mask draws, D_stat and max_examples sampling, initialisation of
    # the trained values. It never changes the data split (README, Aligning a model with MESA).
    seed: int = 0
    # model == "organism": the seed of the organism built and aligned (its own data split and
    # held-out sets follow it). Ignored for any other model. Packaged data is always split with
    # the checkpoint's organism seed (organism.json), or evaluation.suite.seed for other models.
    organism_seed: int = Field(0, ge=0)
    # model == "organism": which organism shape (organism.build.PRESETS). `coarse` (8 experts,
    # top-2) is quick; `fine` (32 experts, top-4, a shared expert) has real models' ratios and is
    # the one method comparisons are measured on (README, Which preset for what).
    organism_preset: Literal["coarse", "fine"] = "coarse"
    data: DataConfig = DataConfig()
    profile: ProfileConfig = ProfileConfig()
    allocation: AllocationSettings = AllocationSettings()
    training: TrainingConfig = TrainingConfig()
    evaluation: EvaluationConfig = EvaluationConfig()

    @model_validator(mode="before")
    @classmethod
    def _pin_method_settings(cls, data):
        """A method's pinned settings (mesa_paper: the paper's) replace the config's."""
        if not isinstance(data, dict):
            return data
        training = data.get("training") or {}
        if isinstance(training, BaseModel):
            training = training.model_dump()
        spec = METHODS.get(training.get("method", "mesa")) if isinstance(training, dict) else None
        if spec is None or not spec.pinned:
            return data
        sections = {}
        for dotted in spec.pinned:
            section = dotted.split(".")[0]
            value = data.get(section) or {}
            sections[section] = value.model_dump() if isinstance(value, BaseModel) else dict(value)
        return data | apply_settings(sections, spec.pinned)

    @model_validator(mode="after")
    def _check(self):
        training = self.training
        if training.batch_size % training.num_workers:
            raise ValueError(f"training.batch_size {training.batch_size} is the global batch: it must be "
                             f"divisible by training.num_workers {training.num_workers}")
        check_sharding(training.method, training.sharding, training.num_workers)
        return self


def load_config(path: str | Path | None, **overrides) -> AlignmentConfig:
    return load_yaml_config(AlignmentConfig, path, "alignment config", **overrides)


def with_settings(config: AlignmentConfig, assignments: Sequence[str]) -> AlignmentConfig:
    """`config` with ``dotted.key=value`` assignments applied (the commands' ``--set``); values
    are YAML (``0.5``, ``true``, ``[1, 2]``, ``validation``). A key that is not in the config, or a
    value it rejects, fails naming it, as in a config file."""
    import yaml

    data = config.model_dump()
    for assignment in assignments:
        dotted, sep, text = assignment.partition("=")
        keys = dotted.strip().split(".")
        if not sep or not all(keys):
            raise ValueError(f"--set {assignment!r}: expected dotted.key=value, e.g. training.steps=50")
        node = data
        for depth, key in enumerate(keys[:-1]):
            if not isinstance(node.get(key), dict):
                raise ValueError(f"--set {dotted}: {'.'.join(keys[: depth + 1])} is not a config section")
            node = node[key]
        if keys[-1] not in node:
            raise ValueError(f"--set {dotted}: no such key in the alignment config")
        node[keys[-1]] = yaml.safe_load(text)
    return AlignmentConfig.model_validate(data)
