"""Where a model runs: the device names settings accept, and what ``auto`` means.

One definition for every place that loads a model from a setting (the evaluation suite, the
judge, the profiler), so that a device this process cannot use is refused with one line before
any weight is read, not by torch's assertion halfway through loading."""

from __future__ import annotations

import re

DEVICE = re.compile(r"(auto|cpu|mps|cuda(:\d+)?)\Z")


def check_device(value: str) -> str:
    """`value` if it names a device a setting may give (auto, cpu, mps, cuda, cuda:N)."""
    if not DEVICE.match(value):
        raise ValueError(f"device must be auto, cpu, mps, cuda or cuda:N, not {value!r}")
    return value


def resolve_device(value: str) -> str:
    """The device to load onto: ``auto`` is cuda when this process sees a CUDA device, else cpu;
    a cuda or mps device it cannot see raises ValueError naming it."""
    import torch

    check_device(value)
    if value == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if value.startswith("cuda"):
        visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = int(value.partition(":")[2] or 0)
        if index >= visible:
            raise ValueError(f"device {value}: this process sees {visible} CUDA device(s)"
                             + ("; use device cpu (or auto)" if not visible else ""))
    if value == "mps" and not torch.backends.mps.is_available():
        raise ValueError("device mps: not available in this process; use device cpu (or auto)")
    return value


def load_dtype(dtype: str, device: str):
    """The dtype to load a checkpoint in for a setting's `dtype` on `device`: ``auto`` is float32
    on the CPU (its bf16 kernels are slow, and the organism's figures are float32) and the
    checkpoint's own dtype (transformers' "auto") elsewhere; any other name is that torch dtype."""
    import torch

    if dtype == "auto":
        return torch.float32 if str(device) == "cpu" else "auto"
    return getattr(torch, dtype)
