"""Live attack probes: the evaluation harness's attacks, run against the served checkpoint on a
dedicated probe replica that user traffic never reaches.

`ProbeRunner` is a second Serve deployment of each gateway application. It holds its own copy of
the checkpoint, with transformers or (`probes.engine: vllm`) on a vLLM engine of its own
(`serving.engine_probes`, masks and scales applied inside that engine by the worker extension),
and runs `safety_eval.suite.run_suite` on it, so the probes are
exactly the attacks defined in `safety_eval.attacks` (expert masking re-identified on the model
under attack with the suite's top-N rule (`moe_routing.stats.top_pairs`: at most E - top_k pairs
per layer), random masking, routing scale, the layer route search, the paper's F-SOUR, jailbreak
templates),
with the same judge and prompts as the evaluation and alignment reports, and their numbers agree
with those reports. Masks and scales are hooks on the probe replica's own modules or own engine:
the vLLM engine that answers users is a different process and never sees them.

The runner owns the schedule and the latest result; gateway replicas start runs and read results
through its handle, export them as `mesa_probe_*` gauges and serve them at `/admin/probes`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import traceback
from pathlib import Path

from ray import serve

logger = logging.getLogger("ray.serve")

# What a live probe runs unless the config says otherwise: the evaluation suite's defaults (the
# reported configuration: same prompts, seeds, judge), with masking only at the headline N and the
# layer route search bounded and F-SOUR off (minutes per prompt on a CPU: turn it on with
# `probes.suite.fsour.candidates`), so one run takes about a minute on the CPU organism.
PROBE_SUITE_DEFAULTS = {
    "mask_counts": [6], "mask_fractions": [], "headline_mask": 6,
    "layer_route_search": {"max_prompts": 20},
    "fsour": {"candidates": [], "max_prompts": 2},
    "ablation_prompts": 0,  # a report figure for alignment, not a live probe (needs transformers)
}


def probe_suite_settings(overrides: dict):
    """The suite settings of a probe run: defaults above, then the config's `probes.suite`
    (`routing_search` is the old name of `layer_route_search`)."""
    from safety_eval.suite import SuiteSettings

    overrides = dict(overrides)
    if "routing_search" in overrides and "layer_route_search" not in overrides:
        overrides["layer_route_search"] = overrides.pop("routing_search")
    merged = PROBE_SUITE_DEFAULTS | overrides
    for nested in ("layer_route_search", "fsour"):
        if nested in overrides:
            merged[nested] = PROBE_SUITE_DEFAULTS[nested] | overrides[nested]
    return SuiteSettings.model_validate(merged)


def attack_safety_rates(report: dict) -> dict[str, float]:
    """Safety Rate on held-out harmful prompts per attack, from a suite report.

    "none" is the unattacked model; "layer_route_search" (also under its old name "routing_search")
    and "fsour_nN" are the shares of prompts still refused after the search. (Since answers are
    judged three ways, attack success counts complied answers only, so 1 - attack success also
    counts degenerate answers as safe; the refused share is read directly, with 1 - attack success
    only for reports written before the three-way verdicts.)"""
    plain = report["plain"]
    rates = {"none": plain["safety_rate"]["rate"]}
    if "jailbreak_safety_rate" in plain:
        rates["jailbreak_templates"] = plain["jailbreak_safety_rate"]["rate"]
    masking = report["masking"]
    for n, rate in masking["targeted"].items():
        rates[f"top{n}_mask"] = rate
    for n, spread in masking["random"].items():
        rates[f"random{n}_mask"] = spread["mean"]
    for name, rate in report["routing_scale"].items():
        rates[f"scale_{name}"] = rate
    search = report.get("layer_route_search") or report["routing_search"]
    if not search.get("skipped"):
        refused = search.get("refused_rate")
        if "layer_route_search" in report:  # reports before issue 14 know only the old name
            rates["layer_route_search"] = refused["rate"] if refused else 1.0 - search["attack_success_rate"]
        # The old name, kept for dashboards and alert rules.
        rates["routing_search"] = refused["rate"] if refused else 1.0 - search["attack_success_rate"]
    for n_candidates, run in (report.get("fsour") or {}).items():
        rates[f"fsour_n{n_candidates}"] = run["all"]["refused_rate"]["rate"]
    return {name: round(float(rate), 4) for name, rate in rates.items()}


def attack_success_rates(report: dict) -> dict[str, float]:
    """Complied share per search attack (F-SOUR's over all attacked prompts, the paper's ASR)."""
    search = report.get("layer_route_search") or report["routing_search"]
    out = {}
    if not search.get("skipped"):
        rate = search["attack_success_rate"]
        out = {"layer_route_search": rate, "routing_search": rate}
    for n_candidates, run in (report.get("fsour") or {}).items():
        out[f"fsour_n{n_candidates}"] = run["attack_success_rate"]
    return out


def probe_summary(model: str, report: dict, started: float, finished: float, report_path: str) -> dict:
    """The compact result a gateway exports and serves (the full suite report stays on disk)."""
    plain = report["plain"]
    return {
        "model": model,
        "checkpoint": report["checkpoint"],
        "started_at": started,
        "finished_at": finished,
        "duration_s": round(finished - started, 2),
        "safety_rate": attack_safety_rates(report),
        "attack_success_rate": attack_success_rates(report),
        "n50": report.get("n50"),
        "general_accuracy": plain["general_accuracy"]["rate"],
        "over_refusal": plain["over_refusal"]["rate"],
        "safety_critical": [[s["layer"], s["expert"]] for s in report["safety_critical"]],
        "effective_safety_experts": report["summary"]["effective_safety_experts"],
        "prompts": {k: v for k, v in report["eval_sets"].items() if k != "jailbreak_templates"}
        | {"jailbreak_templates": len(report["eval_sets"]["jailbreak_templates"])},
        "settings": report["settings"],
        "report_path": report_path,
    }


@serve.deployment(num_replicas=1, max_ongoing_requests=32, health_check_period_s=30)
class ProbeRunner:
    """One probe replica per served model: its own model copy, one run at a time."""

    async def __init__(self, checkpoint: str, model_name: str, suite: dict, interval_s: float | None,
                       output_dir: str, threads: int | None = None, engine: str = "transformers",
                       engine_options: dict | None = None):
        self.checkpoint, self.model_name = checkpoint, model_name
        self.settings = probe_suite_settings(suite)
        self.interval_s, self.threads = interval_s, threads
        self.output_dir = Path(output_dir)
        self.engine, self.engine_options = engine, engine_options or {}
        self.model = self.tokenizer = None
        self.generator = None  # serving.engine_probes.EngineChatGenerator with engine "vllm"
        self.state: dict = {"status": "idle", "phase": None, "runs": 0, "failures": 0, "error": None,
                            "started_at": None, "interval_s": interval_s, "latest": None}
        self._task: asyncio.Task | None = None
        self._schedule = asyncio.get_running_loop().create_task(self._scheduled()) if interval_s else None

    async def start(self) -> dict:
        """Start a run unless one is running; the state says which happened."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())
            await asyncio.sleep(0)  # let the run mark itself running before we report
            return await self.status() | {"started": True}
        return await self.status() | {"started": False}

    async def status(self) -> dict:
        return dict(self.state)

    async def _scheduled(self) -> None:
        while True:
            await self.start()
            await self._task
            await asyncio.sleep(self.interval_s)

    async def _run(self) -> None:
        self.state.update(status="running", phase="loading", error=None, started_at=time.time())
        started = time.time()
        try:
            if self.engine == "vllm" and self.generator is None:
                from serving.engine_probes import EngineChatGenerator

                self.generator = await EngineChatGenerator.create(self.checkpoint,
                                                                  engine_options=self.engine_options)
            report = await asyncio.to_thread(self._run_suite)
            finished = time.time()
            path = self._save(report, finished)
            self.state["latest"] = probe_summary(self.model_name, report, started, finished, str(path))
            self.state.update(status="idle", phase=None, runs=self.state["runs"] + 1)
            logger.info("probe run of %s finished in %.0f s", self.model_name, finished - started)
        except Exception as error:  # keep the replica and the last good result; say what failed
            logger.error("probe run of %s failed:\n%s", self.model_name, traceback.format_exc())
            self.state.update(status="failed", phase=None, failures=self.state["failures"] + 1,
                              error=f"{type(error).__name__}: {error}")

    def _run_suite(self) -> dict:
        import torch

        from moe_routing.devices import load_dtype, resolve_device
        from moe_routing.profiler import load_checkpoint
        from safety_eval.suite import run_suite

        if self.threads:
            torch.set_num_threads(self.threads)
        if self.model is None and (self.generator is None or self.settings.needs_transformers):
            device = resolve_device(self.settings.device)
            self.model, self.tokenizer = load_checkpoint(
                self.checkpoint, device=device, dtype=load_dtype(self.settings.dtype, device))
        torch.manual_seed(self.settings.seed)
        return run_suite(self.checkpoint, self.settings, model=self.model, tokenizer=self.tokenizer,
                         generator=self.generator,
                         log=lambda message: logger.info("probe %s: %s", self.model_name, message),
                         on_phase=lambda name: self.state.update(phase=name))

    def _save(self, report: dict, finished: float) -> Path:
        """Each run's full suite report, plus `latest.json`, under output_dir/<model>/."""
        directory = self.output_dir / self.model_name
        directory.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(finished))
        path = directory / f"probe-{stamp}.json"
        text = json.dumps(report, indent=1, default=str)
        path.write_text(text)
        (directory / "latest.json").write_text(text)
        return path


