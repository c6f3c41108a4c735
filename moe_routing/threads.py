"""Torch's process-wide CPU settings, changed for one block of work and restored after it.

Thread count and deterministic algorithms are global to the process, so a library call that needs
its own (an organism build, an evaluation beside other jobs) must hand the caller's back."""

from __future__ import annotations

import os
from contextlib import contextmanager


def cpu_cores() -> int:
    """The cores this process may run on (its CPU affinity, which containers and `taskset` narrow),
    not every core of the machine."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity call on this platform (macOS)
        return os.cpu_count() or 1


def shared_threads(sharers: int) -> int:
    """Torch threads for one of `sharers` jobs that run side by side on this process's cores: more
    threads than cores spin instead of working."""
    return max(1, cpu_cores() // max(1, sharers))


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
