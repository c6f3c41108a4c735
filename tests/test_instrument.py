"""Routing instrumentation: capture / mask / scale / force against hand-computed references."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moe_routing.architectures import RouterSpec, describe
from moe_routing.instrument import (
    DEFAULT_MASK_BIAS,
    capture_router_logits,
    capture_routing,
    force_experts,
    mask_experts,
    scale_routing,
)


def reference_route(logits: torch.Tensor, spec: RouterSpec, masked=(), forced=()):
    """Independent numpy routing: per token, a dict {expert: weight}."""
    z = logits.detach().double().numpy().copy()
    z[:, list(masked)] += DEFAULT_MASK_BIAS
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    decisions = []
    for row in p:
        candidates = row.copy()
        if spec.num_groups:
            groups = candidates.reshape(spec.num_groups, -1)
            keep = np.argsort(-groups.max(axis=1))[: spec.topk_groups]
            drop = np.setdiff1d(np.arange(spec.num_groups), keep)
            groups[drop] = 0.0
            candidates = groups.reshape(-1)
        order = [e for e in np.argsort(-candidates, kind="stable") if e not in forced]
        chosen = list(forced) + order[: spec.top_k - len(forced)]
        weights = row[chosen]
        if spec.renormalize:
            weights = weights / weights.sum()
        decisions.append(dict(zip(chosen, weights * spec.scaling)))
    return decisions


def as_dicts(weights: torch.Tensor, indices: torch.Tensor):
    return [dict(zip(i.tolist(), w.double().tolist())) for w, i in zip(weights, indices)]


def assert_same_routing(actual, expected):
    assert len(actual) == len(expected)
    for got, want in zip(actual, expected):
        assert set(got) == set(want)
        for expert in want:
            assert got[expert] == pytest.approx(want[expert], rel=1e-5, abs=1e-7)


def hidden_states(model, n=32):
    return torch.randn(n, model.config.hidden_size)


def routers(model):
    return [layer.router for layer in describe(model).layers]


def no_hooks_left(model):
    base = model.model
    return not base._forward_pre_hooks and all(not r._forward_hooks for r in routers(model))


def busiest_expert(indices: torch.Tensor) -> int:
    return int(torch.bincount(indices.reshape(-1), minlength=8).argmax())


# ----------------------------------------------------------------------------- mask


def test_mask_reroutes_like_reference(model):
    moe = describe(model)
    x = hidden_states(model)
    first, second = routers(model)[:2]
    logits, _, indices = first(x)
    target = busiest_expert(indices)
    assert (indices == target).any()  # the mask has something to change
    before_second = second(x)
    with mask_experts(model, [(0, target)]):
        masked_logits, weights, masked_indices = first(x)
        after_second = second(x)
    assert not (masked_indices == target).any()
    assert_same_routing(as_dicts(weights, masked_indices),
                        reference_route(logits, moe.router, masked=[target]))
    assert torch.equal(masked_logits[:, target], logits[:, target] + DEFAULT_MASK_BIAS)
    for a, b in zip(before_second, after_second):  # other layers untouched
        assert torch.equal(a, b)


def test_mask_in_full_model_and_exact_restore(model, batch):
    with torch.no_grad():
        baseline = model(**batch).logits
        with capture_routing(model) as capture:
            model(**batch)
        ids = capture.trace().expert_ids
        pairs = [(layer, busiest_expert(ids[:, layer])) for layer in range(ids.shape[1])]
        with capture_routing(model) as capture, mask_experts(model, pairs):
            masked = model(**batch).logits
        masked_ids = capture.trace().expert_ids
        after = model(**batch).logits
    for layer, expert in pairs:
        assert (ids[:, layer] == expert).any()
        assert not (masked_ids[:, layer] == expert).any()
    assert not torch.equal(masked, baseline)
    assert torch.equal(after, baseline)  # bit-identical once the context is left
    assert no_hooks_left(model)


def test_mask_applies_under_generate(model, batch):
    with capture_routing(model) as capture, mask_experts(model, [(0, 1), (0, 2)]):
        model.generate(**batch, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)
    trace = capture.trace()
    assert trace.generated.any()
    selected = trace.expert_ids[:, 0]
    assert not ((selected == 1) | (selected == 2)).any()
    assert no_hooks_left(model)


# ----------------------------------------------------------------------------- scale


def test_scale_multiplies_weights(model):
    x = hidden_states(model)
    router = routers(model)[0]
    _, weights, indices = router(x)
    with scale_routing(model, 0.5):
        _, scaled, scaled_indices = router(x)
    assert torch.equal(scaled_indices, indices)
    assert torch.equal(scaled, weights * 0.5)
    expert = busiest_expert(indices)
    with scale_routing(model, 1.5, experts=[(0, expert)]):
        _, scaled, _ = router(x)
    expected = torch.where(indices == expert, weights * 1.5, weights)
    assert torch.equal(scaled, expected)
    assert (indices == expert).any() and (indices != expert).any()
    with scale_routing(model, 3.0, layers=[1]):
        _, unscaled, _ = router(x)
    assert torch.equal(unscaled, weights)


def test_scale_zero_leaves_only_shared_experts(model):
    """Routed weights of 0 turn the routed experts off: the block returns its shared part only."""
    layer = describe(model).layers[0]
    x = torch.randn(1, 5, model.config.hidden_size)
    with torch.no_grad(), scale_routing(model, 0.0):
        out = layer.block(x)
    if not layer.shared_experts:
        assert torch.equal(out, torch.zeros_like(out))
    else:
        with torch.no_grad():
            full = layer.block(x)
        assert out.abs().sum() > 0 and not torch.equal(out, full)


def test_scale_one_is_identity(model, batch):
    with torch.no_grad():
        baseline = model(**batch).logits
        with scale_routing(model, 1.0):
            scaled = model(**batch).logits
    assert torch.equal(scaled, baseline)


# ----------------------------------------------------------------------------- force


@pytest.mark.parametrize("forced", [[6, 7], [5]])
def test_force_selects_given_experts(model, forced):
    moe = describe(model)
    x = hidden_states(model)
    router = routers(model)[0]
    logits, _, _ = router(x)
    with force_experts(model, {0: forced}):
        _, weights, indices = router(x)
    for row in indices.tolist():
        assert set(forced) <= set(row) and len(set(row)) == moe.top_k
    assert_same_routing(as_dicts(weights, indices),
                        reference_route(logits, moe.router, forced=forced))


def test_force_in_generate(model, batch):
    with capture_routing(model) as capture, force_experts(model, {1: [0, 3]}):
        model.generate(**batch, max_new_tokens=3, min_new_tokens=3, do_sample=False, pad_token_id=0)
    ids = capture.trace().expert_ids[:, 1]
    assert ids.shape[0] > 0
    assert torch.equal(ids.sort(dim=-1).values, torch.tensor([0, 3]).expand_as(ids))


def test_force_per_sequence_rows(model, batch):
    """A [batch, n] tensor forces row b's experts on every token of sequence b only."""
    rows = torch.tensor([[0, 3], [5, 6]])[:, : describe(model).top_k]
    with capture_routing(model) as capture, force_experts(model, {0: rows}):
        with torch.no_grad():
            model(**batch)
    trace = capture.trace()
    for seq in (0, 1):
        ids = trace.expert_ids[trace.sequence == seq, 0].sort(dim=-1).values
        assert torch.equal(ids, rows[seq].sort().values.expand_as(ids))
    with pytest.raises(ValueError, match="per-sequence"):
        with force_experts(model, {0: torch.tensor([[1, 1]])}):
            pass


