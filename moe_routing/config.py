"""YAML config files into pydantic models: one loader for every command's settings."""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

import yaml
from pydantic import BaseModel

Model = TypeVar("Model", bound=BaseModel)


def load_yaml_config(
    model: type[Model], path: str | Path | None, what: str, *, defaults: dict | None = None, **overrides
) -> Model:
    """`model` from a YAML mapping (or defaults when `path` is None), with `overrides` on top.
    `defaults` (e.g. a named preset) sit below the file's keys.

    A missing file or a non-mapping raises ValueError naming the file; unknown keys and bad
    values raise pydantic's ValidationError naming the key (the models forbid extra keys)."""
    data = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"{what} not found: {path}")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping of {what} keys")
    return model.model_validate((defaults or {}) | data | overrides)
