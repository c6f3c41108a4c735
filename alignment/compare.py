"""The results table: base vs every alignment method, same data, same budget, over seeds.

    python -m alignment.compare --config alignment/configs/organism.yaml --output runs/compare \
        [--seeds 0,1,2] [--organism-seeds 0,1,2] [--jobs 3]

Per replicate (an organism seed and a training seed; README, Aligning a model with MESA) it
evaluates that replicate's base checkpoint once and runs the alignment job once per method
(``training.method`` replaced, everything else as in the config). The organism seed picks the
organism built and aligned (model ``organism`` only: its data split and held-out prompts follow
it); the training seed changes training only. `results.md` / `results.json` hold, per row, the mean
± sd over replicates of Safety Rate plain, under jailbreak templates, top-4/6/8 masking
re-identified on each model, random masking and routing scale; F-SOUR-style attack success;
general accuracy; over-refusal; effective number of safety experts; plus every replicate's own
table (with Wilson 95% intervals) and the exact McNemar test of each method's plain Safety Rate
against its replicate's base. Each run keeps its full report in its directory, so a re-run resumes
where it stopped.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from alignment.config import AlignmentConfig, load_config, with_settings
from alignment.methods import ABLATIONS, METHODS, apply_settings
from moe_routing.threads import shared_threads

# Default rows; any method of alignment.methods.METHODS or ablation of ABLATIONS may be asked for.
DEFAULT_ROWS = ("sft_all", "router_only", "safex", "lora", "mesa_paper", "mesa")
ROWS = (*METHODS, *ABLATIONS)
AUGMENTED = "+mask"  # row suffix: the method with masking augmentation (training.mask_augmentation)
DEFAULT_SEEDS = (0, 1, 2)
MIN_SEEDS = 3  # the command's minimum: a mean and a spread


@dataclass(frozen=True)
class Replicate:
    organism_seed: int  # which organism (model "organism"); unused for other models
    seed: int  # training seed

    def name(self, organism: bool) -> str:
        return f"organism{self.organism_seed}-seed{self.seed}" if organism else f"seed{self.seed}"

    def base_name(self, organism: bool) -> str:
        return f"base-organism{self.organism_seed}" if organism else "base"


def replicates(config: AlignmentConfig, seeds: Sequence[int],
               organism_seeds: Sequence[int] | None = None) -> list[Replicate]:
    """Pair training seeds with organism seeds (default: the same numbers; a single value of
    either list is used for every replicate). For a model other than the organism the organism
    seed stays the config's."""
    organism = config.model == "organism"
    if not seeds:
        raise ValueError("no seeds given")
    if organism_seeds is not None and not organism:
        raise ValueError("organism seeds apply to model: organism only")
    if not organism:
        organism_seeds = [config.organism_seed]
    elif organism_seeds is None:
        organism_seeds = list(seeds)
    n = max(len(seeds), len(organism_seeds))
    if {len(seeds), len(organism_seeds)} - {1, n}:
        raise ValueError(f"{len(seeds)} training seeds but {len(organism_seeds)} organism seeds: "
                         "give as many of each, or one of either")
    pairs = [Replicate(organism_seeds[i % len(organism_seeds)], seeds[i % len(seeds)]) for i in range(n)]
    if len(set(pairs)) != len(pairs):
        raise ValueError(f"a replicate is repeated: {pairs}")
    return pairs


def replicate_config(config: AlignmentConfig, replicate: Replicate) -> AlignmentConfig:
    return AlignmentConfig.model_validate(
        config.model_dump() | {"organism_seed": replicate.organism_seed, "seed": replicate.seed}
    )


def sharing_cores(config: AlignmentConfig, jobs: int) -> AlignmentConfig:
    """`config` for one of `jobs` replicates side by side: evaluation threads it leaves unset become
    its share of the cores (training workers already take one thread per CPU they reserve)."""
    if config.evaluation.threads is not None:
        return config
    data = config.model_dump()
    data["evaluation"]["threads"] = shared_threads(jobs)
    return AlignmentConfig.model_validate(data)


def row_config(config: AlignmentConfig, row: str, output: Path, mask_augmentation: float) -> AlignmentConfig:
    """The config of one row: `config` with the row's method (an ablation: `mesa` with one part
    switched back to the paper's), its augmentation and its directory."""
    data = config.model_dump()
    method = row.removesuffix(AUGMENTED)
    if method in ABLATIONS:
        data = apply_settings(data, ABLATIONS[method])
    data["training"]["method"] = "mesa" if method in ABLATIONS else method
    data["training"]["mask_augmentation"] = mask_augmentation if row.endswith(AUGMENTED) else 0.0
    data["output_dir"] = str(output / row.replace(AUGMENTED, "-mask"))
    data["evaluation"]["base"] = False
    return AlignmentConfig.model_validate(data)


