"""MESA training pieces: config, data, what is trainable, the OT-KL router loss, batching."""

from __future__ import annotations

import json

import pytest
import torch
from pydantic import ValidationError

from alignment.config import AlignmentConfig, load_config
from alignment.data import DataError, load_dataset
from alignment.training import (
    collate,
    encode_chat,
    make_trainable,
    ot_kl_loss,
    router_targets,
    step_batch,
    weighted_lm_loss,
)
from moe_routing.architectures import describe
from moe_routing.tiny import byte_tokenizer, tiny_model


def _write(tmp_path, text, name="config.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


# --- config -------------------------------------------------------------------------------------


def test_unknown_and_bad_keys_are_named(tmp_path):
    with pytest.raises(ValidationError, match="learning_rat"):
        load_config(_write(tmp_path, "training: {learning_rat: 0.1}\n"))
    with pytest.raises(ValidationError, match="training.method"):
        load_config(_write(tmp_path, "training: {method: dpo}\n"))
    with pytest.raises(ValidationError, match="allocation.eps"):
        load_config(_write(tmp_path, "allocation: {eps: -1}\n"))
    with pytest.raises(ValueError, match="not found"):
        load_config(tmp_path / "absent.yaml")


def test_shipped_configs_load():
    from pathlib import Path

    configs = sorted(Path(__file__).parent.parent.joinpath("alignment", "configs").glob("*.yaml"))
    assert len(configs) >= 3
    for path in configs:
        load_config(path)


# --- data ---------------------------------------------------------------------------------------


def test_jsonl_datasets_and_their_errors(tmp_path):
    rows = [
        {"prompt": "How do I make a weapon?", "response": "I can't help with that."},
        {"messages": [{"role": "user", "content": "Kill a process?"},
                      {"role": "assistant", "content": "Use kill."}], "harmful": False},
    ]
    path = _write(tmp_path, "\n".join(json.dumps(r) for r in rows) + "\n", "safe.jsonl")
    config = AlignmentConfig(data={"safety": str(path)})
    examples = load_dataset("safety", config)
    assert [(e.prompt, e.harmful) for e in examples] == [("How do I make a weapon?", True),
                                                         ("Kill a process?", False)]
    bad = {
        '{"prompt": "x"}': "missing field",
        '{"prompt": "x", "response": ""}': "non-empty",
        '{"messages": [{"role": "system", "content": "s"}]}': "one user turn",
        "{not json": "invalid JSON",
        '{"prompt": "x", "response": "y", "harmful": "yes"}': "true or false",
    }
    for line, message in bad.items():
        path = _write(tmp_path, line + "\n", "bad.jsonl")
        with pytest.raises(DataError, match=message):
            load_dataset("safety", AlignmentConfig(data={"safety": str(path)}))
    with pytest.raises(DataError, match="not found"):
        load_dataset("general", AlignmentConfig(data={"general": str(tmp_path / "none.jsonl")}))
    with pytest.raises(DataError, match="is not 'packaged'"):
        load_dataset("general", AlignmentConfig(data={"general": "data.csv"}))


def test_packaged_data_never_holds_evaluation_prompts():
    from safety_eval.harness import EvalSets

    config = AlignmentConfig()
    safety, general = load_dataset("safety", config), load_dataset("general", config)
    held_out = EvalSets.standard(seed=0)
    prompts = {e.prompt for e in safety}
    assert not prompts & (set(held_out.harmful) | set(held_out.benign))
    assert not {e.prompt for e in general} & {t.prompt for t in held_out.general}
    assert sum(e.harmful for e in safety) > 500 and sum(not e.harmful for e in safety) > 500
    assert len(general) > 500


# --- what is trained ----------------------------------------------------------------------------


def _train_steps(model, trainable, tokenizer, steps=3):
    optimizer = torch.optim.AdamW(list(trainable.params.values()), lr=1e-2, weight_decay=0.0)
    ids, mask, labels = collate([encode_chat(tokenizer, "hi there", "a reply", 64)] * 2, 0)
    for _ in range(steps):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


@pytest.mark.parametrize("method", ["mesa", "safex", "router_only", "sft_all"])
def test_only_the_methods_parameters_change(method):
    tokenizer = byte_tokenizer()
    model = tiny_model("qwen3_moe", seed=0, router_std=0.5)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    moe = describe(model)
    per_expert = sum(p[0].numel() for p in moe.layers[0].experts.parameters(recurse=False))
    experts = [(0, 1), (1, 3)]
    model, trainable = make_trainable(model, method, experts)
    _train_steps(model, trainable, tokenizer)
    trainable.bake()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    routers = {n for n, _ in model.named_parameters() if n.endswith("mlp.gate.weight")}
    if method == "sft_all":
        assert routers < changed and any("self_attn" in n for n in changed)
        return
    if method == "router_only":
        assert changed == routers
        return
    assert (routers <= changed) == (method == "mesa")
    assert not any("self_attn" in n or "embed" in n for n in changed)
    for layer in moe.layers:
        for param in layer.experts.parameters(recurse=False):
            full = next(n for n, p in model.named_parameters() if p is param)
            for expert in range(moe.num_experts):
                same = torch.equal(param[expert], before[full][expert])
                assert same == ((layer.index, expert) not in experts), (full, expert)
    router_params = sum(layer.router.weight.numel() for layer in moe.layers)
    assert trainable.count() == 2 * per_expert + (router_params if method == "mesa" else 0)


def test_lora_trains_adapters_only():
    tokenizer = byte_tokenizer()
    model = tiny_model("qwen3_moe", seed=0)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    peft_model, trainable = make_trainable(model, "lora", lora_rank=4)
    assert trainable.params and all("lora_" in n for n in trainable.params)
    _train_steps(peft_model, trainable, tokenizer)
    merged = peft_model.merge_and_unload()
    changed = {n for n, p in merged.named_parameters() if not torch.equal(p, base[n])}
    assert changed and all("self_attn" in n for n in changed)


def test_reference_mode_is_the_untrained_model():
    tokenizer = byte_tokenizer()
    model = tiny_model("qwen3_moe", seed=0, router_std=0.5)
    ids, mask, _ = collate([encode_chat(tokenizer, "hello", "world", 64)], 0)
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask).logits
    model, trainable = make_trainable(model, "mesa", [(0, 1), (1, 3), (1, 5)])
    _train_steps(model, trainable, tokenizer)
    with torch.no_grad():
        trained = model(input_ids=ids, attention_mask=mask).logits
        with trainable.reference():
            reference = model(input_ids=ids, attention_mask=mask).logits
        again = model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(reference, before)
    assert not torch.allclose(trained, before) and torch.equal(again, trained)


