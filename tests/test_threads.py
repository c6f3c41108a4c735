"""The torch settings block: what it sets inside, and that the caller's settings come back."""

import pytest
import torch

from moe_routing.threads import torch_settings


def test_the_block_runs_with_its_settings_and_hands_back_the_callers_even_on_error():
    before = torch.get_num_threads()
    assert not torch.are_deterministic_algorithms_enabled()
    with torch_settings(before + 1, deterministic=True):
        assert torch.get_num_threads() == before + 1
        assert torch.are_deterministic_algorithms_enabled()
    assert torch.get_num_threads() == before and not torch.are_deterministic_algorithms_enabled()

    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        with pytest.raises(RuntimeError), torch_settings(before + 2, deterministic=False):
            assert not torch.are_deterministic_algorithms_enabled()
            raise RuntimeError("the work failed")
        assert torch.get_num_threads() == before
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.is_deterministic_algorithms_warn_only_enabled()
    finally:
        torch.use_deterministic_algorithms(False)


def test_no_settings_leaves_the_current_ones_in_place():
    before = torch.get_num_threads()
    with torch_settings(None):
        assert torch.get_num_threads() == before
        assert not torch.are_deterministic_algorithms_enabled()


def test_jobs_side_by_side_split_the_cores_this_process_may_use_and_never_go_below_one():
    import os

    from moe_routing.threads import cpu_cores, shared_threads

    assert cpu_cores() == len(os.sched_getaffinity(0))
    assert shared_threads(1) == cpu_cores() and shared_threads(0) == cpu_cores()
    assert shared_threads(cpu_cores() * 4) == 1