def test_force_per_token_in_prefill(model, batch):
    """A [batch, length, n] tensor forces one (sequence, token) of the prefill; -1 rows, every
    other token and the decoding steps keep the model's own routing."""
    moe = describe(model)
    B, T = batch["input_ids"].shape
    rows = torch.full((B, T, moe.top_k), -1, dtype=torch.long)
    rows[0, T - 1] = torch.arange(moe.num_experts - moe.top_k, moe.num_experts)  # row 0: unpadded
    with torch.no_grad(), capture_routing(model) as natural:
        model(**batch)
    with torch.no_grad(), capture_routing(model) as capture, force_experts(model, {0: rows}):
        model(**batch)
        model.generate(**batch, max_new_tokens=2, min_new_tokens=2, do_sample=False, pad_token_id=0)
    trace, before = capture.trace(), natural.trace()
    # Sequences 0, 1: the forward; 2, 3: the generate call (its prefill, then decoding steps).
    hit = (trace.sequence % B == 0) & (trace.position == T - 1) & ~trace.generated
    assert int(hit.sum()) == 2
    assert torch.equal(trace.expert_ids[hit, 0].sort(dim=-1).values, rows[0, T - 1].expand(2, -1))
    first = trace.sequence < B  # the plain forward's tokens
    untouched = first & ~hit
    assert torch.equal(trace.expert_ids[untouched][:, 0], before.expert_ids[~hit[first]][:, 0])
    assert no_hooks_left(model)


