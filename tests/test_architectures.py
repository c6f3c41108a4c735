"""Architecture adapters: layer discovery, routing maths, expert parameters, clear errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from moe_routing.architectures import (
    SUPPORTED_ARCHITECTURES,
    UnsupportedArchitectureError,
    describe,
    route,
    selected_experts,
)
from moe_routing.profiler import load_checkpoint

EXPECTED = {
    # model_type: (MoE layers, dense decoder layers, has shared experts, renormalize, scaling)
    "qwen3_moe": (2, (1,), False, True, 1.0),
    "qwen2_moe": (3, (), True, False, 1.0),
    "mixtral": (3, (), False, True, 1.0),
    "olmoe": (3, (), False, False, 1.0),
    "deepseek_v2": (2, (0,), True, False, 1.5),
}


def test_describe_finds_layers_and_routing_spec(model):
    moe = describe(model)
    layers, dense, shared, renormalize, scaling = EXPECTED[moe.architecture]
    assert moe.num_layers == layers
    assert moe.dense_decoder_indices == dense
    assert moe.num_experts == 8 and moe.top_k == 2
    assert moe.router.renormalize == renormalize and moe.router.scaling == scaling
    assert [layer.index for layer in moe.layers] == list(range(layers))
    assert all(bool(layer.shared_experts) == shared for layer in moe.layers)
    # MoE and dense decoder indices partition the decoder layers.
    decoder = sorted([layer.decoder_index for layer in moe.layers] + list(dense))
    assert decoder == list(range(model.config.num_hidden_layers))


def test_route_reproduces_every_router_exactly(model):
    """route() must give the router's own (weights, indices), bit for bit, so that masking by a
    logit bias re-routes exactly as the model would."""
    moe = describe(model)
    hidden = torch.randn(64, model.config.hidden_size)
    for layer in moe.layers:
        logits, weights, indices = layer.router(hidden)
        our_weights, our_indices = route(logits, moe.router)
        assert torch.equal(our_indices, indices)
        assert torch.equal(our_weights, weights) and our_weights.dtype == weights.dtype


def test_selected_experts_are_the_routers_choice(model):
    """The gateway's cheap top-k (of logits, unordered) picks the same experts as the router."""
    moe = describe(model)
    hidden = torch.randn(256, model.config.hidden_size)
    for layer in moe.layers:
        logits, _, indices = layer.router(hidden)
        cheap = selected_experts(logits, moe.router)
        assert torch.equal(cheap.sort(dim=-1).values, indices.sort(dim=-1).values)


def test_route_matches_hand_computation():
    from moe_routing.architectures import RouterSpec

    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    probs = torch.softmax(logits, -1)[0]
    spec = RouterSpec(num_experts=4, top_k=2, renormalize=False, scaling=2.0)
    weights, indices = route(logits, spec)
    assert indices.tolist() == [[0, 1]]
    assert torch.allclose(weights[0], 2.0 * probs[:2])
    spec = RouterSpec(num_experts=4, top_k=2, renormalize=True)
    weights, _ = route(logits, spec)
    assert torch.allclose(weights[0], probs[:2] / probs[:2].sum())
    # Group-limited: groups {0,1} and {2,3}; keeping 1 group forces both picks from group 0.
    logits = torch.tensor([[3.0, -5.0, 2.9, 2.8]])
    spec = RouterSpec(num_experts=4, top_k=2, num_groups=2, topk_groups=1, sorted_topk=True)
    _, indices = route(logits, spec)
    assert indices.tolist() == [[0, 1]]


def test_fused_expert_parameters_are_views(model):
    moe = describe(model)
    layer = moe.layers[0]
    assert layer.fused_experts
    named = dict(layer.expert_parameters(3))
    assert set(named) == {"gate_up_proj[3]", "down_proj[3]"}
    view = named["down_proj[3]"]
    assert view.data_ptr() == layer.experts.down_proj[3].data_ptr()
    assert view.shape == layer.experts.down_proj.shape[1:]


def test_module_list_expert_parameters(model):
    """Checkpoints whose experts are a ModuleList (older layouts) expose per-expert modules."""
    moe = describe(model)
    layer = moe.layers[0]
    experts = nn.ModuleList(nn.Linear(4, 4) for _ in range(moe.num_experts))
    listed = type(layer)(layer.index, layer.decoder_index, layer.block, layer.router, experts, ())
    assert not listed.fused_experts
    named = dict(listed.expert_parameters(5))
    assert set(named) == {"5.weight", "5.bias"}
    assert named["5.weight"] is experts[5].weight


def _llama():
    config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1)
    return LlamaForCausalLM(config)


def test_unsupported_architecture_is_named():
    with pytest.raises(UnsupportedArchitectureError) as error:
        describe(_llama())
    message = str(error.value)
    assert "'llama'" in message
    for name in SUPPORTED_ARCHITECTURES:
        assert name in message


def test_unsupported_checkpoint_fails_before_loading(tmp_path):
    _llama().save_pretrained(tmp_path)
    with pytest.raises(UnsupportedArchitectureError, match="unsupported model architecture 'llama'"):
        load_checkpoint(tmp_path)


def test_check_expert_messages(model):
    moe = describe(model)
    with pytest.raises(ValueError, match=r"expert 8 out of range in MoE layer 0: .* 8 routed experts"):
        moe.check_expert(0, 8)
    with pytest.raises(ValueError, match=r"MoE layer -1 out of range"):
        moe.check_expert(-1, 0)
