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

from pydantic import BaseModel, ConfigDict, Field, field_validator

from serving.protocol import digest_key_id, key_digest

# What the CPU organism needs on this machine (README, Engines); real-model configs override.
DEFAULT_ENGINE = {
    "enforce_eager": True,  # Python-side routing hooks run only in eager mode
    "gpu_memory_utilization": 0.3,  # on CPU: the share of memory reserved for the KV cache
    "max_model_len": 1024,
    "seed": 0,
}


class TelemetryConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    enabled: bool = True
    poll_interval_s: float = Field(1.0, gt=0, le=60)  # how often counts are pulled from the engine
    window_s: float = Field(60.0, gt=0)  # sliding window of the concentration gauges
    # Concentration's top_share is the share of the load on this many most-loaded experts per
    # layer (default: the model's top-k).
    top_n: int | None = Field(None, ge=1)
    # Per (layer, expert) counters: L x E x 2 series per model; turn off for very large models.
    per_expert_metrics: bool = True
    # The model's known safety-critical experts, as [layer, expert] pairs. When unset they are
    # read from `safety_report` (an evaluation report's `safety_critical` or an alignment report's
    # `trained_experts`), or from `alignment.json` in an aligned checkpoint.
    safety_experts: list[tuple[int, int]] | None = None
    safety_report: str | None = None
    safety_top_n: int = Field(6, ge=1)  # how many of an evaluation report's ranking count


class ProbeConfig(BaseModel):
    """Live attack probes on a dedicated replica holding its own copy of the checkpoint
    (`serving.probes`): on demand through POST /admin/probes, and every `interval_s` if set."""

    model_config = ConfigDict(extra="forbid")
    enabled: bool = False
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
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    audit: AuditConfig = Field(default_factory=AuditConfig)
    num_replicas: int = Field(1, ge=1)
    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)

    @field_validator("engine")
    @classmethod
    def _engine_keys_exist(cls, engine: dict) -> dict:
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

    def engine_options(self) -> dict:
        return DEFAULT_ENGINE | self.engine


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
    """The safety-critical (layer, expert) pairs and where they came from ("" when unknown)."""
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
        if "trained_experts" in report:  # alignment report / alignment.json
            return [tuple(p) for p in report["trained_experts"]], str(path)
        if "safety_critical" in report:  # evaluation report (safety_eval.suite)
            ranked = report["safety_critical"][: config.safety_top_n]
            return [(int(s["layer"]), int(s["expert"])) for s in ranked], str(path)
        raise ValueError(f"{path} has neither `trained_experts` nor `safety_critical`")
    return [], ""
