"""Torch's process-wide CPU settings, changed for one block of work and restored after it.

Thread count and deterministic algorithms are global to the process, so a library call that needs
its own (an organism build, an evaluation beside other jobs) must hand the caller's back."""

from __future__ import annotations

from contextlib import contextmanager


@contextmanager
def torch_settings(threads: int | None = None, *, deterministic: bool | None = None):
    """Run the block with `threads` intra-op threads (None: keep the current count) and, when
    `deterministic` is given, with torch's deterministic algorithms switched to it; the caller's
    settings (warn-only mode included) come back afterwards, also on error."""
    import torch

    previous_threads = torch.get_num_threads()
    previous_deterministic = (torch.are_deterministic_algorithms_enabled(),
                              torch.is_deterministic_algorithms_warn_only_enabled())
    try:
        if threads:
            torch.set_num_threads(threads)
        if deterministic is not None:
            torch.use_deterministic_algorithms(deterministic)
        yield
    finally:
        torch.set_num_threads(previous_threads)
        torch.use_deterministic_algorithms(previous_deterministic[0], warn_only=previous_deterministic[1])
