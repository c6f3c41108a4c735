"""Organism build time: the `fine` preset against `coarse`, same seed, in one run.

Each preset is built twice from scratch into a temporary directory (no cache), alternating the
order, with the same torch thread count; the report gives each median, their ratio (the figure to
compare across machines, which differ by 15% or more run to run) and the weight hashes of both
builds of a preset (equal: the build is deterministic on this machine). Target: fine <= 6 minutes
on the 2-core CI machine.

    .venv/bin/python benchmarks/organism_build.py [--seed 0 --rounds 2 --threads 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from organism.build import build_organism, preset_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    seconds: dict[str, list[float]] = {"coarse": [], "fine": []}
    hashes: dict[str, set[str]] = {"coarse": set(), "fine": set()}
    with tempfile.TemporaryDirectory() as scratch:
        for round_ in range(args.rounds):
            order = ["coarse", "fine"] if round_ % 2 == 0 else ["fine", "coarse"]
            for preset in order:
                config = preset_config(preset, seed=args.seed, threads=args.threads)
                started = time.perf_counter()
                path = build_organism(config, Path(scratch) / f"{preset}-{round_}", log=lambda *_: None)
                seconds[preset].append(time.perf_counter() - started)
                hashes[preset].add(json.loads((path / "organism.json").read_text())["weights_sha256"])
                print(f"  round {round_}: {preset} {seconds[preset][-1]:.0f} s", flush=True)
    coarse, fine = statistics.median(seconds["coarse"]), statistics.median(seconds["fine"])
    print(f"organism build, seed {args.seed}, {args.threads} threads, median of {args.rounds} rounds:")
    print(f"  coarse: {coarse:7.1f} s")
    print(f"  fine  : {fine:7.1f} s ({fine / 60:.1f} min)")
    print(f"  fine / coarse time ratio: {fine / coarse:.2f}")
    for preset, seen in hashes.items():
        verdict = "deterministic" if len(seen) == 1 else "NOT deterministic"
        print(f"  {preset}: {verdict} ({len(seen)} weight hashes)")


if __name__ == "__main__":
    main()
