"""Where a checkpoint name points: a local Hugging Face directory or a hub id (no torch import).

The rules, the same for every command (the organism's name, ``organism``, is resolved one layer
up, in :mod:`organism.checkpoint`):

- an existing path must be a checkpoint directory (it holds ``config.json``); it resolves to its
  absolute path;
- a missing path (it starts with ``.``, ``/`` or ``~``, or has more than one ``/``) is an error;
- anything else is a hub id, passed on unchanged.
"""

from __future__ import annotations

from pathlib import Path


def locate_checkpoint(name: str | Path) -> str:
    """The absolute directory or the hub id `name` names; ValueError for a missing directory or a
    directory that is not a Hugging Face checkpoint."""
    text = str(name)
    path = Path(text).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ValueError(f"{text} is not a Hugging Face checkpoint directory (no config.json)")
        return str(path.resolve())
    if text.startswith((".", "/", "~")) or text.count("/") > 1:
        raise ValueError(f"checkpoint directory not found: {text}")
    return text


def check_architecture(target: str) -> None:
    """Fail before any weight is loaded when `target`'s architecture is not supported
    (:class:`moe_routing.architectures.UnsupportedArchitectureError`), or ValueError when its
    config cannot be read (for a hub id: offline, unknown, gated)."""
    from transformers import AutoConfig

    from moe_routing.architectures import check_supported

    try:
        config = AutoConfig.from_pretrained(target)
    except OSError as error:
        raise ValueError(f"cannot read the checkpoint config of {target!r} ({error})") from None
    check_supported(config)