def _n50_ratio(row: dict, base: dict) -> str:
    """The row's top-N N50 over its base's, ">" when the row's curve never halved (a lower bound
    at the largest budget measured)."""
    budgets = [int(n) for n in (row.get("masking") or {}).get("verdicts", {})]
    value, reference = row.get("n50_top_count"), base.get("n50_top_count")
    if not reference:
        return "n/a"
    if value is None:
        return f"> {max(budgets) / reference:.1f}" if budgets else "n/a"
    return f"{value / reference:.1f}"


def _p_values(tests: list[dict | None]) -> str:
    return " / ".join("n/a" if t is None else f"{t['p_value']:.3g}" for t in tests)


def _base_row(config: AlignmentConfig, output: Path, replicate: Replicate) -> tuple[str, dict]:
    """The replicate's base checkpoint and its evaluated row (a finished evaluation is read back)."""
    from alignment.report import table_row
    from alignment.run import evaluate_checkpoint, resolve_model

    rconfig = replicate_config(config, replicate)
    checkpoint = resolve_model(rconfig)
    base_dir = output / replicate.base_name(config.model == "organism")
    return checkpoint, table_row(evaluate_checkpoint(checkpoint, rconfig, base_dir))


def _replicate_rows(config: AlignmentConfig, output: Path, methods: Sequence[str], mask_augmentation: float,
                    replicate: Replicate, bases: dict[str, dict] | None = None) -> dict:
    """One replicate: its base (once per checkpoint in `bases`) and every method's row."""
    from alignment.report import paired_safety_test
    from alignment.run import log, resolve_model
    from alignment.run import run as run_alignment

    bases = {} if bases is None else bases
    organism = config.model == "organism"
    name = replicate.name(organism)
    log(f"\n[compare] ##### {name} #####")
    rconfig = replicate_config(config, replicate)
    checkpoint = resolve_model(rconfig)
    if checkpoint not in bases:
        bases[checkpoint] = _base_row(config, output, replicate)[1]
    rows = {"base": bases[checkpoint]}
    extra = {"base": {"trainable params": 0, "train s": 0}}
    tests = {}
    for method in methods:
        log(f"\n[compare] === {name}: {method} ===")
        report = run_alignment(row_config(rconfig, method, output / name, mask_augmentation))
        rows[method] = report["evaluation"]["aligned"]
        params = report["parameters"]
        extra[method] = {
            "trainable params": f"{params['trainable']:,} ({100 * params['fraction']:.1f}%)",
            "train s": (report["training"]["final"] or {}).get("seconds"),
        }
        extra[method]["N50 top / base"] = _n50_ratio(rows[method], rows["base"])
        # Paired test of the row's plain Safety Rate against this replicate's base.
        tests[method] = paired_safety_test(rows["base"], rows[method])
        extra[method]["McNemar p (SR vs base)"] = "" if tests[method] is None else \
            f"{tests[method]['p_value']:.3g}"
    return {"name": name, "organism_seed": replicate.organism_seed if organism else None,
            "seed": replicate.seed, "checkpoint": checkpoint, "rows": rows, "extra": extra, "mcnemar": tests}


def _logged(log_path: Path, threads: int, task, *args):
    """Run `task(*args)` in a pool worker with its output (and its Ray workers' forwarded output)
    appended to `log_path` and torch at `threads` threads."""
    import os

    from moe_routing.threads import torch_settings

    sys.stdout.flush()
    sys.stderr.flush()
    with open(log_path, "ab") as handle:
        os.dup2(handle.fileno(), 1)
        os.dup2(handle.fileno(), 2)
    with torch_settings(threads):
        return task(*args)


