"""Sharded training (training.sharding: fsdp) and the per-worker memory estimate."""

from __future__ import annotations

import weakref

import pytest
import torch
from pydantic import ValidationError

from alignment.config import AlignmentConfig, TrainingConfig
from alignment.loop import Batch, router_target, training_loss
from alignment.sharding import MemoryEstimate, check_memory, estimate_model_memory
from alignment.trainable import load_model, make_trainable
from moe_routing.architectures import describe
from moe_routing.instrument import capture_router_logits
from moe_routing.tiny import save_tiny_checkpoint, tiny_model

EXPERTS = [(0, 1), (0, 3), (1, 2), (1, 5)]


# --- config -------------------------------------------------------------------------------------


def test_sharding_layouts_that_cannot_work_are_refused_naming_the_keys():
    AlignmentConfig(training={"sharding": "fsdp", "num_workers": 2})
    with pytest.raises(ValidationError, match="training.sharding fsdp needs training.num_workers >= 2"):
        AlignmentConfig(training={"sharding": "fsdp", "num_workers": 1})
    with pytest.raises(ValidationError, match="method sft_all trains every weight"):
        AlignmentConfig(training={"sharding": "fsdp", "num_workers": 2, "method": "sft_all"})
    with pytest.raises(ValidationError, match="not supported with method lora"):
        AlignmentConfig(training={"sharding": "fsdp", "num_workers": 2, "method": "lora"})
    with pytest.raises(ValidationError, match="training.sharding"):
        AlignmentConfig(training={"sharding": "zero3", "num_workers": 2})
    for method in ("mesa", "mesa_paper", "router_only", "safex"):
        AlignmentConfig(training={"sharding": "fsdp", "num_workers": 4, "batch_size": 8, "method": method})


# --- W + delta per layer ------------------------------------------------------------------------


def test_w_plus_delta_lives_for_its_layer_only_and_gradients_are_unchanged():
    """Trainable.materialized: the same gradients, bit for bit, as parametrize.cached (one
    W + delta per model forward, kept for the backward), but no W + delta outlives its layer's
    forward: the backward rebuilds the pieces it needs from W and delta."""
    from torch.nn.utils import parametrize

    grads, alive = [], []
    for mode in ("cached", "materialized"):
        model, trainable = make_trainable(tiny_model("qwen3_moe", seed=0), "mesa", EXPERTS)
        with torch.no_grad():
            for param in trainable.params.values():
                param.add_(0.05 * torch.randn(param.shape, generator=torch.Generator().manual_seed(1)))
        sums = []  # W + delta of each layer, seen by a hook that runs before materialized drops it

        def keep(module, args, output, sums=sums, deltas=trainable.deltas):
            sums.extend(weakref.ref(d.cached[0]) for _, _, d in deltas if d.cached is not None)

        for module in {id(m): m for m, _, _ in trainable.deltas}.values():
            module.register_forward_hook(keep)
        ids = torch.randint(0, 200, (3, 17), generator=torch.Generator().manual_seed(0))
        with parametrize.cached() if mode == "cached" else trainable.materialized():
            loss = model(input_ids=ids).logits.float().pow(2).mean()
        alive.append(sum(ref() is not None for ref in sums))
        loss.backward()
        grads.append({name: p.grad for name, p in trainable.params.items()})
    assert all(torch.equal(grads[0][name], grads[1][name]) for name in grads[0])
    assert alive[1] == 0 and len(sums) == len(trainable.deltas)


# --- memory estimate ----------------------------------------------------------------------------


def _estimate(**training) -> MemoryEstimate:
    from transformers import AutoModelForCausalLM

    config = tiny_model("qwen3_moe", seed=0).config
    with torch.device("meta"):  # weightless, as alignment.sharding.estimate_memory builds it
        model = AutoModelForCausalLM.from_config(config)
    model, trainable = make_trainable(model, training.get("method", "mesa"), EXPERTS)
    return estimate_model_memory(model, trainable, TrainingConfig(**training))