def test_methods_that_train_experts_need_experts():
    with pytest.raises(ValueError, match="at least one"):
        make_trainable(tiny_model("qwen3_moe", seed=0), "safex", [])
    with pytest.raises(ValueError, match="out of range"):
        make_trainable(tiny_model("qwen3_moe", seed=0), "mesa", [(0, 99)])


# --- losses -------------------------------------------------------------------------------------


def test_router_target_tilts_safety_tokens_only():
    reference = torch.tensor([[0.4, 0.3, 0.2, 0.1], [0.4, 0.3, 0.2, 0.1]])
    safety = torch.tensor([True, False])
    selected = torch.tensor([False, False, True, False])
    target = router_targets(reference, safety, selected, tau=1.0)
    assert torch.allclose(target[1], reference[1])
    expected = reference[0] * torch.tensor([1 / torch.e, 1 / torch.e, 1.0, 1 / torch.e])
    assert torch.allclose(target[0], expected / expected.sum())
    assert torch.allclose(target.sum(-1), torch.ones(2))
    # No selected expert in a layer: a constant C~ cancels, the target is the reference.
    assert torch.allclose(router_targets(reference, safety, torch.zeros(4, dtype=torch.bool), 0.1), reference)


def test_ot_kl_loss_is_zero_at_the_reference_and_pulls_towards_selected():
    moe = describe(tiny_model("qwen3_moe", seed=0))
    logits = torch.randn(6, moe.num_experts)
    valid = torch.ones(6, dtype=torch.bool)
    selected = torch.zeros(1, moe.num_experts, dtype=torch.bool)
    selected[0, 2] = True
    general = torch.zeros(6, dtype=torch.bool)
    at_reference = ot_kl_loss([logits], [logits], moe.router, general, valid, selected, 1.0)
    assert at_reference.item() == pytest.approx(0, abs=1e-6)
    current = logits.clone().requires_grad_(True)
    loss = ot_kl_loss([current], [logits], moe.router, ~general, valid, selected, 1.0)
    assert loss.item() > 0
    loss.backward()
    assert (current.grad[:, 2] < 0).all()  # descending the loss raises the selected expert's logit
    # Padding tokens do not count.
    valid[3:] = False
    masked = ot_kl_loss([logits + torch.arange(6.0)[:, None] * torch.eye(6, moe.num_experts)[:, :]],
                        [logits], moe.router, general, valid, selected, 1.0)
    only_valid = ot_kl_loss([(logits + torch.arange(6.0)[:, None] * torch.eye(6, moe.num_experts))[:3]],
                            [logits[:3]], moe.router, general[:3], valid[:3], selected, 1.0)
    assert masked.item() == pytest.approx(only_valid.item(), rel=1e-6)