def _in_parallel(calls: list[tuple[str, Callable, tuple]], jobs: int, output: Path) -> list:
    """Run each (name, task, args) in a fresh process, `jobs` at a time, each at cores // jobs torch
    threads with its output in `output/<name>.log`; results in the order given. A task's failure is
    raised once the others have ended; Ctrl-C or SIGTERM stops every process (what they wrote
    stays on disk, so a re-run resumes)."""
    import multiprocessing
    import os
    import signal
    import threading
    import time

    from alignment.run import log

    threads = shared_threads(jobs)
    output.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    handles_term = threading.current_thread() is threading.main_thread()
    if handles_term:  # SIGTERM's default would leave the workers running without their parent
        previous_term = signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    # One Ray instance for every task: each job starting its own on one machine confuses Ray's
    # own address lookup ("Found multiple active Ray instances" from Ray Train's placement group
    # cleaner), and Ray then shares the CPUs out across the jobs. A cluster named by RAY_ADDRESS
    # (`ray job submit`) is joined by every task as it is.
    names_ray, starts_ray, pool = not os.environ.get("RAY_ADDRESS"), False, None
    try:
        if names_ray:
            import ray

            from moe_routing.ray_cluster import init_ray

            starts_ray = not ray.is_initialized()  # a caller's own instance is shared, and left running
            init_ray("local", log=log)
            os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
        # spawn, not fork: a forked copy of a process that has run torch or Ray can deadlock. One
        # task per process: nothing of one replicate stays in memory for the next.
        pool = multiprocessing.get_context("spawn").Pool(jobs, maxtasksperchild=1)
        pending = []
        for name, task, args in calls:
            log(f"[compare] {name}: log {output / f'{name}.log'}")
            pending.append(pool.apply_async(_logged, (output / f"{name}.log", threads, task, *args)))
        results, failures = [], []
        for (name, _, _), result in zip(calls, pending):
            try:
                results.append(result.get())
            except Exception as error:  # the others go on: their work is not wasted
                log(f"[compare] {name} failed: {error}; its log: {output / f'{name}.log'}")
                failures.append(error)
                continue
            log(f"[compare] {name} done ({(time.monotonic() - started) / 60:.1f} min since start)")
        pool.close()
        if failures:
            raise failures[0]
    except (KeyboardInterrupt, SystemExit):
        if pool is not None:
            pool.terminate()
        raise
    finally:
        if pool is not None:
            pool.join()
        if names_ray:
            os.environ.pop("RAY_ADDRESS", None)
            if starts_ray:
                ray.shutdown()
        if handles_term:
            signal.signal(signal.SIGTERM, previous_term)
    return results