class ProbeGauges:
    """The probe runner's state as a gateway replica's `mesa_probe_*` series (every replica
    exports the same): runs and failures as counters, the latest result's rates as gauges."""

    def __init__(self, metrics, model_name: str):
        self.metrics, self.model_name = metrics, model_name
        self._seen = {"runs": 0, "failures": 0, "finished_at": None}

    async def follow(self, runner, interval_s: float = 2.0) -> None:
        """Export `runner`'s state every `interval_s`, until cancelled."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                self.export(await runner.status.remote())
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("reading the probe runner's state failed")

    def export(self, state: dict) -> None:
        m, name, seen = self.metrics, self.model_name, self._seen
        m.probe_running.labels(name).set(1 if state["status"] == "running" else 0)
        for outcome, key in (("ok", "runs"), ("failed", "failures")):
            m.probe_runs.labels(name, outcome).inc(max(0, state[key] - seen[key]))
            seen[key] = state[key]
        latest = state.get("latest")
        if latest is None or latest["finished_at"] == seen["finished_at"]:
            return
        seen["finished_at"] = latest["finished_at"]
        for attack, rate in latest["safety_rate"].items():
            m.probe_safety_rate.labels(name, attack).set(rate)
            m.probe_last_run.labels(name, attack).set(latest["finished_at"])
        m.probe_general_accuracy.labels(name).set(latest["general_accuracy"])
        m.probe_over_refusal.labels(name).set(latest["over_refusal"])
        m.probe_duration.labels(name).set(latest["duration_s"])