# ----------------------------------------------------------------------------- nesting


def test_nested_contexts_compose_and_unwind(model):
    x = hidden_states(model)
    router = routers(model)[0]
    base = router(x)
    with mask_experts(model, [(0, 0)]):
        with mask_experts(model, [(0, 1)]):
            _, _, both = router(x)
            with scale_routing(model, 2.0):
                _, scaled, scaled_ids = router(x)
        _, outer_weights, outer = router(x)
    assert not ((both == 0) | (both == 1)).any()
    assert torch.equal(scaled_ids, both)
    assert (outer == 1).any() and not (outer == 0).any()  # inner mask gone, outer still on
    with mask_experts(model, [(0, 0)]), mask_experts(model, [(0, 1)]):
        _, both_weights, _ = router(x)
    assert torch.equal(scaled, both_weights * 2.0)
    after = router(x)
    assert all(torch.equal(a, b) for a, b in zip(base, after))
    assert no_hooks_left(model)


def test_capture_sees_final_decision_whatever_the_order(model, batch):
    with capture_routing(model) as outer, mask_experts(model, [(0, 4)]), capture_routing(model) as inner:
        with torch.no_grad():
            model(**batch)
    a, b = outer.trace(), inner.trace()
    assert torch.equal(a.expert_ids, b.expert_ids)
    assert not (a.expert_ids[:, 0] == 4).any()


def test_logit_capture_is_the_routers_own_output_with_its_graph(model, batch):
    # The raw logits, whatever the order masks were entered in, equal the router's output, and a
    # loss on them reaches the router weights.
    layers = describe(model).layers
    with torch.no_grad():
        expected = []
        handles = [layer.router.register_forward_hook(
            lambda m, a, out: expected.append(out[0].detach().clone())) for layer in layers]
        model(**batch)
        for handle in handles:
            handle.remove()
    with mask_experts(model, [(0, 4)]), capture_router_logits(model) as before:
        model(**batch)
        seen_before = before.take()
    with capture_router_logits(model) as after, mask_experts(model, [(0, 4)]):
        model(**batch)
        seen_after = after.take()
        with pytest.raises(RuntimeError, match="did not run"):
            after.take()  # taken once: the next read needs another forward
    assert len(seen_before) == len(layers)
    # Layer 0 sees the unmasked model's input: its captured logits are the plain router output,
    # without the mask's bias. Later layers see the masked model, the same in either order.
    assert torch.equal(seen_before[0].detach(), expected[0])
    assert torch.equal(seen_after[0].detach(), expected[0])
    for got_a, got_b in zip(seen_before, seen_after):
        assert torch.equal(got_a.detach(), got_b.detach())
    router = routers(model)[0]
    model.zero_grad()
    seen_after[0].logsumexp(dim=-1).sum().backward()
    assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)
    assert no_hooks_left(model)


def test_exception_inside_context_restores_model(model, batch):
    with torch.no_grad():
        baseline = model(**batch).logits
        with pytest.raises(RuntimeError, match="boom"):
            with capture_routing(model), mask_experts(model, [(0, 0)]):
                model(**batch)
                raise RuntimeError("boom")
        assert torch.equal(model(**batch).logits, baseline)
    assert no_hooks_left(model)


def test_gradients_flow_through_masked_routing(model, batch):
    router = routers(model)[0]
    model.zero_grad()
    with mask_experts(model, [(0, 0)]):
        model(**batch, labels=batch["input_ids"]).loss.backward()
    grad = router.weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)


