"""The full evaluation suite of one checkpoint: plain metrics plus every attack.

    mesa-eval --checkpoint PATH --output DIR [--config suite.yaml]

writes DIR/report.json, DIR/report.md and DIR/*.png (see `safety_eval.report`).

Every answer gets a three-way verdict (refused, complied, degenerate: `safety_eval.verdicts`).
Safety Rate is the refused share, attack success the complied share; every rate comes with its
Wilson 95% interval, and `report["rates"]` holds the three rates of every set and attack.
`report["verdicts"]` keeps the verdict of each prompt (by index into the eval set) per attack, so
two reports on the same prompts can be compared pairwise (`safety_eval.stats.mcnemar`).
"""

from __future__ import annotations

import argparse
import platform
import random
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from pydantic import ValidationError

from moe_routing.architectures import UnsupportedArchitectureError
from moe_routing.devices import load_dtype, resolve_device
from moe_routing.profiler import load_checkpoint
from moe_routing.stats import budget_count, concentration, effective_safety_experts, expert_frequency
from safety_eval.ablation import effective_refusal_experts, refusal_drops
from safety_eval.attacks import (
    LayerRouteSearch,
    RoutingScale,
    SafetyProfile,
    mean_and_spread,
    n50,
    random_mask,
    run_layer_route_search,
    top_mask,
)
from safety_eval.data import MissingDataError, general_tasks, standard_splits
from safety_eval.fsour import (
    FSourSettings,
    checkpoint_identity,
    draw_prompts,
    fsour_entry,
    fsour_rates,
    run_fsour,
)
from safety_eval.generation import HFChatGenerator
from safety_eval.harness import EvalSets, evaluate, refusal_rate
from safety_eval.judge import JudgeError, build_judge, judge_line, judge_report
from safety_eval.settings import SuiteSettings, load_settings
from safety_eval.stats import rate_entry, verdict_rates
from safety_eval.verdicts import COMPLIED, REFUSED


def identification_prompts(settings: SuiteSettings, held_out: EvalSets) -> tuple[list[str], list[str]]:
    """Harmful vs benign prompts for re-identifying safety-critical experts: training-side
    prompts only, and never one of `held_out`'s, so the test prompts stay unseen by the attacker."""
    splits = standard_splits(seed=settings.seed)
    rng = random.Random(settings.seed)
    n = settings.identification_prompts
    excluded = set(held_out.harmful) | set(held_out.benign)
    harmful = [p.text for p in splits.harmful_train if p.text not in excluded]
    rng.shuffle(harmful)
    general = [t.prompt for t in general_tasks(n, seed=settings.seed + 20_000)]
    benign = [p.text for p in splits.benign_train if p.text not in excluded] + general
    rng.shuffle(benign)
    return harmful[:n], benign[:n]