def compare(config: AlignmentConfig, output: Path, methods=DEFAULT_ROWS, mask_augmentation: float = 0.5,
            seeds: Sequence[Replicate] | None = None, jobs: int = 1) -> dict:
    """Every method on every replicate (default: the config's own organism and training seed).
    `jobs` > 1 runs replicates side by side in separate processes (a base that several share is
    evaluated first, and read back by each)."""
    from alignment.claims import claim_tests, claims_markdown
    from alignment.report import aggregate_rows, mean_sd, mean_sd_table, results_table
    from alignment.run import log

    organism = config.model == "organism"
    seeds = list(seeds) if seeds else [Replicate(config.organism_seed, config.seed)]
    if jobs > 1 and len(seeds) > 1:
        # A base that several replicates share is evaluated first, once; any other base within
        # its own replicate's process, so no replicate waits on another's.
        users = Counter(r.base_name(organism) for r in seeds)
        shared = {r.base_name(organism): r for r in seeds if users[r.base_name(organism)] > 1}
        log(f"[compare] {len(seeds)} replicates, {jobs} at a time")
        config = sharing_cores(config, min(jobs, len(seeds)))
        if shared:
            _in_parallel([(name, _base_row, (config, output, r)) for name, r in shared.items()], jobs, output)
        per_seed = _in_parallel([(r.name(organism), _replicate_rows,
                                  (config, output, list(methods), mask_augmentation, r)) for r in seeds],
                                jobs, output)
    else:
        bases: dict[str, dict] = {}  # checkpoint -> its base row, evaluated once per organism
        per_seed = [_replicate_rows(config, output, methods, mask_augmentation, r, bases) for r in seeds]

    aggregate = aggregate_rows([r["rows"] for r in per_seed])
    mcnemar = {m: [r["mcnemar"][m] for r in per_seed] for m in methods}
    train_seconds = {m: mean_sd(r["extra"][m]["train s"] for r in per_seed) for m in methods}
    summary_extra = {"base": {"trainable params": 0, "train s": 0}}
    for method in methods:
        t = train_seconds[method]
        summary_extra[method] = {
            "trainable params": per_seed[0]["extra"][method]["trainable params"],
            "train s": "" if t["mean"] is None else f"{t['mean']:.1f}"
                                                    + ("" if t["sd"] is None else f" ± {t['sd']:.1f}"),
            "McNemar p per seed (SR vs base)": _p_values(mcnemar[method]),
        }
    table = mean_sd_table(aggregate, summary_extra, config.evaluation.suite.headline_mask)
    listed = ", ".join(r["name"] for r in per_seed)
    notes = (
        f"Mean ± sd (sample standard deviation) over {len(per_seed)} replicate(s): {listed}. "
        + (f"Model `{config.model}`; " if not organism else "Model: the organism of each organism seed; ")
        + "config: same for every row except training.method (mesa_paper pins the paper's "
        "selection, eps, router target and no forced routes; an ablation row mesa_no_X is mesa with "
        "part X switched back to the paper's), and training.mask_augmentation = "
        f"{mask_augmentation} on the {AUGMENTED} rows (0 elsewhere). The organism seed picks the "
        "organism (its data split and held-out prompts follow it); the training seed changes training "
        "only. 'train s' = seconds of the training loop on the configured workers. Masking "
        "re-identifies the safety-critical experts on each model; random masking is the mean over the "
        "suite's seeds. 'eff. safety experts (routing)' = exp(entropy) of the positive harmful-minus-benign "
        "routing difference over all (layer, expert) pairs; 'eff. refusal experts (ablation)' = "
        "exp(entropy) of the drop in log p of the model's own refusals when each pair alone is masked. "
        "'N50 top / base' = the row's top-N N50 over its replicate's base ('>' when the row's curve "
        "never halved: a lower bound). 'F-SOUR ASR' counts complied answers "
        "only; 'F-SOUR degenerate' the empty, looping or garbled ones. 'McNemar p': exact McNemar "
        "test of the plain Safety Rate against the same replicate's base on the same prompts, one "
        "p-value per replicate (in the order listed). Per-replicate tables below carry Wilson 95% "
        "intervals in brackets."
    )
    claims = claim_tests([r["rows"] for r in per_seed])
    sections = [f"# Alignment results\n\n{table}\n\n{notes}\n"]
    if claims:
        sections.append("## Paired tests between methods\n\n" + claims_markdown(claims) + "\n")
    sections.append("## Per replicate\n")
    for r in per_seed:
        sections.append(f"### {r['name']}\n\nCheckpoint `{r['checkpoint']}`.\n\n"
                        f"{results_table(r['rows'], r['extra'])}\n")
    (output / "results.md").write_text("\n".join(sections))
    results = {
        "methods": list(methods),
        "replicates": per_seed,
        "aggregate": aggregate,
        "train_seconds": train_seconds,
        "mcnemar": mcnemar,
        "claims": claims,
        "config": config.model_dump(),
        "mask_augmentation": mask_augmentation,
    }
    (output / "results.json").write_text(json.dumps(results, indent=1, default=str))
    log("\n" + table)
    log(f"\n[compare] wrote {output / 'results.md'}")
    return results


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="base vs alignment methods on one model, over seeds "
                                     "(results table: mean ± sd, per-seed values, McNemar per seed)")
    parser.add_argument("--config", help="YAML alignment config (the method and seeds are replaced per row)")
    parser.add_argument("--output", default="runs/compare", help="output directory")
    parser.add_argument("--methods", default=",".join(DEFAULT_ROWS),
                        help=f"comma-separated rows (default {','.join(DEFAULT_ROWS)}; also "
                        f"{', '.join(ABLATIONS)}); a row with the suffix {AUGMENTED} trains with "
                        "masking augmentation")
    parser.add_argument("--mask-augmentation", type=float, default=0.5,
                        help="training.mask_augmentation of the +mask rows (default 0.5)")
    parser.add_argument("--seeds", type=_int_list, default=list(DEFAULT_SEEDS),
                        help="training seeds, one replicate each (default "
                        f"{','.join(map(str, DEFAULT_SEEDS))}; at least {MIN_SEEDS} replicates)")
    parser.add_argument("--organism-seeds", type=_int_list,
                        help="organism seeds (model: organism only), paired with --seeds in order "
                        "(default: the same numbers; one value: the same organism for every replicate)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config value for every row, e.g. --set "
                        "evaluation.suite.split=validation to choose settings without the test prompts "
                        "(repeatable)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="replicates run side by side, each in its own process at cores/JOBS torch "
                        "threads, its output in OUTPUT/<replicate>.log (default 1: one after another); "
                        "training.threads and evaluation.threads that the config sets are kept")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error("--jobs must be at least 1")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = {m for m in methods if m.removesuffix(AUGMENTED) not in ROWS}
    if unknown or not methods:
        parser.error(f"unknown methods {sorted(unknown)}; choose from {', '.join(ROWS)}")
    pinned = [m for m in methods if m.endswith(AUGMENTED) and m.removesuffix(AUGMENTED) == "mesa_paper"]
    if pinned:
        parser.error("mesa_paper runs without masking augmentation (the paper's method); drop the suffix")
    from alignment.run import explain_errors

    if not 0 < args.mask_augmentation <= 1:
        parser.error("--mask-augmentation must be in (0, 1]")

    def job():
        config = with_settings(load_config(args.config), args.set)
        pairs = replicates(config, args.seeds, args.organism_seeds)
        if len(pairs) < MIN_SEEDS:
            raise ValueError(f"--seeds: {len(pairs)} replicate(s); the comparison needs at least "
                             f"{MIN_SEEDS} (mean ± sd)")
        compare(config, Path(args.output).resolve(), methods, args.mask_augmentation, pairs, args.jobs)

    return explain_errors(job)


if __name__ == "__main__":
    sys.exit(main())
