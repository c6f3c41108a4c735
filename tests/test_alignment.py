"""MESA training pieces: config, data, what is trainable, the OT-KL router loss, batching."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from alignment.config import AlignmentConfig, load_config
from alignment.data import DataError, load_dataset
from alignment.loop import step_batch
from alignment.router_loss import TiltTarget, ot_kl_loss, router_targets
from alignment.trainable import make_trainable
from moe_routing.architectures import describe
from moe_routing.sft import collate, encode_chat, weighted_lm_loss
from moe_routing.threads import cpu_cores, shared_threads, torch_settings
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


def test_set_overrides_one_value_and_names_what_it_rejects():
    from alignment.config import with_settings

    config = with_settings(load_config(None), ["training.router_eps=0.5", "evaluation.suite.split=validation",
                                               "evaluation.suite.mask_counts=[1, 4]", "organism_preset=fine"])
    assert config.training.router_eps == 0.5 and config.evaluation.suite.split == "validation"
    assert config.evaluation.suite.mask_counts == [1, 4] and config.organism_preset == "fine"
    with pytest.raises(ValueError, match="training.router_epz: no such key"):
        with_settings(config, ["training.router_epz=1"])
    with pytest.raises(ValueError, match="seed is not a config section"):
        with_settings(config, ["seed.x=1"])
    with pytest.raises(ValueError, match="expected dotted.key=value"):
        with_settings(config, ["training.steps"])
    with pytest.raises(ValidationError, match="split"):
        with_settings(config, ["evaluation.suite.split=train"])
    with pytest.raises(ValidationError, match="organism_preset"):
        with_settings(config, ["organism_preset=huge"])


def test_a_run_resumes_only_with_its_own_config_and_the_refusal_names_what_changed(tmp_path):
    """run.json keeps the config a run was made with; a key added to the code since (absent
    there) counts only when it leaves its default, and a refusal names each changed setting."""
    from alignment.run import _check_output_dir, _digest

    defaults = AlignmentConfig().model_dump()
    config = load_config(None).model_dump()
    out = tmp_path / "run"
    _check_output_dir(out, config, "ckpt", defaults)
    _check_output_dir(out, config, "ckpt", defaults)  # the same run resumes

    # A run written before training.refusal_weight existed.
    older = json.loads(json.dumps(config))
    del older["training"]["refusal_weight"]
    fingerprint = {"config": older, "checkpoint": "ckpt"}
    (out / "run.json").write_text(json.dumps({"key": _digest(fingerprint), **fingerprint}))
    weighted = json.loads(json.dumps(config))
    weighted["training"]["refusal_weight"] = 2.0
    with pytest.raises(ValueError, match=r"training.refusal_weight: \(not set\) -> 2.0"):
        _check_output_dir(out, weighted, "ckpt", defaults)
    _check_output_dir(out, config, "ckpt", defaults)  # at its default it is the run it was
    assert json.loads((out / "run.json").read_text())["config"]["training"]["refusal_weight"] == 1.0

    changed = json.loads(json.dumps(config))
    changed["training"]["steps"] = 7
    with pytest.raises(ValueError, match=r"model: ckpt -> other; training.steps: 150 -> 7"):
        _check_output_dir(out, changed, "other", defaults)


def test_the_jobs_own_evaluation_runs_on_its_configured_threads(tmp_path, monkeypatch):
    import safety_eval.report
    import safety_eval.suite
    from alignment.run import evaluate_checkpoint

    seen = []
    monkeypatch.setattr(safety_eval.suite, "run_suite",
                        lambda checkpoint, settings, log: seen.append(torch.get_num_threads()) or {})
    monkeypatch.setattr(safety_eval.report, "write_report", lambda report, out: None)
    before = torch.get_num_threads()
    config = AlignmentConfig.model_validate({"evaluation": {"threads": before + 1}})
    evaluate_checkpoint("ckpt", config, tmp_path)
    assert seen == [before + 1] and torch.get_num_threads() == before  # restored afterwards
    # Unset: every core the process may use, even where the process starts at one thread (a
    # `ray job submit` entrypoint inherits OMP_NUM_THREADS=1).
    with torch_settings(1):
        evaluate_checkpoint("ckpt", AlignmentConfig(), tmp_path)
    assert seen[-1] == cpu_cores()
    with pytest.raises(ValidationError, match="threads"):
        AlignmentConfig.model_validate({"evaluation": {"threads": 0}})


def test_a_report_from_before_the_device_settings_is_kept(tmp_path, monkeypatch):
    """Reports written before `device` and `dtype` existed were measured at their defaults (cpu,
    float32): a rerun reads them back instead of evaluating again; other settings do not match."""
    import safety_eval.report
    import safety_eval.suite
    from alignment.run import evaluate_checkpoint

    evaluated = []
    monkeypatch.setattr(safety_eval.suite, "run_suite",
                        lambda checkpoint, settings, log: evaluated.append(settings) or {})
    monkeypatch.setattr(safety_eval.report, "write_report", lambda report, out: None)
    settings = AlignmentConfig().evaluation.suite.model_dump(mode="json")
    old = {"checkpoint": "ckpt", "rates": {}, "settings": {k: v for k, v in settings.items()
                                                          if k not in ("device", "dtype")}}
    (tmp_path / "report.json").write_text(json.dumps(old))
    assert evaluate_checkpoint("ckpt", AlignmentConfig(), tmp_path) == old and not evaluated
    other = AlignmentConfig.model_validate({"evaluation": {"suite": {"dtype": "bfloat16"}}})
    evaluate_checkpoint("ckpt", other, tmp_path)
    assert [s.dtype for s in evaluated] == ["bfloat16"]


def test_the_jobs_evaluation_is_on_a_gpu_when_its_device_or_trainings_says_so():
    from alignment.run import evaluation_on_gpu

    def on_gpu(device, use_gpu):
        return evaluation_on_gpu(AlignmentConfig.model_validate(
            {"training": {"use_gpu": use_gpu}, "evaluation": {"suite": {"device": device}}}))

    assert [on_gpu("auto", False), on_gpu("auto", True)] == [False, True]
    assert [on_gpu("cuda", False), on_gpu("cuda:0", False), on_gpu("cpu", True)] == [True, True, False]


def test_replicates_side_by_side_share_the_cores_unless_the_config_sets_threads(monkeypatch):
    import moe_routing.threads
    from alignment.compare import sharing_cores

    monkeypatch.setattr(moe_routing.threads, "cpu_cores", lambda: 8)
    assert sharing_cores(AlignmentConfig(), 3).evaluation.threads == 2  # 8 cores / 3 jobs
    assert sharing_cores(AlignmentConfig(), 16).evaluation.threads == 1  # never below one
    pinned = AlignmentConfig.model_validate({"evaluation": {"threads": 5}})
    assert sharing_cores(pinned, 2).evaluation.threads == 5


def test_the_organism_presets_the_alignment_config_names_exist():
    from typing import get_args

    from alignment.config import AlignmentConfig
    from organism.build import PRESETS

    assert set(get_args(AlignmentConfig.model_fields["organism_preset"].annotation)) == set(PRESETS)


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


@pytest.mark.parametrize("method", ["mesa", "mesa_paper", "safex", "router_only", "sft_all"])
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
    assert (routers <= changed) == method.startswith("mesa")
    assert not any("self_attn" in n or "embed" in n for n in changed)
    for layer in moe.layers:
        for param in layer.experts.parameters(recurse=False):
            full = next(n for n, p in model.named_parameters() if p is param)
            for expert in range(moe.num_experts):
                same = torch.equal(param[expert], before[full][expert])
                assert same == ((layer.index, expert) not in experts), (full, expert)
    router_params = sum(layer.router.weight.numel() for layer in moe.layers)
    assert trainable.count() == 2 * per_expert + (router_params if method.startswith("mesa") else 0)


@pytest.mark.parametrize("training_dtype", ["float32", "bfloat16"])
def test_the_export_keeps_the_bases_dtype_and_every_weight_training_did_not_touch(tmp_path, training_dtype):
    """A bf16 base stays bf16 (it was saved in float32, twice the size, and loaded so on the host),
    with the trained values in its selected rows; the training's dtype changes neither."""
    from safetensors.torch import load_file

    from alignment.export import export_checkpoint
    from alignment.loop import TRAINABLE_FILE
    from moe_routing.profiler import load_checkpoint

    base_dir, trained_dir = tmp_path / "base", tmp_path / "trained"
    base = tiny_model("qwen3_moe", seed=0).to(torch.bfloat16)
    base.save_pretrained(base_dir)
    byte_tokenizer().save_pretrained(base_dir)
    experts = [(0, 1), (1, 3)]
    config = AlignmentConfig.model_validate({"training": {"method": "mesa", "dtype": training_dtype}})
    trained = tiny_model("qwen3_moe", seed=0).to(getattr(torch, training_dtype))
    _, trainable = make_trainable(trained, "mesa", experts)
    with torch.no_grad():
        for param in trainable.params.values():
            param.add_(0.25)
    trained_dir.mkdir()
    torch.save(trainable.state(), trained_dir / TRAINABLE_FILE)
    out = export_checkpoint(config, base_dir, trained_dir, experts, tmp_path / "model", {})

    assert {t.dtype for t in load_file(out / "model.safetensors").values()} == {torch.bfloat16}
    exported, _ = load_checkpoint(out, dtype="auto")
    moe = describe(base)
    rows = {moe.layers[layer].decoder_index: [] for layer, _ in experts}
    for layer, expert in experts:
        rows[moe.layers[layer].decoder_index].append(expert)
    for (name, value), original in zip(exported.named_parameters(), base.parameters(), strict=True):
        layer = int(name.split(".")[2]) if name.startswith("model.layers.") else None
        if name.endswith("mlp.gate.weight") and layer in rows:  # a trained router: its trained value
            assert torch.equal(value, trainable.params[name].detach().to(torch.bfloat16)), name
        elif ".mlp.experts." in name and layer in rows:
            trained_rows = rows[layer]
            others = [e for e in range(moe.num_experts) if e not in trained_rows]
            assert torch.equal(value[others], original[others]), name
            assert torch.equal(value[trained_rows], (original[trained_rows].float() + 0.25).bfloat16()), name
        else:
            assert torch.equal(value, original), name


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
    at_reference = ot_kl_loss([logits], [logits], moe.router, general, valid, TiltTarget(selected, 1.0))
    assert at_reference.item() == pytest.approx(0, abs=1e-6)
    current = logits.clone().requires_grad_(True)
    loss = ot_kl_loss([current], [logits], moe.router, ~general, valid, TiltTarget(selected, 1.0))
    assert loss.item() > 0
    loss.backward()
    assert (current.grad[:, 2] < 0).all()  # descending the loss raises the selected expert's logit
    # Padding tokens do not count.
    valid[3:] = False
    masked = ot_kl_loss([logits + torch.arange(6.0)[:, None] * torch.eye(6, moe.num_experts)[:, :]],
                        [logits], moe.router, general, valid, TiltTarget(selected, 1.0))
    only_valid = ot_kl_loss([(logits + torch.arange(6.0)[:, None] * torch.eye(6, moe.num_experts))[:3]],
                            [logits[:3]], moe.router, general[:3], valid[:3], TiltTarget(selected, 1.0))
    assert masked.item() == pytest.approx(only_valid.item(), rel=1e-6)