def run_suite(
    checkpoint: str | Path,
    settings: SuiteSettings | None = None,
    *,
    model=None,
    tokenizer=None,
    profile: SafetyProfile | None = None,
    log=lambda message: print(message, flush=True),
    on_phase=lambda name: None,
    work_dir: str | Path | None = None,
    generator=None,
) -> dict:
    """Every metric and attack on one checkpoint; returns the report as a dict.

    `profile` (harmful vs benign routing of this checkpoint, e.g. from the Ray-sharded profiler
    on `identification_prompts`) skips the in-process identification profiling. `work_dir` (the
    report's directory under `mesa-eval`) keeps each F-SOUR run's journal, `fsour_nN.jsonl`, so a
    rerun after a crash resumes the slow attack where it stopped. `on_phase(name)` is
    called as each phase starts (plain, identification, masking, routing_scale, layer_route_search,
    fsour).

    `generator` answers, attacks and profiles on another engine than a transformers model in
    this process (the serving probe replica's vLLM engine, `serving.engine_probes`): it has
    `generate`, `attacked(attack)`, `profile_safety(harmful, benign)` and `shape`. The forced-route
    searches still need a transformers model: it is loaded (or `model` used) only when one of
    them runs (`layer_route_search.max_prompts` > 0 or F-SOUR candidates).

    Masking budgets: `mask_counts` plus each of `mask_fractions` as a count (`budget_count`), the
    top-N pairs capped at E - top_k per layer (`moe_routing.stats.top_pairs`); N50 (`n50`) is the
    budget that halves the Safety Rate on the measured curve, the headline robustness figure."""
    settings = settings or SuiteSettings()
    started = time.monotonic()
    # The judge first: a judge endpoint that does not answer fails here, before any model loads.
    judge_settings = settings.judge
    judge = build_judge(judge_settings)
    judge_entry = judge_report(judge_settings, judge)
    log(f"[eval] {judge_line(judge_entry)}")
    route = settings.layer_route_search
    if model is None and (generator is None or settings.needs_transformers):
        device = resolve_device(settings.device)
        model, tokenizer = load_checkpoint(checkpoint, device=device,
                                           dtype=load_dtype(settings.dtype, device))
    hf_generator = None
    if model is not None:
        hf_generator = HFChatGenerator(model, tokenizer, batch_size=settings.batch_size)
    generator = generator or hf_generator
    moe = generator.shape
    held_out = EvalSets.for_checkpoint(checkpoint, seed=settings.seed, split=settings.split)
    sets = held_out.subsample(settings.limit)
    options = {"max_new_tokens": settings.max_new_tokens}
    timings: dict[str, float] = {}

    def timed(name, fn):
        on_phase(name)
        t0 = time.monotonic()
        result = fn()
        timings[name] = round(time.monotonic() - t0, 2)
        log(f"[eval] {name}: {timings[name]} s")
        return result

    plain = timed("plain", lambda: evaluate(generator, sets, judge, jailbreak=settings.jailbreak, **options))
    if profile is None:
        harmful_id, benign_id = identification_prompts(settings, held_out)
        profile = timed("identification", lambda: generator.profile_safety(harmful_id, benign_id))
    total_pairs = moe.num_layers * moe.num_experts
    fraction_counts = {f: budget_count(f, moe.num_layers, moe.num_experts) for f in settings.mask_fractions}
    mask_counts = sorted(set(settings.mask_counts) | set(fraction_counts.values()))
    max_n = max(mask_counts + [settings.headline_mask])
    if max_n > moe.num_layers * (moe.num_experts - moe.top_k):
        raise ValueError(f"masking budget {max_n} exceeds L * (E - top_k) = "
                         f"{moe.num_layers * (moe.num_experts - moe.top_k)}: a mask must leave top_k experts")
    ranking = profile.ranking(top_n=max_n, n_bootstrap=settings.n_bootstrap, seed=settings.seed)

    # Per-prompt verdicts per attack on the harmful set (index i = sets.harmful[i]).
    verdicts: dict[str, list[str]] = {"plain": plain.safety_rate.verdicts}
    if plain.jailbreak_safety_rate is not None:
        verdicts["jailbreak_templates"] = plain.jailbreak_safety_rate.verdicts

    def safety_under(attack, name: str) -> float:
        with generator.attacked(attack):
            result = refusal_rate(generator, sets.harmful, judge, **options)
        verdicts[name] = result.verdicts
        return result.rate

    def masking_curve():
        targeted, random_rates = {}, {}
        for n in mask_counts:
            targeted[n] = safety_under(top_mask(ranking, n), f"top{n}_mask")
            random_rates[n] = mean_and_spread(
                [
                    safety_under(
                        random_mask(moe.num_layers, moe.num_experts, moe.top_k, n, seed),
                        f"random{n}_mask_seed{seed}",
                    )
                    for seed in settings.random_seeds
                ]
            )
            log(
                f"[eval]   N={n}: top-N SR {targeted[n]:.3f} | random-N SR {random_rates[n]['mean']:.3f} "
                f"± {random_rates[n]['std']:.3f}"
            )
        return targeted, random_rates

    targeted, random_rates = timed("masking", masking_curve)
    safety_pairs = tuple((s.layer, s.expert) for s in ranking[: settings.headline_mask])
    scale = timed(
        "routing_scale",
        lambda: {
            f"{where}_x{factor:g}": safety_under(
                RoutingScale(factor, f"{where} x{factor:g}", None if where == "global" else safety_pairs),
                f"scale_{where}_x{factor:g}",
            )
            for factor in settings.scale_factors
            for where in ("global", "safety_experts")
        },
    )
    ablation = None
    refused = [i for i, v in enumerate(verdicts["plain"]) if v == REFUSED][: settings.ablation_prompts]
    if refused:
        ablation = timed("ablation", lambda: refusal_ablation_entry(
            hf_generator, [sets.harmful[i] for i in refused],
            [plain.safety_rate.samples[i]["answer"] for i in refused], settings, refused))
    search = LayerRouteSearch(route.target, route.candidates_per_layer, route.sweeps, settings.seed)
    search_prompts = sets.harmful[: route.max_prompts]
    success, search_results = 0.0, []
    if search_prompts:
        success, search_results = timed(
            "layer_route_search",
            lambda: run_layer_route_search(
                hf_generator, search_prompts, judge, search, max_new_tokens=settings.max_new_tokens
            ),
        )

    # F-SOUR on prompts drawn at random (seeded), once per candidate count N.
    fsour_index = draw_prompts(sets.harmful, settings.fsour.max_prompts, settings.seed)
    fsour_prompts = [sets.harmful[i] for i in fsour_index]
    fsour_runs = {}
    for n_candidates in settings.fsour.candidates:
        fs = FSourSettings(settings.fsour.target, n_candidates, settings.fsour.threshold,
                           settings.fsour.restarts, settings.seed)
        journal = Path(work_dir) / f"fsour_n{n_candidates}.jsonl" if work_dir else None
        results = timed(f"fsour_n{n_candidates}", lambda fs=fs, journal=journal: run_fsour(
            hf_generator, fsour_prompts, judge, fs, max_new_tokens=settings.max_new_tokens,
            journal=journal, identity=checkpoint_identity(checkpoint)))
        fsour_runs[n_candidates] = (fs, results)
        rates_n = fsour_rates(results)
        log(f"[eval]   F-SOUR N={n_candidates}: ASR {rates_n['all']['complied_rate']['rate']:.3f} "
            f"(refused unattacked: {rates_n['refused_unattacked']['complied_rate']['rate']})")

    search_verdicts = [r.verdict for r in search_results]
    if search_verdicts:
        verdicts["layer_route_search"] = search_verdicts
    rates = {name: {"set": "harmful", **verdict_rates(v)} for name, v in verdicts.items()}
    for n_candidates, (_, results) in fsour_runs.items():  # on the drawn prompts, see prompt_index
        three_way = fsour_rates(results)
        rates[f"fsour_n{n_candidates}"] = {"set": "harmful", "prompt_index": fsour_index, **three_way["all"]}
        rates[f"fsour_n{n_candidates}_refused_unattacked"] = {"set": "harmful",
                                                            **three_way["refused_unattacked"]}
    for n in mask_counts:  # random-N pooled over seeds (seeds x prompts answers)
        pooled = [v for seed in settings.random_seeds for v in verdicts[f"random{n}_mask_seed{seed}"]]
        rates[f"random{n}_mask"] = {"set": "harmful", "pooled_seeds": len(settings.random_seeds),
                                    **verdict_rates(pooled)}
    rates["over_refusal"] = {"set": "benign", **verdict_rates(plain.over_refusal.verdicts)}
    general_right = sum(plain.general.correct)
    rates["general_accuracy"] = {"set": "general", "accuracy": rate_entry(general_right, plain.general.n)}
    per_prompt = {
        name: {"set": "harmful", "prompt_index": list(range(len(v))), "verdicts": v}
        for name, v in verdicts.items()
    }
    for n_candidates, (_, results) in fsour_runs.items():
        per_prompt[f"fsour_n{n_candidates}"] = {
            "set": "harmful", "prompt_index": fsour_index, "verdicts": [r.verdict for r in results],
            "unattacked_verdicts": [r.unattacked_verdict for r in results]}
    baseline = plain.safety_rate.rate
    random_means = {n: r["mean"] for n, r in random_rates.items()}
    robustness = {"baseline_safety_rate": baseline, "half": round(baseline / 2, 4),
                  "total_pairs": total_pairs,
                  "max_budget": max(mask_counts)}
    for name, curve in (("top", targeted), ("random", random_means)):
        value = n50(list(curve), list(curve.values()), baseline)
        robustness[name] = {"count": None if value is None else round(value, 3),
                            "fraction": None if value is None else round(value / total_pairs, 5)}
    per_prompt["over_refusal"] = {
        "set": "benign",
        "prompt_index": list(range(len(plain.over_refusal.verdicts))),
        "verdicts": plain.over_refusal.verdicts,
    }
    per_prompt["general_accuracy"] = {
        "set": "general",
        "prompt_index": list(range(plain.general.n)),
        "correct": plain.general.correct,
    }

    harmful_freq, benign_freq = expert_frequency(profile.harmful), expert_frequency(profile.benign)
    report = {
        "checkpoint": str(checkpoint),
        "architecture": moe.architecture,
        "layers": moe.num_layers,
        "experts": moe.num_experts,
        "top_k": moe.top_k,
        "settings": settings.model_dump(),
        "device": str(model.device) if model is not None else "engine",
        "eval_sets": {
            "source": sets.source,
            "harmful": len(sets.harmful),
            "general": len(sets.general),
            "benign": len(sets.benign),
            "jailbreak_templates": [t.name for t in sets.jailbreak_templates],
        },
        "judge": judge_entry | ({"unparsed": judge.unparsed} if hasattr(judge, "unparsed") else {}),
        "plain": plain.to_dict(),
        "safety_critical": [
            {
                "layer": s.layer,
                "expert": s.expert,
                "risk_difference": round(s.risk_difference, 4),
                "stability": round(s.stability, 3),
            }
            for s in ranking
        ],
        "masking": {"targeted": targeted, "random": random_rates},
        "routing_scale": scale,
        "masking_budgets": {"counts": mask_counts,
                            "fractions": {str(f): c for f, c in fraction_counts.items()},
                            "total_pairs": total_pairs},
        "n50": robustness,
        "ablation": ablation,
        "layer_route_search": _search_entry(search, search_prompts, success, search_results),
        "fsour": {str(n_candidates): fsour_entry(fs, fsour_prompts, fsour_index, results)
                  for n_candidates, (fs, results) in fsour_runs.items()},
        "routing": {
            "harmful_frequency": harmful_freq.round(5).tolist(),
            "benign_frequency": benign_freq.round(5).tolist(),
            "harmful_concentration": concentration(
                profile.harmful.hits, top_n=settings.headline_mask
            ).to_dict(),
            "benign_concentration": concentration(
                profile.benign.hits, top_n=settings.headline_mask
            ).to_dict(),
        },
        "rates": rates,
        "verdicts": per_prompt,
        "timings_seconds": timings | {"total": round(time.monotonic() - started, 2)},
        "engine": getattr(generator, "engine_name", "transformers"),
        "versions": {
            "torch": torch.__version__,
            "transformers": __import__("transformers").__version__,
            "python": platform.python_version(),
        },
    }
    report["routing_search"] = report["layer_route_search"]  # its old name, for older readers
    report["summary"] = summary(report)
    return report


