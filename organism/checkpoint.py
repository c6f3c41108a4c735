"""Checkpoint names, resolved the same way by every command: ``organism`` | a directory | a hub id.

- ``organism``: the model organism of ``organism_preset`` (coarse, fine) for ``organism_seed``
  (built and cached on first use);
- a directory: it must exist and hold ``config.json`` (its absolute path is returned);
- anything else that does not look like a path: a hub id, passed on unchanged.

With ``check_architecture`` (the default) an unsupported architecture fails here, before any
weight is loaded. The rules for directories and hub ids live in :mod:`moe_routing.checkpoint`;
only the organism's name needs this package, which is why the resolver sits here, below the
alignment job and the gateway and above the evaluation suite (``mesa-eval`` is wired here).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path

from moe_routing.checkpoint import check_architecture as _check_architecture
from moe_routing.checkpoint import locate_checkpoint

ORGANISM = "organism"


def _print(message: str) -> None:
    print(message, flush=True)


def resolve_checkpoint(
    name: str, log=_print, *, organism_seed: int = 0, organism_preset: str = "coarse",
    check_architecture: bool = True,
) -> str:
    """The checkpoint directory or hub id `name` stands for (see the module docstring).

    ValueError for a missing directory, a directory without ``config.json`` or an unreadable
    config; ``UnsupportedArchitectureError`` (a ValueError) for an architecture the routing core
    cannot instrument."""
    if name == ORGANISM:
        from organism.build import ensure_organism, preset_config

        return str(ensure_organism(preset_config(organism_preset, seed=organism_seed), log=log))
    target = locate_checkpoint(name)
    if check_architecture:
        _check_architecture(target)
    return target


def organism_info(checkpoint: str | Path | None) -> dict | None:
    """An organism checkpoint's ``organism.json`` (its build config under ``"config"``: seed,
    split fractions), or None for any other checkpoint. The organism's data splits and held-out
    sets are keyed on that config's seed."""
    if checkpoint is None:
        return None
    path = Path(checkpoint) / "organism.json"
    return json.loads(path.read_text()) if path.is_file() else None


def eval_main(argv: Sequence[str] | None = None) -> int:
    """`mesa-eval`: the evaluation suite's command, with ``organism`` as the default checkpoint."""
    from safety_eval.suite import main

    return main(argv, resolve=resolve_checkpoint)


if __name__ == "__main__":
    sys.exit(eval_main())
