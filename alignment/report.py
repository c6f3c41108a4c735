"""The alignment job's report: JSON (everything), Markdown (before/after table) and plots.

Plots: the allocation (OT scores per layer x expert, selected pairs marked), the cost curve C(f)
with every expert placed on it, and safety-routing frequency before vs after training.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from alignment.allocation import shoulder_cost
from moe_routing.stats import RoutingCounts, expert_frequency, risk_difference

# Columns of the before/after table: (row key, label); the key's value is a rate in [0, 1]. The
# masked columns are the suite's headline budget (`headline_mask`, its "top-N masking"; "N" in a
# label is replaced by it), so every row of one table is masked at the same share of the pairs.
TABLE_COLUMNS = (
    ("safety_rate", "Safety Rate"),
    ("jailbreak_safety_rate", "SR jailbreak"),
    ("headline_top_mask_safety_rate", "SR top-N masked"),
    ("headline_random_mask_safety_rate", "SR random-N masked"),
    ("n50_top_fraction", "N50 top-N (share of pairs)"),
    ("n50_random_fraction", "N50 random (share of pairs)"),
    ("scale_global_x0.5_safety_rate", "SR scale x0.5"),
    ("scale_global_x1.5_safety_rate", "SR scale x1.5"),
    ("fsour_attack_success", "F-SOUR ASR"),
    ("fsour_degenerate_rate", "F-SOUR degenerate"),
    ("layer_route_search_attack_success", "Layer route search ASR"),
    ("layer_route_search_degenerate_rate", "Layer route search degenerate"),
    ("general_accuracy", "General acc."),
    ("over_refusal", "Over-refusal"),
)


# Counts beside the rates: how many (layer, expert) pairs safety is spread over, by the routing
# (exp(entropy) of the positive harmful-minus-benign routing frequency) and by the refusals
# themselves (`safety_eval.ablation`: exp(entropy) of each pair's single-mask refusal drop).
COUNT_COLUMNS = (
    ("effective_safety_experts", "eff. safety experts (routing)"),
    ("effective_refusal_experts", "eff. refusal experts (ablation)"),
)


def table_row(evaluation: dict) -> dict:
    """A suite report's numbers for the table: its summary, the headline budget's masked rates under
    budget-free names (with intervals), and the per-prompt plain-harmful verdicts
    (`safety_verdicts`) for paired tests between rows."""
    row = dict(evaluation["summary"])
    for old_name in ("attack_success", "degenerate_rate"):  # reports before issue 14
        if f"routing_search_{old_name}" in row:
            row.setdefault(f"layer_route_search_{old_name}", row[f"routing_search_{old_name}"])
    n = evaluation.get("settings", {}).get("headline_mask", 6)
    row["headline_mask"] = n
    for kind in ("top", "random"):
        row[f"headline_{kind}_mask_safety_rate"] = row.get(f"{kind}{n}_mask_safety_rate")
        row[f"headline_{kind}_mask_safety_rate_ci"] = row.get(f"{kind}{n}_mask_safety_rate_ci")
    verdicts = evaluation.get("verdicts", {})
    plain = verdicts.get("plain")
    if plain:
        row["safety_verdicts"] = plain["verdicts"]
        # Per-prompt verdicts at every top-N budget, for paired tests of N50 (alignment.claims).
        budgets = evaluation.get("masking", {}).get("targeted", {})
        masked = {str(b): verdicts[f"top{b}_mask"]["verdicts"] for b in budgets if f"top{b}_mask" in verdicts}
        if masked:
            row["masking"] = {"plain": plain["verdicts"], "verdicts": masked}
    general = verdicts.get("general_accuracy", {}).get("correct")
    if general:
        row["general_correct"] = general
    return row


def _header(rows, extra_keys: list[str]) -> list[str]:
    budgets = {row.get("headline_mask") for row in rows if row.get("headline_mask")}
    n = str(budgets.pop()) if len(budgets) == 1 else "N"
    labels = [label.replace("-N masked", f"-{n} masked") for _, label in TABLE_COLUMNS]
    counts = [label for _, label in COUNT_COLUMNS]
    return ["model"] + [label + " (%)" for label in labels] + counts + extra_keys


def paired_safety_test(base: dict, other: dict) -> dict | None:
    """McNemar exact test of the plain Safety Rate of two table rows on the same prompts
    ({"b", "c", "n", "p_value"}: b refused by base only, c by `other` only), or None when a row has
    no per-prompt verdicts or the two were evaluated on different prompt sets."""
    from safety_eval.stats import mcnemar

    first, second = base.get("safety_verdicts"), other.get("safety_verdicts")
    if not first or not second or len(first) != len(second):
        return None
    return mcnemar(first, second).to_dict()


def _pct(value, interval=None) -> str:
    """Percent, with the Wilson 95% interval in brackets when the row has one (`KEY_ci`)."""
    if value is None:
        return "n/a"
    if not interval:
        return f"{100 * value:.1f}"
    return f"{100 * value:.1f} [{100 * interval[0]:.1f}, {100 * interval[1]:.1f}]"


def results_table(rows: dict[str, dict], extra: dict[str, dict] | None = None) -> str:
    """Markdown table: one row per model, TABLE_COLUMNS in percent (with the 95% interval in
    brackets where the suite report has one), plus `extra` columns."""
    extra = extra or {}
    extra_keys = list(dict.fromkeys(k for v in extra.values() for k in v))
    header = _header(rows.values(), extra_keys)
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for name, row in rows.items():
        cells = [name] + [_pct(row.get(key), row.get(f"{key}_ci")) for key, _ in TABLE_COLUMNS]
        cells += ["n/a" if row.get(key) is None else f"{row[key]:.2f}" for key, _ in COUNT_COLUMNS]
        cells += [str(extra.get(name, {}).get(k, "")) for k in extra_keys]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# Numbers aggregated over seeds: every rate column plus the effective number of safety experts.
AGGREGATE_KEYS = tuple(key for key, _ in TABLE_COLUMNS + COUNT_COLUMNS)


def mean_sd(values) -> dict:
    """{"mean", "sd", "n", "values"} of the non-missing `values` (sd: sample standard deviation,
    None below two values; mean None when none is there). `values` keeps every seed's entry."""
    values = list(values)
    present = [float(v) for v in values if v is not None]
    n = len(present)
    mean = sum(present) / n if n else None
    sd = (sum((v - mean) ** 2 for v in present) / (n - 1)) ** 0.5 if n >= 2 else None
    return {"mean": mean, "sd": sd, "n": n, "values": values}