def test_token_transport_matches_the_hand_computed_plan():
    # Two tokens, two experts, uniform marginals: pi = [[x, 1/2 - x], [1/2 - x, x]], and the
    # entropic optimum has x^2 / (1/2 - x)^2 = K11 K22 / (K12 K21) with K = P_ref exp(-C) (eps 1).
    import math

    from alignment.router_loss import token_transport

    reference = torch.tensor([[0.6, 0.4], [0.3, 0.7]])
    cost = torch.tensor([1.0, 1.5])
    ratio = math.sqrt((0.6 * 0.7) / (0.4 * 0.3))  # the cost cancels in the cross ratio
    x = 0.5 * ratio / (1 + ratio)
    plan = token_transport(reference, cost, 1.0)
    torch.testing.assert_close(plan, torch.tensor([[x, 0.5 - x], [0.5 - x, x]], dtype=torch.float64))


def test_transport_target_spreads_safety_tokens_over_the_safety_set():
    from alignment.router_loss import TransportTarget

    torch.manual_seed(0)
    # Every token prefers expert 0 today; the safety set is {0, 2, 5}.
    reference = torch.softmax(torch.randn(300, 8) + torch.tensor([3.0] + [0.0] * 7), dim=-1)
    safety = torch.arange(300) < 200
    members = torch.zeros(1, 8, dtype=torch.bool)
    members[0, [0, 2, 5]] = True
    target = TransportTarget(members, torch.ones(1, 8), 1.0)(0, reference, safety)
    assert torch.equal(target[~safety], reference[~safety])  # general tokens keep P_ref
    torch.testing.assert_close(target.sum(dim=-1), torch.ones(300))
    assert target[safety][:, ~members[0]].abs().max() == 0  # nothing outside D
    load = target[safety].mean(dim=0)[members[0]]
    torch.testing.assert_close(load, torch.full((3,), 1 / 3), atol=1e-6, rtol=0)  # 1/|D| each
    # Different tokens land on different top-2 subsets of D (not one new path).
    subsets = {tuple(sorted(row.tolist())) for row in target[safety].topk(2, dim=-1).indices}
    assert len(subsets) == 3
    # No safety token, or no safety set in the layer: the reference.
    assert torch.equal(TransportTarget(members, torch.ones(1, 8), 1.0)(0, reference, ~torch.ones(300).bool()),
                       reference)


