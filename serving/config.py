"""The gateway's configuration: one pydantic model, the `args` of `deploy/serve*.yaml`.

Unknown keys and bad values fail at deploy time with a message naming the key. Engine
options are vLLM's own `vllm serve` options (underscored names) and are checked
against vLLM's argument parser, so the gateway runs the engine exactly as `vllm serve` would.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from serving.protocol import digest_key_id, key_digest

# What the CPU organism needs on this machine (README, Engines); real-model configs override.
DEFAULT_ENGINE = {
    # Routing hooks added to a running engine run only in eager mode; `telemetry.compiled`
    # installs them before vLLM compiles the model and turns this default off.
    "enforce_eager": True,
    "gpu_memory_utilization": 0.3,  # on CPU: the share of memory reserved for the KV cache
    "max_model_len": 1024,
    "seed": 0,
}


class ProfileFiles(BaseModel):
    """Routing counts (`moe_routing.stats.RoutingCounts` .npz: `mesa-profile`'s counts_*.npz, the
    alignment job's profile/*.npz) of the served model on harmful and on benign prompts."""

    model_config = ConfigDict(extra="forbid")
    harmful: str
    benign: str


class TelemetryConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    enabled: bool = True
    # Count routing inside vLLM's compiled engine (torch.compile; CUDA graphs on GPU): the hooks
    # are installed when the worker loads the model, before compilation, and enforce_eager
    # defaults to false. Off: the engine runs eager (README, Serving: the gateway).
    compiled: bool = False
    poll_interval_s: float = Field(1.0, gt=0, le=60)  # how often counts are pulled from the engine
    window_s: float = Field(60.0, gt=0)  # sliding window of the concentration gauges
    # Concentration's top_share is the share of the load on this many most-loaded experts per
    # layer (default: the model's top-k).
    top_n: int | None = Field(None, ge=1)
    # Per (layer, expert) counters: L x E x 2 series per model; turn off for very large models.
    per_expert_metrics: bool = True
    # The model's known safety-critical experts, as [layer, expert] pairs. When unset they are
    # read from `safety_report` (an evaluation report's `safety_critical` or an alignment report's
    # `trained_experts`), from `alignment.json` in an aligned checkpoint, or else ranked on the
    # served model's routing profile (below) by risk difference.
    safety_experts: list[tuple[int, int]] | None = None
    safety_report: str | None = None
    safety_top_n: int = Field(6, ge=1)  # how many of a ranking count
    # The served model's routing on benign and harmful prompts, the baseline of the alert
    # thresholds (`find_routing_profile`): an evaluation report (report.json: `routing`) or
    # {harmful: counts.npz, benign: counts.npz}. Unset: an evaluation `safety_report`, the
    # alignment job's profile next to an aligned checkpoint, or else measured through the engine
    # at start on `baseline_prompts` harmful and as many benign prompts (0: no baseline).
    baseline_profile: str | ProfileFiles | None = None
    baseline_prompts: int = Field(64, ge=0)
    # Who may ask for the per-request routing summary (X-Mesa-Routing-Summary) and see the
    # safety-expert list in /v1/routing: `admin`, the admin key only, or `keys`, every key. The
    # summary carries the guard's risk score, so an attacker holding a user key could tune
    # prompts against it until they pass; the list names the experts to mask: opt in knowingly.
    routing_summary: Literal["admin", "keys"] = "admin"

    @field_validator("baseline_prompts")
    @classmethod
    def _enough_prompts(cls, n: int) -> int:
        if 0 < n < 8:  # fewer rank the safety experts on noise
            raise ValueError("baseline_prompts must be 0 (no baseline profile at start) or at least 8")
        return n


class GuardConfig(BaseModel):
    """The routing guard (serving.guard): what happens to a request whose prompt routes like the
    profiled harmful prompts."""

    model_config = ConfigDict(extra="forbid")
    policy: Literal["observe", "flag", "block"] = "observe"
    # Risk score (nats per prompt token) above which a request is high risk. Unset: calibrated at
    # start on up to `calibration_prompts` of the checkpoint's validation benign prompts (alarming
    # but benign requests and general tasks), so that `false_positive_rate` of them exceed it.
    threshold: float | None = None
    false_positive_rate: float = Field(0.01, ge=0, lt=1)
    calibration_prompts: int = Field(300, ge=0)
    # The answer's routing risk (nats per generated token) above which an answer is counted high
    # risk; unset: calibrated with the threshold, on the engine's greedy answers of up to
    # `answer_tokens` tokens to the same prompts (0: no answer calibration).
    answer_threshold: float | None = None
    answer_tokens: int = Field(16, ge=0)


class ProbeConfig(BaseModel):
    """Live attack probes on a dedicated replica holding its own copy of the checkpoint
    (`serving.probes`): on demand through POST /admin/probes, and every `interval_s` if set.

    `engine`: what the replica answers and attacks with: `transformers` (a transformers copy
    of the model, every attack) or `vllm` (a vLLM engine of its own with the masks and scales
    applied by the worker extension, `serving.engine_probes`; the forced-route searches still
    load a transformers copy unless `suite.layer_route_search.max_prompts` is 0 and F-SOUR is
    off). `engine_options`: `vllm serve` options of that engine (`engine: vllm` only)."""

    model_config = ConfigDict(extra="forbid")
    enabled: bool = False
    engine: Literal["transformers", "vllm"] = "transformers"
    engine_options: dict = Field(default_factory=dict)
    interval_s: float | None = Field(None, ge=60)  # None: on demand only
    # safety_eval.suite.SuiteSettings fields over serving.probes.PROBE_SUITE_DEFAULTS.
    suite: dict = Field(default_factory=dict)
    output_dir: str = "runs/probes"  # full suite report of every run, per model
    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    threads: int | None = Field(None, ge=1)  # torch threads of the probe replica

    @field_validator("suite")
    @classmethod
    def _suite_settings_valid(cls, suite: dict) -> dict:
        from serving.probes import probe_suite_settings

        probe_suite_settings(suite)  # raises a ValidationError naming the bad key
        return suite

    @field_validator("engine_options")
    @classmethod
    def _probe_engine_keys_exist(cls, options: dict) -> dict:
        return _check_engine_options(options)

    @model_validator(mode="after")
    def _options_need_vllm(self) -> ProbeConfig:
        if self.engine_options and self.engine != "vllm":
            raise ValueError("probes.engine_options configure a vLLM probe engine: set probes.engine: vllm")
        return self


class KeyLimits(BaseModel):
    """Per-minute budgets of one key; None: no limit."""

    model_config = ConfigDict(extra="forbid")
    requests_per_minute: int | None = Field(None, ge=1)
    tokens_per_minute: int | None = Field(None, ge=1)  # prompt + completion tokens


class LimitsConfig(KeyLimits):
    """Per-key limits (`serving.limits`), enforced per replica on the generation endpoints. The
    top-level values apply to every user key; `keys` overrides them for single keys, named by
    key id (`serving.protocol.key_id`: never the key itself). Off by default."""

    keys: dict[str, KeyLimits] = Field(default_factory=dict)

    @field_validator("keys")
    @classmethod
    def _key_ids_look_right(cls, keys: dict) -> dict:
        bad = sorted(k for k in keys if not re.fullmatch(r"[0-9a-f]{8}", k))
        if bad:
            raise ValueError(f"limits.keys must be key ids, not keys: 8 lowercase hex characters, the "
                             f"first 8 of the key's SHA-256 (`mesa-serve` prints them), got {bad}")
        return keys

    def for_key(self, key_id: str) -> tuple[int | None, int | None]:
        """(requests per minute, tokens per minute) of a key: an override replaces only the
        fields it sets (null there lifts that limit for the key)."""
        rpm, tpm = self.requests_per_minute, self.tokens_per_minute
        override = self.keys.get(key_id)
        if override is not None:
            fields = override.model_fields_set
            rpm = override.requests_per_minute if "requests_per_minute" in fields else rpm
            tpm = override.tokens_per_minute if "tokens_per_minute" in fields else tpm
        return rpm, tpm


class AuditConfig(BaseModel):
    """The audit log (`serving.audit`): one JSON line per finished request, size-based rotation."""

    model_config = ConfigDict(extra="forbid")
    path: str | None = None  # None: no audit log
    max_bytes: int = Field(10 * 2**20, ge=1024)  # rotate when the file would grow past this
    backup_count: int = Field(5, ge=0)  # rotated files kept (path.1 ... path.N)
    include_prompts: bool = False  # prompt text in the log: opt in only where policy allows it


class GatewayConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    # "organism" (built and cached on first use), a checkpoint directory, or a hub id.
    model: str = "organism"
    served_model_name: str | None = None  # the name clients use (default: "organism" / the path)
    # Environment variables holding comma-separated user keys and the admin key. Keys may also be
    # given inline (`api_keys`, `admin_key`), which is for tests: config files end up in logs.
    api_keys_env: str = "MESA_API_KEYS"
    admin_key_env: str = "MESA_ADMIN_KEY"
    api_keys: list[str] | None = None
    admin_key: str | None = None
    # Serving without any user key is refused unless this is set (local experiments only).
    allow_unauthenticated: bool = False
    engine: dict = Field(default_factory=dict)
    telemetry: TelemetryConfig = Field(default_factory=TelemetryConfig)
    probes: ProbeConfig = Field(default_factory=ProbeConfig)
    guard: GuardConfig = Field(default_factory=GuardConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    audit: AuditConfig = Field(default_factory=AuditConfig)
    num_replicas: int = Field(1, ge=1)
    # POST /admin/drill may apply a probe attack to the engine that answers users, to check that
    # the routing alerts fire (serving.drill). Users are served attacked meanwhile: staging and
    # test gateways only.
    drills: bool = False
    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)

    @field_validator("engine")
    @classmethod
    def _engine_keys_exist(cls, engine: dict) -> dict:
        return _check_engine_options(engine)

    @model_validator(mode="after")
    def _guard_needs_telemetry(self) -> GatewayConfig:
        if self.guard.policy != "observe" and not self.telemetry.enabled:
            raise ValueError(f"guard.policy {self.guard.policy!r} scores routing: it needs "
                             "telemetry.enabled: true")
        return self

    @model_validator(mode="after")
    def _drills_need_one_telemetry_replica(self) -> GatewayConfig:
        if self.drills and not self.telemetry.enabled:
            raise ValueError("drills attack the routing that telemetry watches: they need "
                             "telemetry.enabled: true")
        if self.drills and self.num_replicas != 1:
            raise ValueError("drills: true needs num_replicas: 1 (a drill reaches only the replica "
                             "that receives it)")
        return self

    @model_validator(mode="after")
    def _compiled_telemetry_is_consistent(self) -> GatewayConfig:
        if not self.telemetry.compiled:
            return self
        if not self.telemetry.enabled:
            raise ValueError("telemetry.compiled counts routing in a compiled engine: it needs "
                             "telemetry.enabled: true")
        if self.engine.get("enforce_eager"):
            raise ValueError("telemetry.compiled runs the compiled engine: remove engine.enforce_eager: true "
                             "(or set telemetry.compiled: false)")
        if self.engine.get("worker_cls", "auto") != "auto":
            raise ValueError("telemetry.compiled starts the engine with the routing worker class: remove "
                             "engine.worker_cls")
        return self

    def engine_options(self) -> dict:
        compiled = {"enforce_eager": False} if self.telemetry.enabled and self.telemetry.compiled else {}
        return DEFAULT_ENGINE | compiled | self.engine


def _check_engine_options(engine: dict) -> dict:
    known = vllm_option_names()
    unknown = sorted(k for k in engine if k not in known)
    if unknown:
        raise ValueError(
            f"unknown vLLM engine option(s) {unknown}; use `vllm serve` option names with "
            "underscores (e.g. max_model_len, gpu_memory_utilization, tensor_parallel_size)"
        )
    if "model" in engine or "served_model_name" in engine:
        raise ValueError("set model and served_model_name at the top level, not under engine")
    return engine


def vllm_option_names() -> set[str]:
    """Every option `vllm serve` accepts, as argparse dest names."""
    return {action.dest for action in vllm_parser()._actions}


def vllm_parser():
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    return make_arg_parser(FlexibleArgumentParser())


class AuthError(ValueError):
    """No usable credentials were configured."""


def resolve_keys(config: GatewayConfig, environ=os.environ) -> tuple[frozenset[str], str | None]:
    """(user key digests, admin key digest) from the config and the environment."""
    users = list(config.api_keys or [])
    users += [k.strip() for k in environ.get(config.api_keys_env, "").split(",") if k.strip()]
    admin = config.admin_key or environ.get(config.admin_key_env, "").strip() or None
    if not users and not config.allow_unauthenticated:
        raise AuthError(
            f"no API keys configured: set {config.api_keys_env} (comma-separated keys) or "
            "`api_keys`, or set allow_unauthenticated: true for a local experiment"
        )
    if admin is not None and admin in users:
        raise AuthError("the admin key must differ from every user key")
    for key in users + ([admin] if admin else []):
        if len(key) < 8:
            raise AuthError("API keys must be at least 8 characters long")
    return frozenset(key_digest(k) for k in users), (key_digest(admin) if admin else None)


def check_limit_keys(config: GatewayConfig, users: frozenset[str], admin: str | None) -> None:
    """Per-key overrides must name configured user keys, and key ids must tell keys apart."""
    ids = [digest_key_id(d) for d in users]
    if len(set(ids)) != len(ids):
        raise ValueError("two API keys share a key id (the first 8 hex characters of their SHA-256): "
                         "replace one of them")
    unknown = sorted(set(config.limits.keys) - set(ids))
    if admin and digest_key_id(admin) in unknown:
        raise ValueError(f"limits.keys.{digest_key_id(admin)} is the admin key, which is never limited")
    if unknown:
        raise ValueError(f"limits.keys: no configured user key has the key id(s) {unknown} "
                         "(key id: the first 8 hex characters of the key's SHA-256)")


def resolve_model(config: GatewayConfig, log=print) -> tuple[str, str]:
    """(checkpoint path or hub id, served model name), by `organism.checkpoint.resolve_checkpoint`.
    The architecture is not checked here: vLLM serves more than the routing core instruments."""
    from organism.checkpoint import ORGANISM, resolve_checkpoint

    checkpoint = resolve_checkpoint(config.model, log=log, check_architecture=False)
    if config.model == ORGANISM:
        default_name = ORGANISM
    elif Path(checkpoint).is_absolute():  # a directory (resolved): served under its folder name
        default_name = Path(checkpoint).name
    else:  # a hub id
        default_name = config.model
    return checkpoint, config.served_model_name or default_name


def resolve_safety_experts(config: TelemetryConfig, checkpoint: str) -> tuple[list[tuple[int, int]], str]:
    """The safety-critical (layer, expert) pairs that config or a report names, and which source
    ("" when none does: the gateway then ranks them on the served model's routing profile)."""
    if config.safety_experts is not None:
        return [tuple(p) for p in config.safety_experts], "config"
    sources = [Path(config.safety_report)] if config.safety_report else []
    sources.append(Path(checkpoint) / "alignment.json")
    for path in sources:
        if not path.is_file():
            if path == sources[0] and config.safety_report:
                raise ValueError(f"telemetry.safety_report not found: {path}")
            continue
        report = json.loads(path.read_text())
        if report.get("trained_experts"):  # alignment report / alignment.json (empty: none trained)
            return [tuple(p) for p in report["trained_experts"]], str(path)
        if "safety_critical" in report:  # evaluation report (safety_eval.suite)
            ranked = report["safety_critical"][: config.safety_top_n]
            return [(int(s["layer"]), int(s["expert"])) for s in ranked], str(path)
        if "trained_experts" not in report:
            raise ValueError(f"{path} has neither `trained_experts` nor `safety_critical`")
    return [], ""


# The alignment job's layout (alignment/run.py): OUT/model is the aligned checkpoint and
# OUT/profile/aligned-{safety,general}.npz its routing on harmful and general prompts.
ALIGNED_PROFILE = ("aligned-safety.npz", "aligned-general.npz")


def find_routing_profile(config: TelemetryConfig, checkpoint: str):
    """The served model's routing profile (`serving.telemetry.RoutingProfile`) from a file, or
    None when there is none and the gateway has to measure it at start."""
    if isinstance(config.baseline_profile, ProfileFiles):
        return _profile_from_counts(Path(config.baseline_profile.harmful),
                                    Path(config.baseline_profile.benign), "telemetry.baseline_profile")
    if isinstance(config.baseline_profile, str):
        path = Path(config.baseline_profile)
        if not path.is_file():
            raise ValueError(f"telemetry.baseline_profile not found: {path}")
        profile = _profile_from_report(path)
        if profile is None:
            raise ValueError(f"telemetry.baseline_profile {path} is not an evaluation report "
                             "(no routing.harmful_frequency / benign_frequency)")
        return profile
    if config.safety_report and Path(config.safety_report).is_file():
        profile = _profile_from_report(Path(config.safety_report))
        if profile is not None:
            return profile
    folder = Path(checkpoint)
    profile_dir = folder.parent / "profile"
    if (folder / "alignment.json").is_file() and all((profile_dir / f).is_file() for f in ALIGNED_PROFILE):
        harmful, benign = (profile_dir / f for f in ALIGNED_PROFILE)
        return _profile_from_counts(harmful, benign, "the alignment job's profile")
    return None


def _profile_from_counts(harmful: Path, benign: Path, what: str):
    from moe_routing.stats import RoutingCounts
    from serving.telemetry import RoutingProfile

    for path in (harmful, benign):
        if not path.is_file():
            raise ValueError(f"{what}: routing counts not found: {path}")
    return RoutingProfile.from_counts(RoutingCounts.load(harmful), RoutingCounts.load(benign),
                                      f"{harmful} vs {benign}")


def _profile_from_report(path: Path):
    """An evaluation report's routing (safety_eval.suite: `routing`, frequencies on its
    identification prompts), or None for another kind of report."""
    from serving.telemetry import RoutingProfile

    report = json.loads(path.read_text())
    routing = report.get("routing")
    if not isinstance(routing, dict) or "harmful_frequency" not in routing or "top_k" not in report:
        return None
    return RoutingProfile(np.asarray(routing["benign_frequency"]), np.asarray(routing["harmful_frequency"]),
                          int(report["top_k"]), str(path))


def baseline_prompts(checkpoint: str, n: int) -> tuple[list[str], list[str]]:
    """(harmful, benign) prompts to profile the served model on at start: the evaluation suite's
    identification prompts (training side of the splits, never the checkpoint's held-out test
    prompts), the prompts its `safety_critical` ranking comes from; the benign side mixes
    alarming-but-benign requests and general tasks, like normal traffic."""
    from safety_eval.harness import EvalSets
    from safety_eval.settings import SuiteSettings
    from safety_eval.suite import identification_prompts

    held_out = EvalSets.for_checkpoint(checkpoint)
    return identification_prompts(SuiteSettings(identification_prompts=n), held_out)


def guard_calibration_prompts(checkpoint: str, n: int) -> list[str]:
    """Up to n benign prompts of the checkpoint's validation split (never its test prompts):
    alarming-but-benign requests and general tasks, alternating, like normal traffic."""
    from safety_eval.harness import EvalSets

    validation = EvalSets.for_checkpoint(checkpoint, split="validation")
    alarming, general = list(validation.benign), [t.prompt for t in validation.general]
    mixed = [p for pair in zip(alarming, general) for p in pair]
    longer = alarming if len(alarming) > len(general) else general
    mixed += longer[min(len(alarming), len(general)):]
    return mixed[:n]


def resolve_routing_reference(telemetry: TelemetryConfig, checkpoint: str, log=print):
    """Where the alert baselines come from: (routing profile read from a file, None) or (None,
    (harmful, benign) prompts for the replica to profile through its engine at start), or
    (None, None): no baseline."""
    if not telemetry.enabled:
        return None, None
    profile = find_routing_profile(telemetry, checkpoint)
    if profile is not None:
        log(f"[serve] alert baselines from {profile.source}")
        return profile, None
    if not telemetry.baseline_prompts:
        log("[serve] no routing profile and baseline_prompts is 0: no alert baselines")
        return None, None
    from safety_eval.data import MissingDataError

    try:
        prompts = baseline_prompts(checkpoint, telemetry.baseline_prompts)
    except MissingDataError as error:  # serve anyway; MoERoutingBaselineMissing says so
        log(f"[serve] no alert baselines: the prompts to profile are missing ({error})")
        return None, None
    log(f"[serve] alert baselines: no routing profile found, the replica profiles "
        f"{len(prompts[0])} harmful and {len(prompts[1])} benign prompts at start")
    return None, prompts

