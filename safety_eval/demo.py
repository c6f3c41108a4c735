"""`make demo`: safety sparsity on the model organism, measured end to end.

1. builds the model organism if it is not cached yet (a few minutes, once);
2. profiles its routing on harmful vs benign prompts with Ray workers (local cluster unless
   RAY_ADDRESS is set) and ranks the safety-critical (layer, expert) pairs;
3. runs the evaluation suite: Safety Rate, jailbreak templates, general accuracy, over-refusal,
   top-N vs random-N expert masking, routing scale, F-SOUR-style routing search;
4. shows which experts MESA's optimal-transport allocation would give safety duty to;
5. writes runs/demo/report.{json,md} and plots, and prints the tables.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from alignment.allocation import allocate
from moe_routing.profiler import ProfileSettings, profile_routing_ray
from organism.build import ensure_organism
from safety_eval.attacks import SafetyProfile
from safety_eval.harness import EvalSets
from safety_eval.report import markdown, write_report
from safety_eval.suite import SuiteSettings, identification_prompts, load_settings, run_suite


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/demo", help="output directory (default runs/demo)")
    parser.add_argument("--workers", type=int, default=2, help="Ray profiling workers (default 2)")
    parser.add_argument("--config", help="YAML file of evaluation suite settings")
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error("--workers must be >= 1")
    try:
        settings = load_settings(args.config) if args.config else SuiteSettings()
    except ValueError as error:
        parser.error(str(error))
    started = time.monotonic()
    checkpoint = ensure_organism()

    print(f"\n[demo] profiling routing of harmful vs benign prompts on {args.workers} Ray workers ...")
    harmful, benign = identification_prompts(
        settings, EvalSets.for_checkpoint(checkpoint, seed=settings.seed)
    )
    profile_settings = ProfileSettings(batch_size=32)
    profile = SafetyProfile(
        profile_routing_ray(checkpoint, harmful, profile_settings, num_workers=args.workers),
        profile_routing_ray(checkpoint, benign, profile_settings, num_workers=args.workers),
    )
    print(f"[demo] {profile.harmful.num_tokens + profile.benign.num_tokens} tokens profiled")

    print("[demo] evaluation suite ...")
    report = run_suite(checkpoint, settings, profile=profile)
    allocation = allocate(profile.harmful, profile.benign)
    report["allocation"] = allocation.to_dict()
    paths = write_report(report, Path(args.out))
    print("\n" + markdown(report))
    critical = [(s["layer"], s["expert"]) for s in report["safety_critical"][: settings.headline_mask]]
    print(
        f"Safety duty today sits on {critical}; MESA's allocation (alpha_shift "
        f"{allocation.settings.alpha_shift}, eps {allocation.settings.eps}) would train "
        f"{allocation.selected}; run it: python alignment/run.py --config alignment/configs/organism.yaml\n"
    )
    print(f"[demo] done in {time.monotonic() - started:.0f} s; wrote:")
    for path in paths:
        print(f"  {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