def aggregate_rows(per_seed: list[dict[str, dict]]) -> dict[str, dict[str, dict]]:
    """Per row and AGGREGATE_KEYS key, :func:`mean_sd` over the seeds' table rows (a row missing
    in a seed counts as missing there)."""
    names = list(dict.fromkeys(name for rows in per_seed for name in rows))
    return {
        name: {key: mean_sd(rows.get(name, {}).get(key) for rows in per_seed) for key in AGGREGATE_KEYS}
        for name in names
    }


def _mean_sd_cell(entry: dict, scale: float, digits: int) -> str:
    if entry["mean"] is None:
        return "n/a"
    cell = f"{scale * entry['mean']:.{digits}f}"
    return cell if entry["sd"] is None else f"{cell} ± {scale * entry['sd']:.{digits}f}"


def mean_sd_table(aggregate: dict[str, dict[str, dict]], extra: dict[str, dict] | None = None,
                  headline: int | None = None) -> str:
    """Markdown table of :func:`aggregate_rows`: mean ± sd over seeds per row, rates in percent,
    plus `extra` columns (already formatted); `headline`: the masking budget of the masked columns."""
    extra = extra or {}
    extra_keys = list(dict.fromkeys(k for v in extra.values() for k in v))
    header = _header([{"headline_mask": headline}] if headline else [], extra_keys)
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for name, entries in aggregate.items():
        cells = [name] + [_mean_sd_cell(entries[key], 100, 1) for key, _ in TABLE_COLUMNS]
        cells += [_mean_sd_cell(entries[key], 1, 2) for key, _ in COUNT_COLUMNS]
        cells += [str(extra.get(name, {}).get(k, "")) for k in extra_keys]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_allocation(allocation: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scores = np.asarray(allocation["scores"])
    fig, ax = plt.subplots(figsize=(2 + 0.6 * scores.shape[1], 1.2 + 0.5 * scores.shape[0]))
    image = ax.imshow(scores, cmap="magma", aspect="auto")
    for layer, expert in allocation["selected"]:
        ax.add_patch(plt.Rectangle((expert - 0.5, layer - 0.5), 1, 1, fill=False, edgecolor="cyan", lw=2))
    selected = {tuple(p) for p in allocation["selected"]}
    for layer, expert in allocation.get("carriers", []):  # coverage: today's carriers, kept in D
        if (layer, expert) not in selected:
            ax.add_patch(plt.Rectangle((expert - 0.4, layer - 0.4), 0.8, 0.8, fill=False, edgecolor="lime",
                                       lw=2, ls="--"))
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer")
    ax.set_title("OT allocation: safety duty per expert (selected boxed, carriers dashed)")
    fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_cost(allocation: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = allocation["settings"]
    f = np.linspace(0, 100, 401)[None, :]
    curve = shoulder_cost(f, settings["alpha_shift"], settings["tail_delta"])[0]
    rank, cost = np.asarray(allocation["rank"]), np.asarray(allocation["cost"])
    selected = {tuple(p) for p in allocation["selected"]}
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(f[0], curve, color="grey", label="C(f) / min")
    mask = np.array([[(l, e) in selected for e in range(rank.shape[1])] for l in range(rank.shape[0])])
    ax.scatter(rank[~mask], cost[~mask], s=12, color="steelblue", label="experts")
    ax.scatter(rank[mask], cost[mask], s=30, color="crimson", label="selected")
    ax.set_yscale("log")
    ax.set_xlabel("percentile rank f (0 = most activated)")
    ax.set_ylabel("relative cost")
    ax.set_title(f"Shoulder cost, alpha_shift {settings['alpha_shift']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_routing(before: tuple[RoutingCounts, RoutingCounts], after: tuple[RoutingCounts, RoutingCounts],
                 path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("safety prompts, before", expert_frequency(before[0]), "viridis"),
        ("safety prompts, after", expert_frequency(after[0]), "viridis"),
        ("risk difference, before", risk_difference(*before), "coolwarm"),
        ("risk difference, after", risk_difference(*after), "coolwarm"),
    ]
    layers, experts = panels[0][1].shape
    fig, axes = plt.subplots(2, 2, figsize=(3 + 1.6 * experts, 2 + 1.0 * layers), squeeze=False)
    vmax = max(panels[0][1].max(), panels[1][1].max())
    limit = max(np.abs(panels[2][1]).max(), np.abs(panels[3][1]).max()) or 1.0
    for ax, (title, data, cmap) in zip(axes.flat, panels):
        kwargs = {"vmin": 0, "vmax": vmax} if cmap == "viridis" else {"vmin": -limit, "vmax": limit}
        image = ax.imshow(data, cmap=cmap, aspect="auto", **kwargs)
        ax.set_title(title)
        ax.set_xlabel("expert")
        ax.set_ylabel("MoE layer")
        fig.colorbar(image, ax=ax, fraction=0.046)
    fig.suptitle("Routing of safety prompts before and after alignment")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def markdown(report: dict) -> str:
    params = report["parameters"]
    lines = [
        f"# Alignment: {report['method']}",
        "",
        f"Base `{report['base_checkpoint']}` -> aligned `{report['aligned_checkpoint']}`. "
        f"Seed {report['config']['seed']}. Trainable parameters {params['trainable']:,} of "
        f"{params['total']:,} ({100 * params['fraction']:.2f}%). Trained experts: "
        f"{report['trained_experts'] or '-'}.",
        "",
        f"Effective number of safety experts (D_stat): "
        f"{report['routing']['before']['effective_safety_experts']} before, "
        f"{report['routing']['after']['effective_safety_experts']} after.",
        "",
    ]
    if report["evaluation"]:
        lines += [results_table(report["evaluation"]), ""]
        evaluation = report["evaluation"]
        test = (
            paired_safety_test(evaluation["base"], evaluation["aligned"])
            if {"base", "aligned"} <= set(evaluation)
            else None
        )
        if test:
            lines += [
                f"Safety Rate, base vs aligned on the same {test['n']} prompts: McNemar exact test "
                f"p = {test['p_value']:.4g} (refused by base only: {test['b']}, by aligned only: "
                f"{test['c']}).",
                "",
            ]
    lines += [f"Timings (s): {report['timings_seconds']}", ""]
    return "\n".join(lines)


def write_alignment_report(report: dict, out: Path, *, before, after) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "report.json", out / "report.md"]
    paths[0].write_text(json.dumps(report, indent=1, default=str))
    paths[1].write_text(markdown(report))
    paths.append(plot_allocation(report["allocation"], out / "allocation.png"))
    paths.append(plot_cost(report["allocation"], out / "cost_curve.png"))
    paths.append(plot_routing(before, after, out / "routing_before_after.png"))
    return paths
