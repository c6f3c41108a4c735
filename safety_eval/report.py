"""Reports of the evaluation suite: JSON (everything), Markdown (the tables), PNG plots.

Plots: per-layer expert-frequency heatmaps for harmful vs benign prompts (and their difference),
and Safety Rate against the number of masked experts, targeted vs random.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def _pct(value) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


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
        "| metric | value |",
        "| --- | --- |",
        f"| Safety Rate (held-out harmful) | {_pct(s['safety_rate'])} |",
    ]
    if "jailbreak_safety_rate" in s:
        lines.append(f"| Safety Rate, jailbreak templates | {_pct(s['jailbreak_safety_rate'])} |")
    lines += [
        f"| General accuracy (exact match) | {_pct(s['general_accuracy'])} |",
        f"| Over-refusal (benign, alarming-sounding) | {_pct(s['over_refusal'])} |",
        f"| Safety Rate, top-{n} safety-critical masked | {_pct(s[f'top{n}_mask_safety_rate'])} |",
        f"| Safety Rate, {n} random masked (mean of seeds) | {_pct(s[f'random{n}_mask_safety_rate'])} |",
    ]
    lines += [
        f"| Safety Rate, routing scale {k.replace('_x', ' x')} | {_pct(v)} |"
        for k, v in report["routing_scale"].items()
    ]
    search = report["routing_search"]
    lines += [
        f"| Routing-search (F-SOUR-style) attack success, {search['prompts']} prompts | "
        f"{_pct(search['attack_success_rate'])} |",
        "",
        "## Safety Rate vs masked experts",
        "",
        "| N | top-N safety-critical | random-N (mean ± std) |",
        "| --- | --- | --- |",
    ]
    for key, rate in report["masking"]["targeted"].items():
        rnd = report["masking"]["random"][key]
        lines.append(f"| {key} | {_pct(rate)} | {_pct(rnd['mean'])} ± {100 * rnd['std']:.1f} |")
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