def _two_worker_losses(rank: int, init: str, reference, current, safety, members, out):
    """One gloo worker of `test_two_gloo_workers_compute_the_one_worker_loss_and_gradient`: rows
    rank::2, the loss divided by global counts as the training loop does."""
    from alignment.distributed import global_sum
    from alignment.router_loss import TransportTarget

    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        moe = describe(tiny_model("qwen3_moe", seed=0))
        rows = torch.arange(current.shape[0])[rank::2]
        mine = current[rows].clone().requires_grad_(True)
        valid = torch.ones(len(rows), dtype=torch.bool)
        target = TransportTarget(members, torch.ones(1, moe.num_experts), 1.0)
        tokens = global_sum(valid.sum().float()) / 2
        loss = ot_kl_loss([mine], [reference[rows]], moe.router, safety[rows], valid, target, tokens)
        loss.backward()
        torch.save({"loss": loss.detach(), "rows": rows, "grad": mine.grad}, f"{out}.{rank}")
    finally:
        torch.distributed.destroy_process_group()


def test_two_gloo_workers_compute_the_one_worker_loss_and_gradient(tmp_path):
    """The token transport plan is solved over both workers' safety tokens, and the KL sums are
    divided by the global token count over 2: the workers' losses average to one worker's loss
    and their gradients (what DDP averages, times 2) are one worker's."""
    import torch.multiprocessing as mp

    moe = describe(tiny_model("qwen3_moe", seed=0))
    torch.manual_seed(0)
    reference, current = torch.randn(2, 15, moe.num_experts)
    safety = torch.arange(15) % 3 != 0
    members = torch.zeros(1, moe.num_experts, dtype=torch.bool)
    members[0, [1, 3, 4]] = True
    out = tmp_path / "worker"
    mp.spawn(_two_worker_losses, nprocs=2, join=True,
             args=(f"file://{tmp_path / 'store'}", reference, current, safety, members, str(out)))
    from alignment.router_loss import TransportTarget

    whole = current.clone().requires_grad_(True)
    loss = ot_kl_loss([whole], [reference], moe.router, safety, torch.ones(15, dtype=torch.bool),
                      TransportTarget(members, torch.ones(1, moe.num_experts), 1.0))
    loss.backward()
    parts = [torch.load(f"{out}.{rank}") for rank in range(2)]
    torch.testing.assert_close((parts[0]["loss"] + parts[1]["loss"]) / 2, loss.detach())
    for part in parts:
        torch.testing.assert_close(part["grad"] / 2, whole.grad[part["rows"]])


