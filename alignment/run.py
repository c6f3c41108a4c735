"""MESA alignment job: profile -> allocate -> train -> export -> evaluate, on Ray.

    ray job submit --working-dir . -- python alignment/run.py --config alignment/configs/organism.yaml
    python alignment/run.py --config ...        # the same on a local Ray instance

Every stage writes its result into `output_dir` before the next starts, and a re-run with the
same config picks up where the last one stopped: profiles and the allocation are reused, training
resumes from its latest Ray Train checkpoint, finished evaluations are kept. A different config in
a used `output_dir` is refused rather than mixed.

Outputs: `model/` (the aligned HF checkpoint), `report.json`, `report.md` and plots.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script (`python alignment/run.py`): import the package
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
from pydantic import ValidationError  # noqa: E402

from alignment.allocation import allocate  # noqa: E402
from alignment.config import AlignmentConfig, load_config, with_settings  # noqa: E402
from alignment.data import AlignmentData, DataError, load_alignment_data  # noqa: E402
from moe_routing.architectures import UnsupportedArchitectureError  # noqa: E402
from moe_routing.ray_cluster import RayClusterError, init_ray  # noqa: E402
from moe_routing.stats import RoutingCounts, effective_safety_experts, risk_difference  # noqa: E402
from moe_routing.threads import cpu_cores, torch_settings  # noqa: E402
from safety_eval.settings import SuiteSettings  # noqa: E402


def log(message: str) -> None:
    print(message, flush=True)


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def resolve_model(config: AlignmentConfig) -> str:
    """The checkpoint to align (`organism.checkpoint.resolve_checkpoint`): the organism of
    `organism_preset` and `organism_seed` (built and cached on first use), a directory, or a hub
    id. Fails early, before any Ray work, for a missing directory or an unsupported architecture."""
    from organism.checkpoint import resolve_checkpoint

    try:
        return resolve_checkpoint(config.model, log=log, organism_seed=config.organism_seed,
                                  organism_preset=config.organism_preset)
    except UnsupportedArchitectureError:
        raise
    except ValueError as error:
        raise ValueError(f"model: {error}") from None


def _profile(checkpoint: str, prompts: list[str], config: AlignmentConfig, path: Path) -> RoutingCounts:
    """Routing counts of `prompts` on `checkpoint`, Ray-sharded, reused from `path` when the same
    prompts and settings were profiled before."""
    from moe_routing.profiler import ProfileSettings, profile_routing_ray

    settings = ProfileSettings(batch_size=config.profile.batch_size, max_length=config.profile.max_length)
    key = _digest([checkpoint, prompts, config.profile.model_dump()])
    meta = path.with_suffix(".json")
    if path.is_file() and meta.is_file() and json.loads(meta.read_text()).get("key") == key:
        return RoutingCounts.load(path)
    counts = profile_routing_ray(
        checkpoint, prompts, settings, num_workers=config.profile.num_workers, progress=False,
        resume_dir=path.parent / f"{path.stem}-shards",
    )
    counts.save(path)
    meta.write_text(json.dumps({"key": key, "prompts": len(prompts)}))
    return counts


def trained_experts(config: AlignmentConfig, allocation, safety: RoutingCounts,
                    general: RoutingCounts) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """(experts whose weights train, the safety set the router target uses) for the method."""
    from alignment.methods import method_spec

    spec = method_spec(config.training.method)
    if spec.experts == "safety_set":
        return list(allocation.safety_set), list(allocation.safety_set)
    if spec.experts == "safety_critical":  # SAFEx-style: the experts safety routing concentrates in
        from moe_routing.stats import safety_critical_ranking

        ranking = safety_critical_ranking(safety, general, top_n=config.training.safex_experts, n_bootstrap=0)
        return [(s.layer, s.expert) for s in ranking], []
    return [], []


def _flatten(value, prefix: str = "") -> dict[str, object]:
    """A nested config dump as {"section.key": value}, JSON-normalised (paths and enums as text)."""
    value = json.loads(json.dumps(value, default=str))
    if not isinstance(value, dict):
        return {prefix: value}
    flat = {}
    for key, item in value.items():
        flat |= _flatten(item, f"{prefix}.{key}" if prefix else key)
    return flat


def config_changes(previous: dict, current: dict, defaults: dict) -> list[str]:
    """The settings in which `current` differs from the config a run was made with, as
    "key: old -> new". A key the earlier run's config lacks (it was added to the code later)
    counts only when its value now differs from the default, since new keys default to the
    behaviour the code had before them."""
    old, new, default = _flatten(previous), _flatten(current), _flatten(defaults)
    changes = []
    for key in sorted(old.keys() | new.keys()):
        if key not in old:
            if new[key] != default.get(key, object()):
                changes.append(f"{key}: (not set) -> {new[key]!r}")
        elif key not in new:
            changes.append(f"{key}: {old[key]!r} -> (no longer a setting)")
        elif old[key] != new[key]:
            changes.append(f"{key}: {old[key]!r} -> {new[key]!r}")
    return changes


def _check_output_dir(out: Path, config: dict, checkpoint: str, defaults: dict) -> None:
    """Refuse to resume a run made with a different config or model (its checkpoints would be
    mixed in), naming what differs. A run from before a config key existed resumes when the key
    keeps its default."""
    fingerprint = {"config": config, "checkpoint": checkpoint}
    path = out / "run.json"
    if path.is_file():
        previous = json.loads(path.read_text())
        if previous.get("key") == _digest(fingerprint):
            return
        changes = config_changes(previous.get("config") or {}, config, defaults)
        if str(previous.get("checkpoint")) != str(checkpoint):
            changes.insert(0, f"model: {previous.get('checkpoint')} -> {checkpoint}")
        if changes:
            raise ValueError(
                f"output_dir {out} holds a run with a different config or model ("
                + "; ".join(changes[:5]) + (f"; and {len(changes) - 5} more" if len(changes) > 5 else "")
                + "); choose another output_dir or delete it"
            )
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"key": _digest(fingerprint), **fingerprint}, indent=1, default=str))


def check_layout(training) -> None:
    """Refuse, before any work, a worker layout the Ray cluster cannot place: each training
    worker takes one GPU (use_gpu) or one CPU, and Ray would otherwise wait for them forever."""
    import ray

    kind = "GPU" if training.use_gpu else "CPU"
    have = ray.cluster_resources().get(kind, 0)
    if have < training.num_workers:
        raise ValueError(f"training.num_workers {training.num_workers} needs {training.num_workers} "
                         f"{kind}s (one per worker), but the Ray cluster has {have:g}; lower num_workers "
                         "or add nodes (an autoscaling cluster: start them first)")


class TrainingDiverged(RuntimeError):
    """The training loss became NaN or inf; the loop stopped before writing it into the weights."""


def _diverged(error) -> FloatingPointError | None:
    """The loop's FloatingPointError among a Ray Train WorkerGroupError's worker failures. Ray
    wraps each worker's exception with its traceback string (as `_base_exc`, Ray 2.60)."""
    for failure in error.worker_failures.values():
        cause = getattr(failure, "_base_exc", failure)
        if isinstance(cause, FloatingPointError):
            return cause
    return None


