"""The evaluation suite end to end on a barely trained organism: report shape, files, errors."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from safety_eval.suite import SuiteSettings, load_settings, main, run_suite

SMALL = dict(
    limit=6,
    mask_counts=[1, 2],
    headline_mask=2,
    identification_prompts=16,
    n_bootstrap=5,
    max_new_tokens=6,
    jailbreak=True,
    routing_search={"max_prompts": 2, "candidates_per_layer": 4, "target": "Sure"},
)


@pytest.fixture(scope="module")
def report(quick_organism):
    return run_suite(quick_organism, SuiteSettings(**SMALL), log=lambda *_: None)


def test_report_has_every_measure(report):
    summary = report["summary"]
    for key in (
        "safety_rate",
        "general_accuracy",
        "over_refusal",
        "jailbreak_safety_rate",
        "top2_mask_safety_rate",
        "random2_mask_safety_rate",
        "routing_search_attack_success",
        "scale_global_x0.5_safety_rate",
        "scale_safety_experts_x1.5_safety_rate",
    ):
        assert 0.0 <= summary[key] <= 1.0, key
    assert set(report["masking"]["targeted"]) == {1, 2}
    assert len(report["masking"]["random"][2]["values"]) == 5
    assert report["eval_sets"]["harmful"] == 6
    assert len(report["routing"]["harmful_frequency"]) == report["layers"]
    assert report["safety_critical"] and report["routing_search"]["prompts"] == 2
    assert report["settings"]["seed"] == 0 and "torch" in report["versions"]


def test_report_files(report, tmp_path):
    from safety_eval.report import write_report

    paths = write_report(report, tmp_path)
    assert [p.name for p in paths] == [
        "report.json",
        "report.md",
        "expert_frequency.png",
        "masking_curve.png",
    ]
    assert json.loads(paths[0].read_text())["summary"] == json.loads(json.dumps(report["summary"]))
    assert "top-2 safety-critical" in paths[1].read_text()
    assert all(p.stat().st_size > 1000 for p in paths[2:])


def test_bad_settings_name_the_key(tmp_path, capsys):
    with pytest.raises(ValidationError, match="random_seeds"):
        SuiteSettings(random_seeds=[0])
    with pytest.raises(ValidationError, match="mask_count"):
        SuiteSettings(mask_count=[1])
    config = tmp_path / "suite.yaml"
    config.write_text("mask_counts: [0, 1]\n")
    assert main(["--config", str(config), "--output", str(tmp_path / "out")]) == 2
    assert "mask_counts" in capsys.readouterr().err
    with pytest.raises(ValueError, match="not found"):
        load_settings(tmp_path / "nope.yaml")


def test_cli_rejects_unsupported_checkpoint(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert main(["--checkpoint", str(tmp_path), "--output", str(tmp_path / "out")]) == 2
    assert "llama" in capsys.readouterr().err
    assert main(["--checkpoint", str(tmp_path / "missing"), "--output", str(tmp_path / "out")]) == 2
    assert "not found" in capsys.readouterr().err


def test_identification_never_uses_held_out_prompts():
    from safety_eval.harness import EvalSets
    from safety_eval.suite import identification_prompts

    held_out = EvalSets.standard()
    harmful, benign = identification_prompts(SuiteSettings(), held_out)
    assert len(harmful) == len(benign) == SuiteSettings().identification_prompts
    assert not set(harmful) & set(held_out.harmful) and not set(benign) & set(held_out.benign)