def test_ot_kl_loss_with_the_transport_target_pulls_towards_the_safety_set():
    from alignment.router_loss import TransportTarget

    moe = describe(tiny_model("qwen3_moe", seed=0))
    logits = torch.randn(12, moe.num_experts)
    members = torch.zeros(1, moe.num_experts, dtype=torch.bool)
    members[0, [1, 3]] = True
    target = TransportTarget(members, torch.ones(1, moe.num_experts), 1.0)
    valid = torch.ones(12, dtype=torch.bool)
    current = logits.clone().requires_grad_(True)
    loss = ot_kl_loss([current], [logits], moe.router, valid, valid, target)
    loss.backward()
    outside = [e for e in range(moe.num_experts) if e not in (1, 3)]
    assert loss.item() > 0 and (current.grad[:, outside] > 0).all()  # descending lowers them


def test_forced_routes_draw_k_subsets_of_the_safety_set_for_harmful_rows():
    from alignment.augment import forced_routes

    training = AlignmentConfig(training={"forced_routes": 0.5}).training
    safety_set = {0: [1, 2, 5], 1: [4], 2: [0, 3, 6, 7]}
    harmful = [True, False, True]
    draws = [forced_routes(step, 0, training, safety_set, 2, harmful, 5) for step in range(100)]
    again = [forced_routes(step, 0, training, safety_set, 2, harmful, 5) for step in range(100)]
    assert all(a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a) for a, b in zip(draws, again))
    forced = [d for d in draws if d]
    assert 30 < len(forced) < 70
    seen = set()
    for draw in forced:
        assert set(draw) == {0, 2}  # layer 1 has fewer than k members: left alone
        for layer, rows in draw.items():
            assert rows.shape == (3, 5, 2) and (rows[1] == -1).all()
            for row in (0, 2):
                pair = rows[row, 0].tolist()
                assert (rows[row] == rows[row, 0]).all() and set(pair) <= set(safety_set[layer])
                seen.add((layer, tuple(pair)))
    assert len({p for layer, p in seen if layer == 0}) == 3  # every 2-subset of {1, 2, 5} drawn
    off = AlignmentConfig(training={"forced_routes": 0.0}).training
    assert all(forced_routes(s, 0, off, safety_set, 2, harmful, 5) == {} for s in range(20))
    assert all(forced_routes(s, 0, training, safety_set, 2, [False] * 3, 5) == {} for s in range(20))


def test_forced_routes_never_draw_a_masked_expert():
    """Masking augmentation and forced routes on one step: a token forced onto a masked expert has
    no finite routing weight (a fine organism's training loss went NaN at such a step)."""
    from alignment.augment import forced_routes

    training = AlignmentConfig(training={"forced_routes": 1.0}).training
    safety_set, harmful = {0: [1, 2, 5], 1: [0, 3, 4]}, [True, True]
    for step in range(20):
        forced = forced_routes(step, 0, training, safety_set, 2, harmful, 3, masked=[(0, 1), (1, 0), (1, 3)])
        assert set(forced) == {0}  # layer 1 keeps one unmasked member: not forced
        assert sorted(forced[0][0, 0].tolist()) == [2, 5]
    unmasked = forced_routes(0, 0, training, safety_set, 2, harmful, 3)
    assert set(unmasked) == {0, 1}


def test_each_kind_of_draw_has_its_own_stream_for_every_seed():
    """Seed 0 used to give every purpose the stream Random(step): a step's forced-route coin was its
    mask coin. Now the coins of one step are independent."""
    import numpy as np

    from alignment.augment import SafetyRouting, augmentation_mask, forced_routes

    training = AlignmentConfig(training={"forced_routes": 0.5, "mask_augmentation": 0.5}).training
    routing = SafetyRouting(np.eye(2, 8), np.zeros((2, 8)), top_k=2)
    for seed in (0, 1):
        forced = {s for s in range(200) if forced_routes(s, seed, training, {0: [1, 2, 3]}, 2, [True], 3)}
        masked = {s for s in range(200) if augmentation_mask(s, seed, training, routing)}
        both = len(forced & masked)
        assert 25 < both < 75, (seed, both)  # about 200 / 4 when independent, not 100


def test_the_method_table_drives_what_trains():
    from alignment.methods import ABLATIONS, METHODS

    config = AlignmentConfig.model_validate({"training": {"method": "mesa_paper"},
                                             "allocation": {"eps": 0.7, "selection": "coverage"}})
    # mesa_paper pins the paper's selection, eps, router target; the rest of the config stays.
    assert (config.allocation.selection, config.allocation.eps, config.training.router_target,
            config.training.forced_routes) == ("top_w", 0.1, "tilt", 0.0)
    mesa = AlignmentConfig()
    assert (mesa.allocation.selection, mesa.training.router_target) == ("coverage", "transport")
    assert mesa.training.general_replay > 0  # replay on by default, for every method
    # An ablation switches back a setting that the paper's method pins.
    assert all(set(settings) <= set(METHODS["mesa_paper"].pinned) for settings in ABLATIONS.values())
    assert {m.name for m in METHODS.values() if m.router_loss} == {"mesa", "mesa_paper"}
    with pytest.raises(ValueError, match="unknown training method"):
        make_trainable(tiny_model("qwen3_moe", seed=0), "dpo")


