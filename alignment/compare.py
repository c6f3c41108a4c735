"""The results table: base vs every alignment method, same data, same budget, one command.

    python -m alignment.compare --config alignment/configs/organism.yaml --output runs/compare

Runs the alignment job once per method (``training.method`` replaced, everything else as in the
config), evaluates the base checkpoint once, and writes `results.md` / `results.json`: Safety
Rate plain, under jailbreak templates, top-4/6/8 masking re-identified on each model, random
masking and routing scale; F-SOUR-style attack success; general accuracy; over-refusal;
trainable parameters; training wall time; effective number of safety experts. Each method's
directory keeps its full report, so a re-run resumes where it stopped.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from alignment.config import AlignmentConfig, load_config

METHODS = ("sft_all", "router_only", "safex", "lora", "mesa")
AUGMENTED = "+mask"  # row suffix: the method with masking augmentation (training.mask_augmentation)


def row_config(config: AlignmentConfig, row: str, output: Path, mask_augmentation: float) -> AlignmentConfig:
    """The config of one row: `config` with the row's method (and augmentation) and directory."""
    data = config.model_dump()
    method = row.removesuffix(AUGMENTED)
    data["training"]["method"] = method
    data["training"]["mask_augmentation"] = mask_augmentation if row.endswith(AUGMENTED) else 0.0
    data["output_dir"] = str(output / row.replace(AUGMENTED, "-mask"))
    data["evaluation"]["base"] = False
    return AlignmentConfig.model_validate(data)


def compare(config: AlignmentConfig, output: Path, methods=METHODS, mask_augmentation: float = 0.5) -> dict:
    from alignment.report import paired_safety_test, results_table, table_row
    from alignment.run import evaluate_checkpoint, log, resolve_model
    from alignment.run import run as run_alignment

    checkpoint = resolve_model(config)
    base = evaluate_checkpoint(checkpoint, config, output / "base")
    rows = {"base": table_row(base)}
    extra = {"base": {"trainable params": 0, "train s": 0}}
    reports = {}
    for method in methods:
        log(f"\n[compare] === {method} ===")
        report = run_alignment(row_config(config, method, output, mask_augmentation))
        reports[method] = report
        rows[method] = report["evaluation"]["aligned"]
        params = report["parameters"]
        extra[method] = {
            "trainable params": f"{params['trainable']:,} ({100 * params['fraction']:.1f}%)",
            "train s": (report["training"]["final"] or {}).get("seconds"),
        }
    for method in methods:  # paired test of each row's plain Safety Rate against base's
        test = paired_safety_test(rows["base"], rows[method])
        extra[method]["McNemar p (SR vs base)"] = "" if test is None else f"{test['p_value']:.3g}"
    table = results_table(rows, extra)
    notes = [
        f"Model `{checkpoint}`; seed {config.seed}; config: same for every row except "
        f"training.method, and training.mask_augmentation = {mask_augmentation} on the {AUGMENTED} rows "
        "(0 elsewhere). 'train s' = seconds of the training loop on the configured workers. "
        "Masking re-identifies the safety-critical experts on each model; "
        "random masking is the mean over the suite's seeds. 'eff. safety experts' = exp(entropy) "
        "of the positive harmful-minus-benign routing difference over all (layer, expert) pairs. "
        "Brackets: Wilson 95% intervals. 'F-SOUR ASR' counts complied answers only; 'F-SOUR "
        "degenerate' the empty, looping or garbled ones. 'McNemar p': exact McNemar test of the plain "
        "Safety Rate against base on the same prompts.",
    ]
    (output / "results.md").write_text("# Alignment results\n\n" + table + "\n\n" + "\n".join(notes) + "\n")
    results = {"rows": rows, "extra": extra, "config": config.model_dump(), "checkpoint": checkpoint}
    (output / "results.json").write_text(json.dumps(results, indent=1, default=str))
    log("\n" + table)
    log(f"\n[compare] wrote {output / 'results.md'}")
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="base vs alignment methods on one model (results table)")
    parser.add_argument("--config", help="YAML alignment config (the method is replaced per row)")
    parser.add_argument("--output", default="runs/compare", help="output directory")
    parser.add_argument("--methods", default=",".join(METHODS),
                        help=f"comma-separated rows (default {','.join(METHODS)}); a method with the "
                        f"suffix {AUGMENTED} trains with masking augmentation")
    parser.add_argument("--mask-augmentation", type=float, default=0.5,
                        help="training.mask_augmentation of the +mask rows (default 0.5)")
    args = parser.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = {m for m in methods if m.removesuffix(AUGMENTED) not in METHODS}
    if unknown or not methods:
        parser.error(f"unknown methods {sorted(unknown)}; choose from {', '.join(METHODS)}")
    from alignment.run import explain_errors

    if not 0 < args.mask_augmentation <= 1:
        parser.error("--mask-augmentation must be in (0, 1]")
    return explain_errors(lambda: compare(load_config(args.config), Path(args.output).resolve(), methods,
                                          args.mask_augmentation))


if __name__ == "__main__":
    sys.exit(main())
