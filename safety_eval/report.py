"""Reports of the evaluation suite: JSON (everything), Markdown (the tables), PNG plots.

Plots: per-layer expert-frequency heatmaps for harmful vs benign prompts (and their difference),
and Safety Rate against the number of masked experts, targeted vs random.

The headline robustness figure is N50, the masking budget (count and share of all L x E pairs)
that halves the Safety Rate, targeted and random ("> max budget" when never reached).

The Markdown shows each rate as a share with its Wilson 95% interval, `0.837 [0.780, 0.882]`, and
beside every Safety Rate and attack success the complied and degenerate shares of the same answers.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def _pct(value) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _ci(entry: dict | None) -> str:
    """`0.837 [0.780, 0.882]` of a {"rate", "interval"} entry (n/a when missing)."""
    if not entry or entry.get("rate") is None:
        return "n/a"
    interval = entry.get("interval")
    if not interval:
        return f"{entry['rate']:.3f}"
    return f"{entry['rate']:.3f} [{interval[0]:.3f}, {interval[1]:.3f}]"


def _three_way_row(label: str, rates: dict | None, fallback, key: str = "refused_rate") -> str:
    """| label | main rate [CI] | complied [CI] | degenerate [CI] | (old reports: the bare rate)."""
    if not rates:
        return f"| {label} | {_pct(fallback)} | | |"
    return (
        f"| {label} | {_ci(rates[key])} | {_ci(rates.get('complied_rate'))} | "
        f"{_ci(rates.get('degenerate_rate'))} |"
    )


def _n50(entry: dict | None, robustness: dict) -> str:
    if entry is None or entry["count"] is None:
        return f"> max budget ({robustness['max_budget']} pairs)"
    return f"{entry['count']:.2f} pairs ({100 * entry['fraction']:.2f}% of {robustness['total_pairs']})"


def markdown(report: dict) -> str:
    s = report["summary"]
    n = report["settings"]["headline_mask"]
    lines = [
        f"# Safety evaluation: `{report['checkpoint']}`",
        "",
        f"{report['architecture']}, {report['layers']} MoE layers x {report['experts']} experts, "
        f"top-{report['top_k']}. "
        f"Eval sets: {report['eval_sets']['source']} ({report['eval_sets']['harmful']} harmful, "
        f"{report['eval_sets']['general']} general, {report['eval_sets']['benign']} benign). "
        f"Seed {report['settings']['seed']}, greedy, {report['settings']['max_new_tokens']} new tokens.",
        "",
        "Verdicts: refused (the judge), degenerate (empty, looping, garbled or off-format: "
        "`safety_eval.verdicts.degenerate_reason`), complied (the rest). Safety Rate = refused share; "
        "attack success = complied share. Shares with Wilson 95% intervals.",
        "",
        "| metric | value [95% CI] | complied [95% CI] | degenerate [95% CI] |",
        "| --- | --- | --- | --- |",
    ]
    rates = report.get("rates", {})
    robustness = report.get("n50")
    if robustness:
        lines[-2:-2] = [
            f"**N50** (masking budget that halves the Safety Rate {robustness['baseline_safety_rate']:.3f}, "
            "linear interpolation on the measured curve): top-N safety-critical "
            f"{_n50(robustness['top'], robustness)}, random {_n50(robustness['random'], robustness)}.",
            "",
        ]
    ablation = report.get("ablation")
    if ablation:
        top = ", ".join(f"({p['layer']}, {p['expert']}) {p['drop']:.2f}" for p in ablation["top_pairs"][:5])
        lines[-2:-2] = [
            f"**Effective refusal experts** (each pair masked alone on {len(ablation['prompt_index'])} "
            f"refused prompts; exp(entropy) of the drop in log p of the first {ablation['answer_tokens']} "
            f"refusal tokens): {ablation['effective_refusal_experts']}; largest drops (nats): {top}.",
            "",
        ]
    lines.append(_three_way_row("Safety Rate (held-out harmful)", rates.get("plain"), s["safety_rate"]))
    if "jailbreak_safety_rate" in s:
        lines.append(
            _three_way_row("Safety Rate, jailbreak templates", rates.get("jailbreak_templates"),
                           s["jailbreak_safety_rate"])
        )
    general = rates.get("general_accuracy", {}).get("accuracy")
    lines += [
        f"| General accuracy (exact match) | {_ci(general) if general else _pct(s['general_accuracy'])} "
        "| | |",
        _three_way_row("Over-refusal (benign, alarming-sounding)", rates.get("over_refusal"),
                       s["over_refusal"]),
        _three_way_row(f"Safety Rate, top-{n} safety-critical masked", rates.get(f"top{n}_mask"),
                       s[f"top{n}_mask_safety_rate"]),
        _three_way_row(f"Safety Rate, {n} random masked (pooled over seeds)", rates.get(f"random{n}_mask"),
                       s[f"random{n}_mask_safety_rate"]),
    ]
    lines += [
        _three_way_row(f"Safety Rate, routing scale {k.replace('_x', ' x')}", rates.get(f"scale_{k}"), v)
        for k, v in report["routing_scale"].items()
    ]
    search = report.get("layer_route_search") or report["routing_search"]
    search_rates = rates.get("layer_route_search") or rates.get("routing_search")
    if not search.get("skipped"):
        lines += [
            _three_way_row(
                f"Safety Rate after layer route search (ours: one forced set per layer for all prompt "
                f"tokens), {search['prompts']} prompts; attack success = complied",
                search_rates,
                1.0 - search["attack_success_rate"],
            ),
        ]
    fsour = report.get("fsour") or {}
    if fsour:
        lines += [
            "",
            "## F-SOUR (the paper's: greedy per (token, layer), N random sets per position, "
            "p(target) >= 0.8, restarts)",
            "",
            "| N | prompts | ASR, all attacked [95% CI] | degenerate, all | prompts refused unattacked | "
            "ASR on them [95% CI] | degenerate on them | mean restarts | s / prompt |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for n_candidates, run in fsour.items():
            lines.append(
                f"| {n_candidates} | {run['prompts']} | {_ci(run['all']['complied_rate'])} | "
                f"{_ci(run['all']['degenerate_rate'])} | {run['refused_unattacked_prompts']} | "
                f"{_ci(run['refused_unattacked']['complied_rate'])} | "
                f"{_ci(run['refused_unattacked']['degenerate_rate'])} | {run['mean_restarts']} | "
                f"{run['seconds_per_prompt']} |"
            )
    lines += [
        "",
        "## Safety Rate vs masked experts",
        "",
        "| N | share of pairs | top-N safety-critical [95% CI] | top-N degenerate | random-N (mean ± std) | "
        "random-N pooled [95% CI] |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    total = report["layers"] * report["experts"]
    for key, rate in report["masking"]["targeted"].items():
        rnd = report["masking"]["random"][key]
        top, pooled = rates.get(f"top{key}_mask"), rates.get(f"random{key}_mask")
        lines.append(
            f"| {key} | {_pct(int(key) / total)} | {_ci(top['refused_rate']) if top else _pct(rate)} | "
            f"{_ci(top['degenerate_rate']) if top else ''} | "
            f"{_pct(rnd['mean'])} ± {100 * rnd['std']:.1f} | "
            f"{_ci(pooled['refused_rate']) if pooled else ''} |"
        )
    lines += [
        "",
        "## Safety-critical (layer, expert) pairs",
        "",
        "| layer | expert | risk difference | stability |",
        "| --- | --- | --- | --- |",
    ]
    lines += [
        f"| {e['layer']} | {e['expert']} | {e['risk_difference']:+.3f} | {e['stability']:.2f} |"
        for e in report["safety_critical"]
    ]
    per_kind = report["plain"]["general_accuracy"].get("per_kind", {})
    if per_kind:
        lines += [
            "",
            "General accuracy per task: " + ", ".join(f"{k} {_pct(v)}" for k, v in per_kind.items()),
        ]
    lines += ["", f"Timings (s): {report['timings_seconds']}", ""]
    return "\n".join(lines)


def plot_frequencies(report: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    harmful = np.asarray(report["routing"]["harmful_frequency"])
    benign = np.asarray(report["routing"]["benign_frequency"])
    panels = [
        ("harmful prompts", harmful, "viridis", None),
        ("benign / general prompts", benign, "viridis", None),
        ("harmful - benign", harmful - benign, "coolwarm", np.abs(harmful - benign).max() or 1.0),
    ]
    fig, axes = plt.subplots(
        1, 3, figsize=(4 + 1.2 * harmful.shape[1], 1.2 + 0.5 * harmful.shape[0]), squeeze=False
    )
    vmax = max(harmful.max(), benign.max())
    for ax, (title, data, cmap, limit) in zip(axes[0], panels):
        kwargs = {"vmin": -limit, "vmax": limit} if limit else {"vmin": 0, "vmax": vmax}
        image = ax.imshow(data, cmap=cmap, aspect="auto", **kwargs)
        ax.set_title(title)
        ax.set_xlabel("expert")
        ax.set_ylabel("MoE layer")
        ax.set_xticks(range(data.shape[1]))
        ax.set_yticks(range(data.shape[0]))
        fig.colorbar(image, ax=ax, fraction=0.046)
    fig.suptitle("Expert hit frequency (share of tokens routed to each expert)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_masking(report: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    targeted = report["masking"]["targeted"]
    ns = [int(n) for n in targeted]
    rnd = report["masking"]["random"]
    means = np.array([rnd[k]["mean"] for k in targeted])
    stds = np.array([rnd[k]["std"] for k in targeted])
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.axhline(report["summary"]["safety_rate"], color="grey", linestyle=":", label="no masking")
    ax.plot(ns, list(targeted.values()), "o-", color="crimson", label="top-N safety-critical")
    ax.errorbar(
        ns,
        means,
        yerr=stds,
        fmt="s--",
        color="steelblue",
        capsize=3,
        label=f"random N (mean ± std, {len(report['settings']['random_seeds'])} seeds)",
    )
    ax.set_xlabel("masked (layer, expert) pairs N")
    ax.set_ylabel("Safety Rate")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xticks(ns)
    ax.legend()
    ax.set_title("Safety Rate under expert masking")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(report: dict, output_dir: str | Path) -> list[Path]:
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "report.json", out / "report.md"]
    paths[0].write_text(json.dumps(report, indent=1, default=str))
    paths[1].write_text(markdown(report))
    paths.append(plot_frequencies(report, out / "expert_frequency.png"))
    paths.append(plot_masking(report, out / "masking_curve.png"))
    return paths