def test_ablation_rows_switch_one_part_back():
    from alignment.compare import row_config

    config = AlignmentConfig()
    rows = {row: row_config(config, row, Path("/tmp/rows"), 0.5)
            for row in ("mesa", "mesa_paper", "mesa_no_coverage", "mesa_no_transport", "mesa_no_forced+mask")}
    parts = {row: (c.training.method, c.allocation.selection, c.training.router_target,
                   c.training.forced_routes, c.training.mask_augmentation) for row, c in rows.items()}
    assert parts == {
        "mesa": ("mesa", "coverage", "transport", 0.25, 0.0),
        "mesa_paper": ("mesa_paper", "top_w", "tilt", 0.0, 0.0),
        "mesa_no_coverage": ("mesa", "top_w", "transport", 0.25, 0.0),
        "mesa_no_transport": ("mesa", "coverage", "tilt", 0.25, 0.0),
        "mesa_no_forced+mask": ("mesa", "coverage", "transport", 0.0, 0.5),
    }
    assert rows["mesa_no_forced+mask"].output_dir.endswith("mesa_no_forced-mask")


def test_training_loss_under_masks_and_forced_routes_trains_the_safety_set():
    from alignment.loop import Batch, router_target, training_loss
    from moe_routing.instrument import capture_router_logits

    tokenizer = byte_tokenizer()
    model = tiny_model("qwen3_moe", seed=0, router_std=0.5)
    moe = describe(model)
    members = [(0, 1), (0, 3), (0, 5), (1, 0), (1, 2), (1, 6)]
    model, trainable = make_trainable(model, "mesa", members)
    safety_set = torch.zeros(moe.num_layers, moe.num_experts, dtype=torch.bool)
    for layer, expert in members:
        safety_set[layer, expert] = True
    training = AlignmentConfig().training
    target = router_target(training, safety_set, torch.ones(moe.num_layers, moe.num_experts))
    ids, mask, labels = collate([encode_chat(tokenizer, "how to harm", "I can't help", 64),
                                 encode_chat(tokenizer, "capital of France", "Paris", 64)], 0)
    batch = Batch(ids, mask, labels, torch.tensor([True, False]), torch.ones(2))
    length = ids.shape[1]
    forced = {0: torch.tensor([[[1, 5]] * length, [[-1, -1]] * length]),
              1: torch.tensor([[[0, 6]] * length, [[-1, -1]] * length])}
    losses = {}
    variants = {"plain": {}, "masked": {"masked": [(0, 0)]}, "forced": {"forced": forced}}
    with capture_router_logits(model) as capture:
        for name, routes in variants.items():
            loss, sft, router, _ = training_loss(model, trainable, capture, batch, spec=moe.router,
                                                 target=target, training=training, **routes)
            model.zero_grad()
            loss.backward()
            assert torch.isfinite(loss) and router > 0  # raw logits: the mask's bias never enters
            grads = {n: p.grad for n, p in trainable.params.items()}
            assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
            losses[name] = sft.item()
    assert len(set(losses.values())) == 3  # each routing changes what the SFT loss sees