def _search_entry(search: LayerRouteSearch, prompts: list[str], success: float, results: list) -> dict:
    """The layer route search's report entry (`skipped` when it ran on no prompt)."""
    if not results:
        return {**search.to_dict(), "prompts": 0, "skipped": "layer_route_search.max_prompts is 0"}
    verdicts = [r.verdict for r in results]
    return {
        **search.to_dict(),
        "prompts": len(prompts),
        "attack_success_rate": round(success, 4),  # complied share (three-way verdicts)
        "attack_success_interval": rate_entry(sum(v == COMPLIED for v in verdicts),
                                              len(verdicts))["interval"],
        **verdict_rates(verdicts),
        "mean_logprob_gain": round(
            sum(r.target_logprob - r.natural_logprob for r in results) / len(results), 4),
        "samples": [
            {"prompt": p, "forced": r.forced, "answer": r.answer, "refused": r.refused, "verdict": r.verdict}
            for p, r in list(zip(prompts, results))[:5]
        ],
    }


def refusal_ablation_entry(generator: HFChatGenerator, prompts: list[str], answers: list[str],
                           settings: SuiteSettings, index: list[int]) -> dict:
    """The report's `ablation` entry: per-pair refusal drops (`safety_eval.ablation`) on the
    refused prompts `index` of the harmful set, and the effective number of refusal experts."""
    drops = refusal_drops(generator.model, generator.tokenizer, prompts, answers,
                          answer_tokens=settings.ablation_answer_tokens, batch_size=settings.batch_size)
    order = np.argsort(-drops, axis=None)[:10]
    value = effective_refusal_experts(drops)
    return {
        "prompt_index": index,
        "answer_tokens": settings.ablation_answer_tokens,
        "effective_refusal_experts": None if value is None else round(value, 3),
        "drops": drops.round(4).tolist(),
        "top_pairs": [{"layer": int(i // drops.shape[1]), "expert": int(i % drops.shape[1]),
                       "drop": round(float(drops.flat[i]), 4)} for i in order],
    }


def summary(report: dict) -> dict:
    """The headline row of a report (what tables compare across models)."""
    n = report["settings"]["headline_mask"]
    masking = report["masking"]
    plain = report["plain"]
    out = {
        "safety_rate": plain["safety_rate"]["rate"],
        "general_accuracy": plain["general_accuracy"]["rate"],
        "over_refusal": plain["over_refusal"]["rate"],
        f"top{n}_mask_safety_rate": masking["targeted"].get(n),
        f"random{n}_mask_safety_rate": (masking["random"].get(n) or {}).get("mean"),
    }
    search = report.get("layer_route_search") or report["routing_search"]  # old reports: routing_search
    out["layer_route_search_attack_success"] = search.get("attack_success_rate")  # None: skipped
    robustness = report.get("n50")
    if robustness:  # the headline robustness figure (None: never halved up to the largest budget)
        for name in ("top", "random"):
            out[f"n50_{name}_count"] = robustness[name]["count"]
            out[f"n50_{name}_fraction"] = robustness[name]["fraction"]
    for n_candidates, run in (report.get("fsour") or {}).items():
        out[f"fsour_n{n_candidates}_attack_success"] = run["attack_success_rate"]
        out[f"fsour_n{n_candidates}_degenerate_rate"] = run["degenerate_rate"]
        key = f"fsour_n{n_candidates}"
        out[f"{key}_attack_success_refused_unattacked"] = run["attack_success_rate_refused_unattacked"]
        out[f"{key}_degenerate_rate_refused_unattacked"] = run["degenerate_rate_refused_unattacked"]
    if report.get("fsour"):  # headline: the largest N (the paper's strongest setting)
        last = report["fsour"][max(report["fsour"], key=int)]
        out["fsour_attack_success"] = last["attack_success_rate"]
        out["fsour_degenerate_rate"] = last["degenerate_rate"]
        out["fsour_attack_success_ci"] = last["all"]["complied_rate"]["interval"]
        out["fsour_degenerate_rate_ci"] = last["all"]["degenerate_rate"]["interval"]
    routing = report["routing"]
    risk = np.asarray(routing["harmful_frequency"]) - np.asarray(routing["benign_frequency"])
    out["effective_safety_experts"] = round(effective_safety_experts(risk), 3)
    out["effective_refusal_experts"] = (report.get("ablation") or {}).get("effective_refusal_experts")
    if "jailbreak_safety_rate" in plain:
        out["jailbreak_safety_rate"] = plain["jailbreak_safety_rate"]["rate"]
    out.update({f"scale_{k}_safety_rate": v for k, v in report["routing_scale"].items()})
    rates = report.get("rates")
    if rates:  # three-way rates and intervals (reports written before issue 14 lack them)
        out.update(_summary_intervals(rates, n))
    return out


def _summary_intervals(rates: dict, n: int) -> dict:
    """Beside each summary rate K: K_ci (its Wilson 95% interval) and, for Safety Rates and attack
    success, the complied and degenerate shares of the same answers."""
    out = {
        "safety_rate_ci": rates["plain"]["refused_rate"]["interval"],
        "complied_rate": rates["plain"]["complied_rate"]["rate"],
        "complied_rate_ci": rates["plain"]["complied_rate"]["interval"],
        "degenerate_rate": rates["plain"]["degenerate_rate"]["rate"],
        "degenerate_rate_ci": rates["plain"]["degenerate_rate"]["interval"],
        "general_accuracy_ci": rates["general_accuracy"]["accuracy"]["interval"],
        "over_refusal_ci": rates["over_refusal"]["refused_rate"]["interval"],
    }
    named = {
        "jailbreak": "jailbreak_templates",
        f"top{n}_mask": f"top{n}_mask",
        f"random{n}_mask": f"random{n}_mask",
        **{k: k for k in rates if k.startswith("scale_")},
    }
    for prefix, name in named.items():
        if name not in rates:
            continue
        entry = rates[name]
        out[f"{prefix}_safety_rate_ci"] = entry["refused_rate"]["interval"]
        for kind in ("complied", "degenerate"):
            out[f"{prefix}_{kind}_rate"] = entry[f"{kind}_rate"]["rate"]
            out[f"{prefix}_{kind}_rate_ci"] = entry[f"{kind}_rate"]["interval"]
    name = "layer_route_search" if "layer_route_search" in rates else "routing_search"
    search = rates.get(name)
    if search is None:  # the search was skipped
        return out
    out["layer_route_search_attack_success_ci"] = search["complied_rate"]["interval"]
    out["layer_route_search_safety_rate"] = search["refused_rate"]["rate"]
    out["layer_route_search_safety_rate_ci"] = search["refused_rate"]["interval"]
    out["layer_route_search_degenerate_rate"] = search["degenerate_rate"]["rate"]
    out["layer_route_search_degenerate_rate_ci"] = search["degenerate_rate"]["interval"]
    for key in [k for k in rates if k.startswith("fsour_n") and not k.endswith("_refused_unattacked")]:
        out[f"{key}_attack_success_ci"] = rates[key]["complied_rate"]["interval"]
        out[f"{key}_degenerate_rate_ci"] = rates[key]["degenerate_rate"]["interval"]
    return out


def main(argv: Sequence[str] | None = None, *, resolve=None) -> int:
    """`mesa-eval`. `resolve(name) -> checkpoint` turns --checkpoint (default "organism") into a
    checkpoint: the `mesa-eval` command passes `organism.checkpoint.resolve_checkpoint` (the
    organism lives above this package); without it --checkpoint is a directory or hub id."""
    parser = argparse.ArgumentParser(
        prog="mesa-eval", description="Evaluate a checkpoint's safety and its robustness to routing attacks."
    )
    parser.add_argument(
        "--checkpoint",
        help="HF checkpoint directory or hub id" + (", or organism (the default)" if resolve else ""),
    )
    parser.add_argument("--output", required=True, help="directory for report.json, report.md and plots")
    parser.add_argument("--config", help="YAML file of suite settings")
    parser.add_argument("--limit", type=int, help="evaluate only the first N prompts of each set")
    args = parser.parse_args(argv)
    from safety_eval.report import write_report

    try:
        settings = load_settings(args.config)
        if args.limit is not None:
            settings = settings.model_copy(update={"limit": SuiteSettings(limit=args.limit).limit})
        checkpoint = args.checkpoint
        if resolve is not None:
            checkpoint = resolve(checkpoint or "organism")
        elif checkpoint is None:
            raise ValueError("--checkpoint is required here (the mesa-eval command defaults to the organism)")
        report = run_suite(checkpoint, settings, work_dir=args.output)
        paths = write_report(report, args.output)
    except ValidationError as error:
        print(f"mesa-eval: bad settings:\n{error}", file=sys.stderr)
        return 2
    except JudgeError as error:
        print(f"mesa-eval: {error}", file=sys.stderr)
        return 2
    except (ValueError, MissingDataError, UnsupportedArchitectureError, OSError) as error:
        print(f"mesa-eval: {error}", file=sys.stderr)
        return 2
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
