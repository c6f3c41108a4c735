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