# ----------------------------------------------------------------------------- capture


def test_capture_attributes_tokens_under_generate(model, batch):
    new_tokens = 5
    with torch.no_grad(), capture_routing(model) as capture:
        out = model.generate(**batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             do_sample=False, pad_token_id=0)
    trace = capture.trace()
    moe = describe(model)
    lengths = batch["attention_mask"].sum(dim=1).tolist()
    assert out.shape[1] == batch["input_ids"].shape[1] + new_tokens
    for sequence, prompt_length in enumerate(lengths):
        rows = trace.sequence == sequence
        prompt = rows & ~trace.generated
        generated = rows & trace.generated
        assert int(prompt.sum()) == prompt_length  # pad tokens are not counted
        # The last new token is never fed back, so new_tokens - 1 generated rows.
        assert int(generated.sum()) == new_tokens - 1
        assert trace.position[prompt].tolist() == list(range(prompt_length))
        fed_back = range(prompt_length, prompt_length + new_tokens - 1)
        assert trace.position[generated].tolist() == list(fed_back)
    assert trace.expert_ids.shape == (trace.num_tokens, moe.num_layers, moe.top_k)
    assert trace.probs.shape == (trace.num_tokens, moe.num_layers, moe.num_experts)
    assert torch.allclose(trace.probs.sum(-1), torch.ones(trace.num_tokens, moe.num_layers))
    # Captured ids are the selected experts: the highest-probability ones (or within groups).
    if not moe.router.num_groups:
        top = trace.probs.topk(moe.top_k, dim=-1).indices.sort(-1).values
        assert torch.equal(top, trace.expert_ids.sort(-1).values)


def test_capture_numbers_sequences_across_batches(model, tokenizer):
    first = tokenizer(["a", "bb", "ccc"], return_tensors="pt", padding=True)
    second = tokenizer(["dddd"], return_tensors="pt", padding=True)
    with torch.no_grad(), capture_routing(model, probabilities=False) as capture:
        model(**first)
        model(**second)
    trace = capture.trace()
    assert trace.probs is None
    assert torch.bincount(trace.sequence).tolist() == [1, 2, 3, 4]
    assert capture.drain().num_tokens == 10 and capture.trace().num_tokens == 0


def test_capture_matches_router_outputs(model, batch):
    """What capture records is what the routers returned (hand check on one forward)."""
    seen = {}
    handles = [r.register_forward_hook(lambda m, a, o, i=i: seen.__setitem__(i, o))
               for i, r in enumerate(routers(model))]
    try:
        with torch.no_grad(), capture_routing(model) as capture:
            model(**batch)
    finally:
        for h in handles:
            h.remove()
    trace = capture.trace()
    valid = batch["attention_mask"].reshape(-1).bool()
    for layer, (_, weights, indices) in seen.items():
        assert torch.equal(trace.expert_ids[:, layer], indices[valid])
        assert torch.equal(trace.weights[:, layer], weights[valid].float())


# ----------------------------------------------------------------------------- bad input


def test_bad_input_errors(model):
    with pytest.raises(ValueError, match="expert 8 out of range in MoE layer 0"):
        with mask_experts(model, [(0, 8)]):
            pass
    with pytest.raises(ValueError, match="MoE layer 9 out of range"):
        with mask_experts(model, [(9, 0)]):
            pass
    with pytest.raises(ValueError, match="expected \\(layer, expert\\) pairs"):
        with mask_experts(model, [3]):
            pass
    with pytest.raises(ValueError, match="finite negative"):
        with mask_experts(model, [(0, 0)], bias=float("-inf")):
            pass
    with pytest.raises(ValueError, match="at least top_k=2 must stay routable"):
        with mask_experts(model, [(0, e) for e in range(7)]):
            pass
    with pytest.raises(ValueError, match="finite and >= 0"):
        with scale_routing(model, -1.0):
            pass
    with pytest.raises(ValueError, match="can force 1..top_k=2 distinct experts, got 3"):
        with force_experts(model, {0: [1, 2, 3]}):
            pass
    assert no_hooks_left(model)
