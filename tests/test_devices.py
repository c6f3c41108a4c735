"""Device settings: the names accepted, what auto means, and one line for a device not here."""

from __future__ import annotations

import pytest
import torch

from moe_routing.devices import check_device, load_dtype, resolve_device


def test_device_names():
    for name in ("auto", "cpu", "mps", "cuda", "cuda:0", "cuda:12"):
        assert check_device(name) == name
    for name in ("gpu", "cuda:", "cuda:x", "CPU", "cuda:0 "):
        with pytest.raises(ValueError, match="auto, cpu, mps, cuda or cuda:N"):
            check_device(name)


def test_auto_is_cuda_where_this_process_sees_one():
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == "cpu"
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    with pytest.raises(ValueError, match=f"device cuda:{visible}: this process sees {visible} CUDA"):
        resolve_device(f"cuda:{visible}")
    if not visible:
        with pytest.raises(ValueError, match="device cuda: this process sees 0 CUDA device.*use device cpu"):
            resolve_device("cuda")


def test_auto_dtype_is_float32_on_the_cpu_and_the_checkpoints_own_elsewhere():
    assert load_dtype("auto", "cpu") is torch.float32
    assert load_dtype("auto", "cuda") == load_dtype("auto", "cuda:1") == "auto"
    assert load_dtype("bfloat16", "cpu") is torch.bfloat16
    assert load_dtype("float16", "cuda") is torch.float16