def train(config: AlignmentConfig, checkpoint: str, experts, safety_set, cost, out: Path,
          safety: RoutingCounts, general: RoutingCounts) -> Path:
    """Ray Train (TorchTrainer): data-parallel workers; returns the final checkpoint directory."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig, WorkerGroupError
    from ray.train.torch import TorchTrainer

    from alignment.loop import train_worker
    from moe_routing.stats import expert_frequency

    training = config.training
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={
            "config": config.model_dump(),
            "checkpoint": checkpoint,
            "experts": [list(p) for p in experts],
            "safety_set": [list(p) for p in safety_set],
            "cost": np.asarray(cost).tolist(),
            "checkpoint_root": str((out / "ray_train" / f"train-{training.method}").resolve()),
            "safety_frequency": expert_frequency(safety).tolist(),
            "general_frequency": expert_frequency(general).tolist(),
        },
        scaling_config=ScalingConfig(
            num_workers=training.num_workers,
            use_gpu=training.use_gpu,
            resources_per_worker={"CPU": 1} if not training.use_gpu else None,
        ),
        run_config=RunConfig(
            name=f"train-{training.method}",  # checkpoint_root above follows this layout
            storage_path=str((out / "ray_train").resolve()),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            failure_config=FailureConfig(max_failures=0),
        ),
    )
    try:
        result = trainer.fit()
    except WorkerGroupError as error:
        diverged = _diverged(error)
        if diverged is None:
            raise
        raise TrainingDiverged(f"training stopped: {diverged}; lower training.learning_rate, or look for "
                               "NaN or inf in the model's weights") from None
    if result.checkpoint is not None:
        return Path(result.checkpoint.path)
    # Resumed from a checkpoint Ray had not recorded, with no step left to run: use it.
    from alignment.loop import checkpoint_directories

    found = checkpoint_directories(out / "ray_train" / f"train-{training.method}")
    if not found:
        raise RuntimeError("training finished without a checkpoint")
    return found[0]


def evaluation_on_gpu(config: AlignmentConfig) -> bool:
    """Whether the job's evaluations run on a GPU: the suite's device names cuda, or is auto while
    training uses GPUs (the job's own process, often on a head node without one, cannot tell)."""
    device = config.evaluation.suite.device
    return device.startswith("cuda") or (device == "auto" and config.training.use_gpu)


def check_evaluation_layout(config: AlignmentConfig) -> None:
    """Refuse, before any work, a GPU evaluation the Ray cluster has no GPU for (it would wait
    forever, after training) or that names a device its one-GPU task cannot see."""
    import ray

    if not (config.evaluation.enabled and evaluation_on_gpu(config)):
        return
    device = config.evaluation.suite.device
    if device not in ("auto", "cuda", "cuda:0"):
        raise ValueError(f"evaluation.suite.device {device}: the job's evaluation is a Ray task holding one "
                         "GPU, which it sees as cuda; set cuda (or auto)")
    if ray.cluster_resources().get("GPU", 0) < 1:
        raise ValueError(f"evaluation.suite.device {device} (training.use_gpu "
                         f"{str(config.training.use_gpu).lower()}) evaluates on a GPU, but the Ray cluster "
                         "has none; set evaluation.suite.device cpu, or evaluation.enabled false")


def evaluate_checkpoint(checkpoint: str, config: AlignmentConfig, out: Path,
                        threads: int | None = None) -> dict:
    """The evaluation suite on `checkpoint`, written to `out` (kept if already there). On a GPU
    (`evaluation_on_gpu`) it is a Ray task holding one, a process of its own whose GPU memory is
    freed when it ends; otherwise it runs here, at `threads` torch threads (default:
    evaluation.threads, else every core)."""
    report_path = out / "report.json"
    settings = config.evaluation.suite
    if report_path.is_file():
        report = json.loads(report_path.read_text())
        try:  # a report from before a setting existed has that setting's default
            same_settings = SuiteSettings.model_validate(report.get("settings")) == settings
        except ValidationError:
            same_settings = False
        # "rates" marks a report with three-way verdicts; an older one is measured again.
        if same_settings and report.get("checkpoint") == checkpoint and "rates" in report:
            return report
    if evaluation_on_gpu(config):
        return _evaluate_on_gpu(checkpoint, config, out)
    return _evaluate_here(checkpoint, settings, out, threads or config.evaluation.threads)


def _evaluate_here(checkpoint: str, settings: SuiteSettings, out: Path, threads: int | None) -> dict:
    from safety_eval.report import write_report
    from safety_eval.suite import run_suite

    # Explicit, not torch's default: a `ray job submit` entrypoint inherits OMP_NUM_THREADS=1.
    with torch_settings(threads or cpu_cores()):
        report = run_suite(checkpoint, settings, log=log)
    write_report(report, out)
    return report


def _evaluate_on_gpu(checkpoint: str, config: AlignmentConfig, out: Path) -> dict:
    """`_evaluate_here` in a Ray task holding one GPU (Ray makes it the task's cuda:0)."""
    import ray

    if not ray.is_initialized():
        init_ray(log=log)
    task = ray.remote(num_gpus=1, max_calls=1)(_evaluate_here)
    log(f"[align] evaluating {checkpoint} on a GPU (a Ray task)")
    return ray.get(task.remote(checkpoint, config.evaluation.suite, out, config.evaluation.threads))


def _evaluate_timed(checkpoint: str, config: dict, out: str, threads: int) -> tuple[dict, float]:
    started = time.monotonic()
    report = evaluate_checkpoint(checkpoint, AlignmentConfig.model_validate(config), Path(out), threads)
    return report, round(time.monotonic() - started, 1)


def evaluate_beside_training(checkpoint: str, config: AlignmentConfig, out: Path, host_free: int | None):
    """Start the base evaluation as a Ray task that runs while training does (it needs only the base
    checkpoint); its ObjectRef, or None, and the base is then evaluated after training as before.
    It starts only beside CPU training whose memory check left `host_free` bytes, enough for it
    (`evaluation_memory`), and only when the cluster has CPUs to spare beside training's workers:
    Ray Train gives up on workers it cannot place within a minute. GPU training and GPU
    evaluations keep the old order (the workers' host memory is not measured; the GPUs are
    training's)."""
    import ray

    from alignment.sharding import evaluation_memory

    if host_free is None or evaluation_on_gpu(config):
        return None
    memory = evaluation_memory(checkpoint, config.evaluation.suite.dtype)
    if memory > host_free:
        log(f"[align] evaluate_base waits for training: it takes about {memory / 2**30:.1f} GiB, training "
            f"leaves {host_free / 2**30:.1f} GiB")
        return None
    need = config.evaluation.threads or 1
    spare = ray.available_resources().get("CPU", 0) - config.training.num_workers
    if spare < need:
        log(f"[align] evaluate_base waits for training: {spare:g} CPUs to spare, it takes {need}")
        return None
    log(f"[align] evaluate_base beside training ({need} CPU)")
    task = ray.remote(num_cpus=need)(_evaluate_timed)
    return task.remote(checkpoint, config.model_dump(), str(out), need)


def run(config: AlignmentConfig) -> dict:

    started = time.monotonic()
    timings: dict[str, float] = {}
    out = Path(config.output_dir).resolve()
    checkpoint = resolve_model(config)
    # organism_seed and organism_preset are left out: the checkpoint path (organism-<config hash>)
    # already names them, and runs from before those keys existed keep resuming.
    named_by_checkpoint = {"evaluation", "organism_seed", "organism_preset"}
    _check_output_dir(out, config.model_dump(exclude=named_by_checkpoint), checkpoint,
                      AlignmentConfig().model_dump(exclude=named_by_checkpoint))
    (out / "config.json").write_text(config.model_dump_json(indent=1))
    log(f"[align] method {config.training.method}; model {checkpoint}; output {out}")
    from alignment.methods import method_spec

    pinned = method_spec(config.training.method).pinned
    if pinned:
        log(f"[align] {config.training.method} pins {', '.join(f'{k}={v}' for k, v in pinned.items())}")

    def stage(name: str, fn):
        t0 = time.monotonic()
        log(f"[align] {name} ...")
        value = fn()
        timings[name] = round(time.monotonic() - t0, 1)
        log(f"[align] {name} done in {timings[name]} s")
        return value

    # Under `ray job submit` RAY_ADDRESS points at the cluster; otherwise a local instance.
    init_ray(log_to_driver=True, log=log)
    check_layout(config.training)
    check_evaluation_layout(config)
    data: AlignmentData = stage("data", lambda: load_alignment_data(config, checkpoint))
    log(f"[align] data: {data.sizes()}")
    safety_prompts, general_prompts = data.statistics_prompts(config.data.statistics_prompts, config.seed)
    safety, general = stage("profile", lambda: (
        _profile(checkpoint, safety_prompts, config, out / "profile" / "safety.npz"),
        _profile(checkpoint, general_prompts, config, out / "profile" / "general.npz"),
    ))
    allocation = stage("allocate", lambda: allocate(safety, general, config.allocation))
    experts, safety_set = trained_experts(config, allocation, safety, general)
    log(f"[align] trained experts {experts or '-'}")
    (out / "allocation.json").write_text(json.dumps(allocation.to_dict(), indent=1))

    host_free = None  # host memory CPU training leaves free, where measured
    if config.training.memory_check:  # before any training worker starts: one line if it will not fit
        from alignment.sharding import check_training_memory

        free = check_training_memory(config.training, checkpoint, experts, log=log)
        host_free = None if config.training.use_gpu else free
    base_dir = out / "eval" / "base"
    evaluating_base = config.evaluation.enabled and config.evaluation.base
    base_task = evaluate_beside_training(checkpoint, config, base_dir, host_free) if evaluating_base else None
    trained = stage("train", lambda: train(config, checkpoint, experts, safety_set, allocation.cost, out,
                                           safety, general))
    history = training_history(trained)

    evaluations = {}
    if base_task is not None:
        import ray

        # Before profiling the aligned model, whose workers want the CPU the task holds. Its own
        # time goes under evaluate_base; the time training's end waited for it apart.
        evaluations["base"], timings["evaluate_base"] = stage("evaluate_base_wait",
                                                              lambda: ray.get(base_task))
    from alignment.export import export_checkpoint

    model_dir = out / "model"
    info = {
        "base_checkpoint": checkpoint,
        "method": config.training.method,
        "trained_experts": [list(p) for p in experts],
        "config": config.model_dump(),
    }
    stage("export", lambda: export_checkpoint(config, checkpoint, trained, experts, model_dir, info))
    after_safety, after_general = stage("profile_aligned", lambda: (
        _profile(str(model_dir), safety_prompts, config, out / "profile" / "aligned-safety.npz"),
        _profile(str(model_dir), general_prompts, config, out / "profile" / "aligned-general.npz"),
    ))

    if evaluating_base and base_task is None:
        evaluations["base"] = stage("evaluate_base",
                                    lambda: evaluate_checkpoint(checkpoint, config, base_dir))
    if config.evaluation.enabled:
        evaluations["aligned"] = stage("evaluate_aligned", lambda: evaluate_checkpoint(
            str(model_dir), config, out / "eval" / "aligned"))

    from alignment.export import parameter_counts
    from alignment.report import table_row, write_alignment_report

    report = {
        "method": config.training.method,
        "base_checkpoint": checkpoint,
        "aligned_checkpoint": str(model_dir),
        "config": config.model_dump(),
        "data": {**data.sizes(), "source": data.source, "statistics_prompts": [len(safety_prompts),
                                                                                 len(general_prompts)]},
        "allocation": allocation.to_dict(),
        "trained_experts": [list(p) for p in experts],
        "parameters": parameter_counts(checkpoint, config, experts),
        "training": {"steps": len(history), "final": history[-1] if history else None,
                     "history": history},
        "routing": {
            "before": _routing_summary(safety, general),
            "after": _routing_summary(after_safety, after_general),
        },
        "evaluation": {name: table_row(r) for name, r in evaluations.items()},
        "timings_seconds": timings | {"total": round(time.monotonic() - started, 1)},
        "versions": _versions(),
    }
    paths = write_alignment_report(report, out, before=(safety, general), after=(after_safety, after_general))
    log(f"[align] done in {report['timings_seconds']['total']} s; aligned checkpoint: {model_dir}")
    for path in paths:
        log(f"  {path}")
    return report


def training_history(trained: Path) -> list[dict]:
    import torch

    from alignment.loop import STATE_FILE

    return torch.load(trained / STATE_FILE, map_location="cpu", weights_only=False)["history"]


def _versions() -> dict:
    from importlib.metadata import version

    return {name: version(name) for name in ("torch", "transformers", "ray", "pot", "peft")}


def _routing_summary(safety: RoutingCounts, general: RoutingCounts) -> dict:
    from moe_routing.stats import expert_frequency

    risk = risk_difference(safety, general)
    return {
        "safety_frequency": np.round(expert_frequency(safety), 5).tolist(),
        "general_frequency": np.round(expert_frequency(general), 5).tolist(),
        "effective_safety_experts": round(effective_safety_experts(risk), 3),
    }


def explain_errors(job) -> int:
    """Run `job()`; bad input (config, data, model) becomes a one-line message and exit code 2; a
    cluster that cannot run the job, or a loss gone NaN, a one-line message and exit code 1."""
    try:
        job()
    except ValidationError as error:
        print(f"error: bad alignment config:\n{error}", file=sys.stderr)
        return 2
    except (UnsupportedArchitectureError, DataError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except (RayClusterError, TrainingDiverged) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="MESA alignment job (profile, allocate, train, export, "
                                     "evaluate)")
    parser.add_argument("--config", help="YAML alignment config (default: the organism defaults)")
    parser.add_argument("--output-dir", help="override output_dir")
    parser.add_argument("--method", help="override training.method (one of alignment.methods.METHODS: "
                        "mesa, mesa_paper, sft_all, router_only, safex, lora)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config value, e.g. --set training.steps=50 or "
                        "--set evaluation.suite.split=validation (repeatable)")
    args = parser.parse_args(argv)

    def job():
        config = with_settings(load_config(args.config), args.set)
        overrides = {"output_dir": args.output_dir} if args.output_dir else {}
        if args.method:
            overrides["training"] = config.training.model_dump() | {"method": args.method}
        run(AlignmentConfig.model_validate(config.model_dump() | overrides))

    return explain_errors(job)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