def test_the_estimate_counts_weights_trainable_state_and_activations():
    model = tiny_model("qwen3_moe", seed=0)
    base = sum(p.numel() for p in model.parameters())
    model, trainable = make_trainable(model, "mesa", EXPERTS)
    total = sum(p.numel() for p in model.parameters())  # with the deltas
    trained = trainable.count()
    routers = sum(p.numel() for p in trainable.routers)
    one = _estimate(num_workers=1, batch_size=8, max_length=64)
    assert one.weights == 4 * (total - trained)
    assert one.trainable == 4 * (5 * trained + routers)
    assert one.host_load == 0
    two = _estimate(num_workers=2, batch_size=8, max_length=64, sharding="fsdp")
    assert two.weights == 4 * ((total - trained) // 2) and two.host_load == one.weights
    assert two.activations == one.activations // 2 and two.trainable == one.trainable
    assert two.working > one.working  # unsharded root and layers
    assert two.rank0 == max(two.total, two.runtime + two.weights + two.host_load)
    half = _estimate(num_workers=1, batch_size=8, max_length=64, dtype="bfloat16")
    assert half.weights == one.weights // 2
    assert _estimate(num_workers=1, batch_size=8, max_length=128).activations == 2 * one.activations
    sft = _estimate(num_workers=1, batch_size=8, max_length=64, method="sft_all")
    assert sft.weights == 0 and sft.trainable == 4 * 5 * base
    lora = _estimate(num_workers=1, batch_size=8, max_length=64, method="lora")  # a peft wrapper
    assert lora.weights == 4 * base and lora.activations > 0 and 0 < lora.trainable < one.trainable


def test_a_layout_over_the_memory_is_refused_with_one_line():
    estimate = MemoryEstimate(weights=3 * 2**30, working=2**30, trainable=2**30, activations=2**30,
                              runtime=2**30, host_load=6 * 2**30)
    gpu = TrainingConfig(num_workers=4, batch_size=8, use_gpu=True)
    check_memory(estimate, gpu, 8 * 2**30, "GPU X")
    with pytest.raises(ValueError) as refused:
        check_memory(estimate, gpu, 6 * 2**30, "GPU X")
    message = str(refused.value)
    assert "\n" not in message and "training needs about 7.0 GiB per worker" in message
    assert "GPU X has 6.0 GiB free" in message and "training.sharding fsdp" in message
    assert "training.memory_check false" in message
    # CPU workers share the node: 3 x 7 GiB + rank 0's max(7, 1 + 3 + 6) GiB.
    cpu = TrainingConfig(num_workers=4, batch_size=8, sharding="fsdp")
    check_memory(estimate, cpu, 31 * 2**30, "system memory")
    with pytest.raises(ValueError, match="about 31.0 GiB for 4 workers"):
        check_memory(estimate, cpu, 30 * 2**30, "system memory")


# --- FSDP2 on gloo ------------------------------------------------------------------------------


def _one_step(model, trainable, rank: int, world: int) -> torch.Tensor:
    """Loss and gradients (left in .grad) of rows rank::world of a fixed batch of 8."""
    moe = describe(model)
    members = torch.zeros(moe.num_layers, moe.num_experts, dtype=torch.bool)
    for layer, expert in EXPERTS:
        members[layer, expert] = True
    training = TrainingConfig(method="mesa")
    target = router_target(training, members, torch.ones(moe.num_layers, moe.num_experts))
    ids = torch.randint(0, 200, (8, 24), generator=torch.Generator().manual_seed(0))[rank::world]
    harmful = (torch.arange(8) % 4 != 3)[rank::world]
    batch = Batch(ids, torch.ones_like(ids), ids.clone(), harmful, torch.ones(ids.shape[0]))
    model.train()
    with capture_router_logits(model) as capture:
        loss, *_ = training_loss(model, trainable, capture, batch, spec=moe.router, target=target,
                                 training=training)
    loss.backward()
    return loss.detach()


def _sharded_worker(rank: int, init: str, checkpoint: str, out: str):
    """One of two gloo workers: the checkpoint loaded sharded, one step on rows rank::2."""
    from torch.distributed.tensor import DTensor

    from alignment.sharding import average_gradients, load_sharded

    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        model, trainable, _ = load_sharded(checkpoint, "mesa", EXPERTS, torch.device("cpu"), dtype="float32")
        trained = {id(p) for p in trainable.params.values()}
        frozen = {n: p for n, p in model.named_parameters() if id(p) not in trained}
        assert frozen and all(isinstance(p, DTensor) for p in frozen.values())
        assert not any(isinstance(p, DTensor) for p in trainable.params.values())
        values = {n: p.detach().clone() for n, p in trainable.params.items()}
        loss = _one_step(model, trainable, rank, 2)
        average_gradients(trainable.params.values())
        torch.save({"loss": loss, "values": values, "grads": {n: p.grad for n, p in trainable.params.items()},
                    "shards": {n: p.to_local() for n, p in frozen.items()}}, f"{out}.{rank}")
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_workers_shard_the_frozen_weights_and_compute_one_workers_gradient(tmp_path):
    """FSDP2 on CPU (gloo): each worker holds its rows of every frozen tensor (torch.chunk's
    split of dim 0) and the trained tensors whole; the mean of the workers' losses and the
    all-reduced gradients are one unsharded worker's on the whole batch, up to float32
    summation order."""
    import torch.multiprocessing as mp

    checkpoint = save_tiny_checkpoint("qwen3_moe", tmp_path / "tiny")
    out = tmp_path / "worker"
    mp.spawn(_sharded_worker, nprocs=2, join=True,
             args=(f"file://{tmp_path / 'store'}", str(checkpoint), str(out)))
    parts = [torch.load(f"{out}.{rank}") for rank in range(2)]

    model, _ = load_model(str(checkpoint), "float32", "cpu")
    model, trainable = make_trainable(model, "mesa", EXPERTS)
    loss = _one_step(model, trainable, 0, 1)
    whole = dict(model.named_parameters())
    assert parts[0]["shards"].keys() == parts[1]["shards"].keys()
    for name, shard in parts[0]["shards"].items():
        assert shard.shape[0] == (whole[name].shape[0] + 1) // 2
        assert torch.equal(torch.cat([shard, parts[1]["shards"][name]]), whole[name].detach())
    for name, param in trainable.params.items():
        assert torch.equal(parts[0]["grads"][name], parts[1]["grads"][name])
        for part in parts:
            assert torch.equal(part["values"][name], param.detach())
            torch.testing.assert_close(part["grads"][name], param.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close((parts[0]["loss"] + parts[1]["loss"]) / 2, loss, rtol=1e-5, atol=0)


def test_an_evaluation_takes_twice_its_weights_in_host_memory(tmp_path):
    from alignment.sharding import evaluation_memory
    from moe_routing.tiny import tiny_model

    model = tiny_model("qwen3_moe")
    model.config.save_pretrained(tmp_path)
    numel = sum(p.numel() for p in model.parameters())
    assert evaluation_memory(str(tmp_path)) == evaluation_memory(str(tmp_path), "float32") == 2 * 4 * numel
    assert evaluation_memory(str(tmp_path), "bfloat16") == 2 * 2 * numel
