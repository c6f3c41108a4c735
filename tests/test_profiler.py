"""Profiler: counts from traces, batched profiling, Ray sharding equal to one process."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moe_routing.architectures import describe
from moe_routing.instrument import RoutingTrace, capture_routing
from moe_routing.profiler import (
    ProfileSettings,
    _shard_bounds,
    counts_from_trace,
    format_prompts,
    load_checkpoint,
    profile_routing,
    profile_routing_ray,
)
from moe_routing.stats import expert_frequency
from moe_routing.tiny import save_tiny_checkpoint

PROMPTS = [f"Compute {i} + {3 * i}, then reverse the word {'abcdefg'[: 1 + i % 7]}." for i in range(29)]


def test_counts_from_trace_by_hand(model):
    moe = describe(model)  # 8 experts, top-2
    L = moe.num_layers
    # Three tokens: two in sequence 0, one in sequence 1; the same ids in every layer.
    ids = torch.tensor([[0, 1], [1, 2], [7, 0]])[:, None, :].expand(3, L, 2)
    trace = RoutingTrace(ids, torch.ones(3, L, 2), None, torch.tensor([0, 0, 1]),
                         torch.tensor([0, 1, 0]), torch.zeros(3, dtype=torch.bool))
    counts = counts_from_trace(trace, 2, moe)
    assert counts.sequence_tokens.tolist() == [2, 1]
    expected_seq0 = np.zeros(8, int)
    np.add.at(expected_seq0, [0, 1, 1, 2], 1)
    assert counts.sequence_hits[0, 0].tolist() == expected_seq0.tolist()
    assert counts.sequence_hits[1, L - 1].tolist() == [1, 0, 0, 0, 0, 0, 0, 1]
    co = counts.coactivation[0]
    assert co[0, 1] == co[1, 0] == 1 and co[1, 2] == 1 and co[0, 7] == co[7, 0] == 1
    assert co[1, 1] == 2 and co[0, 0] == 2 and co.sum() == 3 * 4  # k*k ordered pairs per token


def test_profile_counts_every_real_token(model, tokenizer):
    settings = ProfileSettings(batch_size=8, prompt_format="chat")
    counts = profile_routing(model, tokenizer, PROMPTS, settings, progress=False)
    texts = format_prompts(tokenizer, PROMPTS, "chat")
    lengths = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
    assert counts.num_sequences == len(PROMPTS)
    assert counts.sequence_tokens.tolist() == lengths
    assert np.allclose(expert_frequency(counts).sum(axis=1), describe(model).top_k)


def test_profile_equals_manual_capture(model, tokenizer):
    """Profiling with batch_size=1 equals counting a captured forward of each prompt."""
    settings = ProfileSettings(batch_size=1, prompt_format="raw")
    counts = profile_routing(model, tokenizer, PROMPTS[:5], settings, progress=False)
    moe = describe(model)
    for i, prompt in enumerate(PROMPTS[:5]):
        with torch.no_grad(), capture_routing(model, probabilities=False) as capture:
            model(**tokenizer(prompt, return_tensors="pt"))
        ids = capture.trace().expert_ids
        for layer in range(moe.num_layers):
            hand = np.bincount(ids[:, layer].reshape(-1).numpy(), minlength=moe.num_experts)
            assert counts.sequence_hits[i, layer].tolist() == hand.tolist()


def test_shard_bounds_are_batch_aligned_and_cover_everything():
    for n, batch, shards in [(29, 8, 2), (29, 8, 7), (1, 4, 3), (64, 16, 4), (65, 16, 4)]:
        bounds = _shard_bounds(n, batch, shards)
        assert bounds[0][0] == 0 and bounds[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
        assert all(a % batch == 0 for a, _ in bounds)
        assert len(bounds) <= min(shards, -(-n // batch))


def test_bad_input(model, tokenizer):
    with pytest.raises(ValueError, match="the dataset is empty"):
        profile_routing(model, tokenizer, [], progress=False)
    with pytest.raises(ValueError, match="prompt 1 must be a non-empty string"):
        profile_routing(model, tokenizer, ["ok", ""], progress=False)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        ProfileSettings(batch_size=0)
    with pytest.raises(ValueError, match="prompt_format must be 'chat' or 'raw'"):
        ProfileSettings(prompt_format="json")
    with pytest.raises(ValueError, match="the dataset is empty"):
        profile_routing_ray("/nonexistent", [], progress=False)


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    from moe_routing.ray_cluster import init_ray

    # A fresh local instance (never a cluster RAY_ADDRESS names), with the token set up the way
    # every entry point of the project does it.
    init_ray("local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.parametrize("architecture", ["qwen3_moe", "deepseek_v2"])
def test_ray_sharded_profile_equals_single_process(ray_cluster, tmp_path, architecture):
    checkpoint = save_tiny_checkpoint(architecture, tmp_path / architecture)
    model, tokenizer = load_checkpoint(checkpoint)
    settings = ProfileSettings(batch_size=4)
    single = profile_routing(model, tokenizer, PROMPTS, settings, progress=False)
    sharded = profile_routing_ray(checkpoint, PROMPTS, settings, num_workers=3, progress=False)
    assert np.array_equal(sharded.sequence_hits, single.sequence_hits)
    assert np.array_equal(sharded.sequence_tokens, single.sequence_tokens)
    assert np.array_equal(sharded.coactivation, single.coactivation)
    assert sharded.top_k == single.top_k


@pytest.mark.ray
def test_ray_worker_error_is_clear(ray_cluster, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from moe_routing.architectures import UnsupportedArchitectureError

    LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
                                 num_hidden_layers=1, num_attention_heads=2)).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedArchitectureError, match="unsupported model architecture 'llama'"):
        profile_routing_ray(tmp_path, ["hello"], progress=False)


class _Crash(RuntimeError):
    pass


def _count_forwards(model, crash_at: int | None = None):
    """Count model forwards; optionally raise on forward number ``crash_at`` (a dying job)."""
    calls = []

    def hook(module, args):
        calls.append(1)
        if crash_at is not None and len(calls) == crash_at:
            raise _Crash("job died")

    return calls, model.model.register_forward_pre_hook(hook)


def test_profile_resumes_after_a_crash(model, tokenizer, tmp_path):
    settings = ProfileSettings(batch_size=4)  # 29 prompts: 8 batches
    fresh = profile_routing(model, tokenizer, PROMPTS, settings, progress=False)
    path = tmp_path / "partial.npz"
    calls, handle = _count_forwards(model, crash_at=4)
    try:
        with pytest.raises(_Crash):
            profile_routing(model, tokenizer, PROMPTS, settings, progress=False,
                            resume_path=path, save_every=2)
    finally:
        handle.remove()
    calls, handle = _count_forwards(model)
    try:
        resumed = profile_routing(model, tokenizer, PROMPTS, settings, progress=False,
                                  resume_path=path, save_every=2)
        assert len(calls) == 8 - 2  # batches 1-2 were saved before batch 4 crashed
        again = profile_routing(model, tokenizer, PROMPTS, settings, progress=False,
                                resume_path=path)
        assert len(calls) == 6  # a finished profile returns without running the model
    finally:
        handle.remove()
    for counts in (resumed, again):
        assert np.array_equal(counts.sequence_hits, fresh.sequence_hits)
        assert np.array_equal(counts.sequence_tokens, fresh.sequence_tokens)
        assert np.array_equal(counts.coactivation, fresh.coactivation)
    assert not list(tmp_path.glob("*.tmp"))
    with pytest.raises(ValueError, match="holds a partial profile of other prompts or settings"):
        profile_routing(model, tokenizer, PROMPTS[:-1], settings, progress=False, resume_path=path)
    path.write_bytes(b"not a numpy file")
    with pytest.raises(ValueError, match="is not a readable partial profile"):
        profile_routing(model, tokenizer, PROMPTS, settings, progress=False, resume_path=path)


@pytest.mark.ray
@pytest.mark.slow
def test_ray_shards_save_and_resume(ray_cluster, tmp_path):
    checkpoint = save_tiny_checkpoint("mixtral", tmp_path / "mixtral")
    settings = ProfileSettings(batch_size=4)
    first = profile_routing_ray(checkpoint, PROMPTS, settings, num_workers=2, progress=False,
                                resume_dir=tmp_path / "partial")
    shards = sorted(p.name for p in (tmp_path / "partial").glob("*.npz"))
    assert shards == ["shard-00000000-00000016.npz", "shard-00000016-00000029.npz"]
    second = profile_routing_ray(checkpoint, PROMPTS, settings, num_workers=2, progress=False,
                                 resume_dir=tmp_path / "partial")
    assert np.array_equal(first.sequence_hits, second.sequence_hits)
    assert np.array_equal(first.coactivation, second.coactivation)