def test_weighted_lm_loss_weights_rows():
    logits = torch.randn(2, 5, 11)
    labels = torch.tensor([[-100, 3, 4, 5, -100], [-100, -100, 1, 2, 3]])
    full = weighted_lm_loss(logits, labels, torch.ones(2))
    import torch.nn.functional as F

    reference = F.cross_entropy(logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert full.item() == pytest.approx(reference.item(), rel=1e-6)
    first_only = weighted_lm_loss(logits, labels, torch.tensor([1.0, 0.0]))
    assert first_only.item() == pytest.approx(weighted_lm_loss(logits[:1], labels[:1], torch.ones(1)).item())


def test_batch_row_weights_follow_the_kind_of_row():
    """Harmful D_safe rows weigh refusal_weight, benign D_safe rows 1, D_general rows general_replay."""
    from alignment.data import Example
    from alignment.loop import make_batch

    tokenizer = byte_tokenizer()
    examples = {"safety": [Example("how to harm", "no", True),
                           Example("how do locks work", "like so", False)],
                "general": [Example("2 + 2", "4", False)]}
    encoded = {kind: [encode_chat(tokenizer, e.prompt, e.response, 64) for e in rows]
               for kind, rows in examples.items()}
    training = AlignmentConfig().training.model_copy(update={"refusal_weight": 2.5, "general_replay": 0.5})
    batch = make_batch([("general", 0), ("safety", 1), ("safety", 0)], encoded, examples,
                       tokenizer.pad_token_id, training, "cpu")
    assert batch.row_weight.tolist() == [0.5, 1.0, 2.5]
    assert batch.harmful.tolist() == [False, False, True]


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

    from alignment.augment import SafetyRouting, augmentation_mask

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


# --- the learning-rate schedule (shared with the organism) ---------------------------------------


def test_warmup_cosine_closed_form():
    import math

    from moe_routing.sft import warmup_cosine

    # Warmup: (step + 1) / warmup, reaching 1 on the last warmup step.
    assert [warmup_cosine(s, 4, 20) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    # Cosine from 1 at the end of warmup to the floor at total_steps, half way at the midpoint.
    assert warmup_cosine(4, 4, 20) == 1.0
    assert warmup_cosine(12, 4, 20) == pytest.approx(0.1 + 0.9 * 0.5)
    assert warmup_cosine(8, 4, 20) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert warmup_cosine(20, 4, 20) == pytest.approx(0.1)
    assert warmup_cosine(35, 4, 20) == pytest.approx(0.1)  # held at the floor past the end
    assert warmup_cosine(5, 0, 10, floor=0.0) == pytest.approx(0.5)
    assert warmup_cosine(0, 0, 10, floor=0.25) == 1.0


def test_both_trainers_use_the_shared_schedule():
    from alignment.config import TrainingConfig
    from alignment.loop import learning_rate_factor
    from moe_routing.sft import warmup_cosine

    training = TrainingConfig(steps=30, warmup_steps=5)
    steps = range(31)
    assert [learning_rate_factor(s, training) for s in steps] == [warmup_cosine(s, 5, 30) for s in steps]
    source = (Path(__file__).parent.parent / "organism" / "build.py").read_text()
    assert "warmup_cosine(step, stage.warmup_steps, stage.steps" in source


# --- checkpoint names ----------------------------------------------------------------------------


def test_checkpoint_resolution_rules(tmp_path):
    from moe_routing.architectures import UnsupportedArchitectureError
    from organism.checkpoint import resolve_checkpoint

    with pytest.raises(ValueError, match="checkpoint directory not found: ./no/such"):
        resolve_checkpoint("./no/such")
    with pytest.raises(ValueError, match="no config.json"):
        resolve_checkpoint(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(UnsupportedArchitectureError, match="llama"):
        resolve_checkpoint(str(tmp_path))
    assert resolve_checkpoint(str(tmp_path), check_architecture=False) == str(tmp_path.resolve())
    assert resolve_checkpoint("Qwen/Qwen3-30B-A3B", check_architecture=False) == "Qwen/Qwen3-30B-A3B"
    from alignment.run import resolve_model

    with pytest.raises(ValueError, match="model: checkpoint directory not found"):
        resolve_model(AlignmentConfig(model="/no/such/dir"))


# --- seeds: the organism's split, not the training seed ------------------------------------------


def test_training_seed_never_changes_the_data_split(tmp_path):
    from alignment.data import split_settings

    organism = tmp_path / "org"
    organism.mkdir()
    (organism / "organism.json").write_text(json.dumps({"config": {"seed": 3, "harmful_test_fraction": 0.2}}))
    for seed in (0, 5):
        config = AlignmentConfig(seed=seed, organism_seed=3)
        assert split_settings(config, organism) == {"seed": 3, "harmful_test_fraction": 0.2}
        assert split_settings(config) == {"seed": 3}  # model "organism", before it is resolved
        assert split_settings(AlignmentConfig(model=str(tmp_path), seed=seed), tmp_path) == {"seed": 0}
    first = load_dataset("safety", AlignmentConfig(seed=0))
    second = load_dataset("safety", AlignmentConfig(seed=1))
    assert {e.prompt for e in first} == {e.prompt for e in second}


# --- compare over seeds (plumbing, with the job and the suite faked) ------------------------------


def _fake_evaluation(refused: list[bool], accuracy: float) -> dict:
    rate = sum(refused) / len(refused)
    return {
        "summary": {"safety_rate": rate, "general_accuracy": accuracy,
                    "effective_safety_experts": 4.0 + rate},
        "masking": {"targeted": {"4": rate / 2, "6": rate / 3, "8": rate / 4}},
        "verdicts": {"plain": {"verdicts": ["refused" if r else "complied" for r in refused]}},
    }


def test_compare_runs_replicates_and_reports_mean_sd_and_paired_tests(tmp_path, monkeypatch):
    import alignment.run
    from alignment.compare import Replicate, compare, replicates
    from alignment.report import table_row

    calls = []

    def resolve(config):
        calls.append(("resolve", config.organism_seed, config.seed))
        return f"/organisms/{config.organism_seed}"

    def evaluate(checkpoint, config, out):
        calls.append(("base", checkpoint, out.name))
        return _fake_evaluation([True] * 5 + [False] * 5, 0.9)

    def run(config):
        calls.append(("run", config.organism_seed, config.seed, config.training.method, config.output_dir))
        refused = 5 + config.seed + (2 if config.training.method == "mesa" else 0)
        return {
            "evaluation": {"aligned": table_row(_fake_evaluation([True] * refused + [False] * (10 - refused),
                                                                 0.8))},
            "parameters": {"trainable": 10, "fraction": 0.5},
            "training": {"final": {"seconds": 1.0 + config.seed}},
        }

    monkeypatch.setattr(alignment.run, "resolve_model", resolve)
    monkeypatch.setattr(alignment.run, "evaluate_checkpoint", evaluate)
    monkeypatch.setattr(alignment.run, "run", run)
    config = AlignmentConfig()
    pairs = replicates(config, [0, 1, 2])
    assert pairs == [Replicate(0, 0), Replicate(1, 1), Replicate(2, 2)]
    assert replicates(config, [0, 1, 2], [7]) == [Replicate(7, 0), Replicate(7, 1), Replicate(7, 2)]
    with pytest.raises(ValueError, match="as many"):
        replicates(config, [0, 1, 2], [0, 1])
    with pytest.raises(ValueError, match="organism only"):
        replicates(AlignmentConfig(model="Qwen/Qwen3-30B-A3B"), [0, 1, 2], [1])

    results = compare(config, tmp_path, ["sft_all", "mesa"], 0.5, replicates(config, [0, 1, 2], [7]))
    # One organism: its base evaluated once; each method once per training seed, seeds decoupled.
    assert [c for c in calls if c[0] == "base"] == [("base", "/organisms/7", "base-organism7")]
    runs = [c for c in calls if c[0] == "run"]
    expected = [(7, s, m) for s in (0, 1, 2) for m in ("sft_all", "mesa")]
    assert [(o, s, m) for _, o, s, m, _ in runs] == expected
    assert runs[0][4] == str(tmp_path / "organism7-seed0" / "sft_all")

    mesa = results["aggregate"]["mesa"]["safety_rate"]
    assert mesa["values"] == [0.7, 0.8, 0.9] and mesa["mean"] == pytest.approx(0.8)
    assert mesa["sd"] == pytest.approx(0.1)
    assert results["aggregate"]["base"]["safety_rate"]["sd"] == 0.0
    assert [t["b"] for t in results["mcnemar"]["sft_all"]] == [0, 0, 0]
    assert [t["c"] for t in results["mcnemar"]["mesa"]] == [2, 3, 4]
    assert results["train_seconds"]["mesa"]["mean"] == pytest.approx(2.0)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert [r["name"] for r in saved["replicates"]] == [f"organism7-seed{s}" for s in (0, 1, 2)]
    markdown = (tmp_path / "results.md").read_text()
    assert "80.0 ± 10.0" in markdown  # mesa's Safety Rate, mean ± sd in percent
    assert "### organism7-seed2" in markdown and "McNemar p per seed" in markdown


def test_compare_command_needs_three_seeds(capsys):
    from alignment.compare import main

    assert main(["--seeds", "0,1", "--methods", "mesa"]) == 2
    assert "at least 3" in capsys.readouterr().err


def test_a_half_copied_checkpoint_is_skipped_on_resume(tmp_path):
    """Ray copies a reported checkpoint file by file; a job killed mid-copy leaves a state file
    that does not load. Resuming takes the newest checkpoint that loads, whatever the folder names."""
    from alignment.loop import STATE_FILE, checkpoint_directories

    for name, step in [("checkpoint_a", 4), ("checkpoint_b", 8)]:
        (tmp_path / name).mkdir()
        torch.save({"step": step}, tmp_path / name / STATE_FILE)
    whole = (tmp_path / "checkpoint_b" / STATE_FILE).read_bytes()
    (tmp_path / "checkpoint_c").mkdir()
    (tmp_path / "checkpoint_c" / STATE_FILE).write_bytes(whole[: len(whole) // 2])  # killed mid-copy
    (tmp_path / "checkpoint_d").mkdir()  # killed before the first file
    assert checkpoint_directories(tmp_path) == [tmp_path / "checkpoint_b", tmp_path / "checkpoint_a"]


def _square_loudly(x):
    print(f"squaring {x}", flush=True)
    if x < 0:
        raise ValueError(f"no square for {x} here")
    return x * x, torch.get_num_threads()


@pytest.mark.ray
def test_replicates_side_by_side_run_in_their_own_processes_with_their_own_logs(tmp_path):
    """compare --jobs: each task in a fresh process at cores/jobs threads, its output in its own
    log, results in the order given; a failure reaches the caller with the task's name logged."""
    from alignment.compare import _in_parallel

    results = _in_parallel([(f"task{x}", _square_loudly, (x,)) for x in (3, 4, 5)], 2, tmp_path)
    threads = shared_threads(2)
    assert results == [(9, threads), (16, threads), (25, threads)]
    assert (tmp_path / "task4.log").read_text() == "squaring 4\n"
    with pytest.raises(ValueError, match="no square for -1"):
        _in_parallel([("fine", _square_loudly, (2,)), ("broken", _square_loudly, (-1,))], 2, tmp_path)
    assert "squaring -1" in (tmp_path / "broken.log").read_text()


def _ray_cluster_address(_):
    import ray

    from moe_routing.ray_cluster import init_ray

    init_ray(log=lambda *_: None)
    return ray.get_runtime_context().gcs_address


@pytest.mark.ray
def test_replicates_side_by_side_share_one_ray_instance(tmp_path):
    """Each job starting its own local Ray instance on one machine breaks Ray's address lookup
    (Ray Train's placement group cleaner fails with 'Found multiple active Ray instances')."""
    import ray

    from alignment.compare import _in_parallel

    addresses = _in_parallel([(f"job{i}", _ray_cluster_address, (i,)) for i in range(3)], 2, tmp_path)
    assert len(set(addresses)) == 1
    assert not ray.is_initialized() and "RAY_ADDRESS" not in os.environ  # the instance ended with the jobs


@pytest.mark.ray
def test_the_base_evaluation_waits_for_training_without_a_cpu_or_the_memory_to_spare(tmp_path):
    """Ray Train gives up on workers it cannot place within a minute, and training's memory check
    counted on the host memory it measured: the base evaluation must take neither, so without
    them to spare it is not started beside training."""
    import ray

    from alignment.run import evaluate_beside_training
    from moe_routing.ray_cluster import init_ray

    checkpoint = tmp_path / "tiny"
    tiny_model("qwen3_moe").config.save_pretrained(checkpoint)
    plenty = 2**40
    init_ray("local", num_cpus=2, include_dashboard=False, log_to_driver=False, log=lambda *_: None)
    try:
        every_cpu = AlignmentConfig.model_validate({"training": {"num_workers": 2}})
        assert evaluate_beside_training(str(checkpoint), every_cpu, tmp_path, plenty) is None
        two_threads = AlignmentConfig.model_validate({"evaluation": {"threads": 2}})  # 1 CPU left
        assert evaluate_beside_training(str(checkpoint), two_threads, tmp_path, plenty) is None
        # Host memory: too little left beside training, or not measured (GPU training).
        assert evaluate_beside_training(str(checkpoint), AlignmentConfig(), tmp_path, 1024) is None
        assert evaluate_beside_training(str(checkpoint), AlignmentConfig(), tmp_path, None) is None
        # An evaluation on a GPU (the suite's device, or auto with GPU training) keeps the old order.
        on_gpu = AlignmentConfig.model_validate({"evaluation": {"suite": {"device": "cuda"}}})
        assert evaluate_beside_training(str(checkpoint), on_gpu, tmp_path, plenty) is None
        assert ray.available_resources().get("CPU") == 2  # nothing was started
    finally:
        ray.shutdown()


@pytest.mark.ray
def test_a_gpu_evaluation_on_a_cluster_without_gpus_is_refused_before_any_work():
    """It would wait for a GPU forever, after hours of training."""
    import ray

    from alignment.run import check_evaluation_layout
    from moe_routing.ray_cluster import init_ray

    def check(use_gpu=False, device="auto", enabled=True):
        evaluation = {"enabled": enabled, "suite": {"device": device}}
        check_evaluation_layout(AlignmentConfig.model_validate({"training": {"use_gpu": use_gpu},
                                                                "evaluation": evaluation}))

    init_ray("local", num_cpus=1, num_gpus=0, include_dashboard=False, log_to_driver=False,
             log=lambda *_: None)
    try:
        for use_gpu, device in [(True, "auto"), (False, "cuda")]:
            with pytest.raises(ValueError, match=f"device {device} .* but the Ray cluster has none"):
                check(use_gpu, device)
        check()  # the organism: on the CPU
        check(use_gpu=True, enabled=False)
        check(use_gpu=True, device="cpu")
        with pytest.raises(ValueError, match="device cuda:1: the job's evaluation is a Ray task holding one"):
            check(device="cuda:1")
    finally:
        ray.shutdown()


def evaluate_with_gpu_training(checkpoint, out: Path, gpus: int) -> dict:
    """The job's evaluation of `checkpoint` as GPU training has it: a Ray task holding a GPU, on a
    local Ray instance with `gpus` GPUs (Ray counts logical ones where the machine has none)."""
    import ray
    from test_suite import SMALL

    from alignment.run import check_evaluation_layout, evaluate_checkpoint
    from moe_routing.ray_cluster import init_ray

    config = AlignmentConfig.model_validate({"training": {"use_gpu": True},
                                             "evaluation": {"suite": SMALL | {"jailbreak": False}}})
    init_ray("local", num_cpus=2, num_gpus=gpus, include_dashboard=False, log_to_driver=False,
             log=lambda *_: None)
    try:
        check_evaluation_layout(config)
        return evaluate_checkpoint(str(checkpoint), config, out)
    finally:
        ray.shutdown()


@pytest.mark.ray
@pytest.mark.slow
def test_with_gpu_training_the_evaluation_is_a_ray_task_holding_a_gpu(quick_organism, tmp_path, capsys):
    """A cluster whose GPU is logical only: the task is placed and runs, on the CPU (device auto),
    and its report comes back and is written where the job reads it."""
    report = evaluate_with_gpu_training(quick_organism, tmp_path, gpus=1)
    assert "on a GPU (a Ray task)" in capsys.readouterr().out
    assert report["device"] == "cpu" and report["settings"]["device"] == "auto"
    assert json.loads((tmp_path / "report.json").read_text())["summary"] == report["summary"]


def _sleep_for_a_long_time(pid_file):
    Path(pid_file).write_text(str(os.getpid()))
    time.sleep(600)


def test_stopping_side_by_side_replicates_stops_every_job(tmp_path):
    """SIGTERM to `compare --jobs` must not leave its jobs running without a parent. With a
    cluster named in RAY_ADDRESS (here one that is never contacted) no local Ray instance, whose
    reaper would kill the process group, is there to do it."""
    import signal
    import subprocess
    import sys

    script = "\n".join([
        "import sys; from pathlib import Path",
        "sys.path.insert(0, sys.argv[1])",
        "from test_alignment import _sleep_for_a_long_time",
        "from alignment.compare import _in_parallel",
        "out = Path(sys.argv[2])",
        "_in_parallel([(f'job{i}', _sleep_for_a_long_time, (out / f'pid{i}',)) for i in range(2)], 2, out)",
    ])
    env = os.environ | {"RAY_ADDRESS": "127.0.0.1:9"}
    parent = subprocess.Popen([sys.executable, "-c", script, str(Path(__file__).parent), str(tmp_path)],
                              cwd=Path(__file__).parent.parent, env=env)
    pid_files = [tmp_path / f"pid{i}" for i in range(2)]
    deadline = time.monotonic() + 120
    while not all(f.is_file() and f.read_text() for f in pid_files):
        assert parent.poll() is None and time.monotonic() < deadline, "the jobs did not start"
        time.sleep(0.2)
    parent.send_signal(signal.SIGTERM)
    assert parent.wait(timeout=60) != 0
    for pid in (int(f.read_text()) for f in pid_files):
        deadline = time.monotonic() + 10
        while _running(pid):
            assert time.monotonic() < deadline, f"job {pid} outlived its parent"
            time.sleep(0.1)


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"