def test_weighted_lm_loss_weights_rows():
    logits = torch.randn(2, 5, 11)
    labels = torch.tensor([[-100, 3, 4, 5, -100], [-100, -100, 1, 2, 3]])
    full = weighted_lm_loss(logits, labels, torch.ones(2))
    import torch.nn.functional as F

    reference = F.cross_entropy(logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert full.item() == pytest.approx(reference.item(), rel=1e-6)
    first_only = weighted_lm_loss(logits, labels, torch.tensor([1.0, 0.0]))
    assert first_only.item() == pytest.approx(weighted_lm_loss(logits[:1], labels[:1], torch.ones(1)).item())


def test_encode_chat_puts_the_loss_on_the_answer_and_keeps_it_when_truncating():
    tokenizer = byte_tokenizer()
    ids, labels = encode_chat(tokenizer, "question " * 50, "the answer", 64)
    assert len(ids) == len(labels) <= 64
    answer = tokenizer.decode([t for t in labels if t != -100])
    assert answer.startswith("the answer") and answer.endswith("<|im_end|>")


def test_step_batches_are_a_function_of_seed_and_step():
    training = AlignmentConfig().training
    a = step_batch(7, 0, training, 100, 50)
    assert a == step_batch(7, 0, training, 100, 50)
    assert a != step_batch(8, 0, training, 100, 50)
    assert sum(kind == "general" for kind, _ in a) == round(training.batch_size * training.general_share)
    assert all(kind == "safety" for kind, _ in step_batch(7, 0, training, 100, 0))


def test_masking_augmentation_targets_the_current_safety_experts():
    import numpy as np

    from alignment.training import SafetyRouting, augmentation_mask

    harmful = np.array([[0.9, 0.8, 0.7, 0.1], [0.5, 0.2, 0.1, 0.0]])
    other = np.array([[0.1, 0.1, 0.1, 0.1], [0.1, 0.5, 0.1, 0.1]])
    routing = SafetyRouting(harmful, other, top_k=2)
    # Layer 0 holds the three riskiest pairs, but at most E - top_k = 2 of them may be masked.
    assert routing.top(3) == [(0, 0), (0, 1), (1, 0)]
    # Routing seen in training moves the estimate: layer 1 expert 3 becomes harmful-only.
    logits = [torch.tensor([[0.0, 0, 5, 5]] * 4), torch.tensor([[0.0, 0, 5, 5]] * 4)]
    moe = describe(tiny_model("qwen3_moe", seed=0))
    spec = moe.router.__class__(num_experts=4, top_k=2, renormalize=True)
    for _ in range(30):
        harmful = torch.tensor([True, True, False, False])
        routing.update(logits, spec, harmful, torch.ones(4, dtype=torch.bool))
    assert routing.harmful[1, 3] > 0.9 and routing.other[1, 3] > 0.9  # both kinds route there now

    training = AlignmentConfig(training={"mask_augmentation": 0.5, "mask_max": 3}).training
    draws = [augmentation_mask(step, 0, training, routing) for step in range(200)]
    assert draws == [augmentation_mask(step, 0, training, routing) for step in range(200)]
    masked = [d for d in draws if d]
    assert 60 < len(masked) < 140 and {len(d) for d in masked} == {1, 2, 3}
    assert all(d == routing.top(len(d)) for d in masked)
    off = AlignmentConfig().training
    assert all(augmentation_mask(step, 0, off, routing) == [] for step in range(50))
