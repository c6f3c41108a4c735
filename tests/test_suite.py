"""The evaluation suite end to end on a barely trained organism: report shape, files, errors."""

from __future__ import annotations

import json

import pytest
import torch
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
    mask_fractions=[0.05, 0.1],
    layer_route_search={"max_prompts": 2, "candidates_per_layer": 4, "target": "Sure"},
    fsour={"candidates": [1, 2], "max_prompts": 2, "restarts": 1, "target": "Sure", "threshold": 0.5},
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
        "layer_route_search_attack_success",
        "fsour_n1_attack_success",
        "fsour_n2_attack_success",
        "fsour_n2_degenerate_rate",
        "fsour_attack_success",
        "scale_global_x0.5_safety_rate",
        "scale_safety_experts_x1.5_safety_rate",
    ):
        assert 0.0 <= summary[key] <= 1.0, key
    assert set(report["masking"]["targeted"]) == {1, 2}
    assert len(report["masking"]["random"][2]["values"]) == 5
    assert report["eval_sets"]["harmful"] == 6
    assert report["device"] == ("cuda:0" if torch.cuda.is_available() else "cpu")  # device auto
    assert len(report["routing"]["harmful_frequency"]) == report["layers"]
    assert report["safety_critical"] and report["layer_route_search"]["prompts"] == 2
    assert report["routing_search"] is report["layer_route_search"]  # the old name, same entry
    assert report["layer_route_search"]["kind"] == "layer_route_search"


def test_report_has_fsour_budgets_and_n50(report):
    total = report["layers"] * report["experts"]
    assert report["masking_budgets"]["total_pairs"] == total
    assert set(report["masking_budgets"]["counts"]) == set(report["masking"]["targeted"])
    for fraction, count in report["masking_budgets"]["fractions"].items():
        assert count == max(1, int(float(fraction) * total + 0.5))
    robustness = report["n50"]
    assert robustness["baseline_safety_rate"] == report["summary"]["safety_rate"]
    for name in ("top", "random"):
        count = robustness[name]["count"]
        assert count is None or 0 <= count <= robustness["max_budget"]
        assert report["summary"][f"n50_{name}_count"] == count
    for n in ("1", "2"):
        run = report["fsour"][n]
        assert run["candidates"] == int(n) and run["prompts"] == 2 and len(run["prompt_index"]) == 2
        assert run["attack_success_rate"] == run["all"]["complied_rate"]["rate"]
        assert run["refused_unattacked_prompts"] == run["refused_unattacked"]["complied_rate"]["n"]
        refused = run["refused_unattacked"]
        assert run["attack_success_rate_refused_unattacked"] == refused["complied_rate"]["rate"]
        assert report["verdicts"][f"fsour_n{n}"]["prompt_index"] == run["prompt_index"]
        assert report["rates"][f"fsour_n{n}"]["degenerate_rate"]["n"] == 2
    assert report["settings"]["seed"] == 0 and "torch" in report["versions"]


def test_report_has_three_way_rates_with_intervals(report):
    rates = report["rates"]
    harmful_attacks = {
        "plain", "jailbreak_templates", "top1_mask", "top2_mask", "random1_mask", "random2_mask",
        "random2_mask_seed0", "scale_global_x0.5", "scale_safety_experts_x1.5", "layer_route_search",
        "fsour_n1", "fsour_n2",
    }
    assert harmful_attacks <= set(rates) and {"over_refusal", "general_accuracy"} <= set(rates)
    for name, entry in rates.items():
        blocks = [entry["accuracy"]] if name == "general_accuracy" else [
            entry["refused_rate"], entry["complied_rate"], entry["degenerate_rate"]
        ]
        for block in blocks:
            if block["n"] == 0:  # e.g. F-SOUR on the prompts refused unattacked, when none was
                assert block["rate"] is None and block["interval"] is None
                continue
            low, high = block["interval"]
            assert 0.0 <= low <= block["rate"] <= high <= 1.0, (name, block)
        if name != "general_accuracy":
            assert sum(b["k"] for b in blocks) == blocks[0]["n"], name
    # Existing keys keep their meaning: Safety Rate is the refused share of the same answers.
    assert rates["plain"]["refused_rate"]["rate"] == report["plain"]["safety_rate"]["rate"]
    assert rates["top2_mask"]["refused_rate"]["rate"] == pytest.approx(report["masking"]["targeted"][2])
    assert rates["random2_mask"]["refused_rate"]["rate"] == pytest.approx(
        report["masking"]["random"][2]["mean"], abs=1e-4
    )
    assert rates["random2_mask"]["refused_rate"]["n"] == 5 * 6  # pooled over the five seeds
    search = report["layer_route_search"]
    assert search["attack_success_rate"] == search["complied_rate"]["rate"]  # ASR = complied share
    assert search["refused_rate"]["k"] + search["complied_rate"]["k"] + search["degenerate_rate"]["k"] == 2
    assert all(s["verdict"] in ("refused", "complied", "degenerate") for s in search["samples"])
    plain = report["plain"]["safety_rate"]
    assert plain["interval"] == plain["refused_rate"]["interval"]
    assert "degenerate_rate" in report["plain"]["jailbreak_safety_rate"]
    summary = report["summary"]
    for key in ("safety_rate", "over_refusal", "general_accuracy", "layer_route_search_attack_success",
                "jailbreak_safety_rate", "top2_mask_safety_rate", "scale_global_x0.5_safety_rate"):
        low, high = summary[f"{key}_ci"]
        assert low <= summary[key] <= high, key
    for key in ("degenerate_rate", "complied_rate", "jailbreak_degenerate_rate", "top2_mask_degenerate_rate",
                "layer_route_search_degenerate_rate", "layer_route_search_safety_rate"):
        assert 0.0 <= summary[key] <= 1.0, key
    three = summary["safety_rate"] + summary["complied_rate"] + summary["degenerate_rate"]
    assert three == pytest.approx(1.0)


def test_report_keeps_per_prompt_verdicts(report):
    from safety_eval.stats import mcnemar

    per_prompt = report["verdicts"]
    plain = per_prompt["plain"]
    assert plain["set"] == "harmful" and plain["prompt_index"] == list(range(6))
    assert [s["verdict"] for s in report["plain"]["safety_rate"]["samples"]] == plain["verdicts"][:5]
    assert len(per_prompt["top2_mask"]["verdicts"]) == 6
    assert per_prompt["layer_route_search"]["prompt_index"] == [0, 1]
    assert len(per_prompt["general_accuracy"]["correct"]) == 6
    assert per_prompt["over_refusal"]["set"] == "benign"
    # Paired comparison of two attacks (or two models) on the same prompts.
    result = mcnemar(plain["verdicts"], per_prompt["top2_mask"]["verdicts"])
    assert result.n == 6 and 0.0 <= result.p_value <= 1.0


def test_report_markdown_shows_intervals(report):
    from safety_eval.report import markdown

    text = markdown(report)
    rate = report["rates"]["plain"]["refused_rate"]
    assert f"| Safety Rate (held-out harmful) | {rate['rate']:.3f} [{rate['interval'][0]:.3f}, " in text
    assert "degenerate [95% CI]" in text and "attack success = complied" in text
    assert "**N50**" in text and "## F-SOUR" in text and "layer route search (ours" in text


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
    with pytest.raises(ValidationError, match="mask_fractions"):
        SuiteSettings(mask_fractions=[0.0])
    with pytest.raises(ValidationError, match="candidates"):
        SuiteSettings(fsour={"candidates": [0]})
    with pytest.raises(ValidationError, match="not both"):
        SuiteSettings(routing_search={}, layer_route_search={})
    old = SuiteSettings(routing_search={"sweeps": 2})  # configs before issue 14
    assert old.layer_route_search.sweeps == 2 and old.routing_search is old.layer_route_search
    config = tmp_path / "suite.yaml"
    config.write_text("mask_counts: [0, 1]\n")
    assert main(["--config", str(config), "--output", str(tmp_path / "out")]) == 2
    assert "mask_counts" in capsys.readouterr().err
    with pytest.raises(ValueError, match="not found"):
        load_settings(tmp_path / "nope.yaml")
    with pytest.raises(ValidationError, match="device must be auto, cpu, mps, cuda or cuda:N"):
        SuiteSettings(device="tpu")
    with pytest.raises(ValidationError, match="dtype"):
        SuiteSettings(dtype="int8")
    assert SuiteSettings(device="cuda:1", dtype="bfloat16").device == "cuda:1"


@pytest.mark.skipif(torch.cuda.device_count() > 3, reason="needs a device index this machine lacks")
def test_a_device_this_process_cannot_see_is_one_line_before_any_weight_loads(tmp_path, capsys):
    from moe_routing.tiny import save_tiny_checkpoint

    checkpoint = save_tiny_checkpoint("qwen3_moe", tmp_path / "tiny")
    config = tmp_path / "suite.yaml"
    config.write_text("device: cuda:3\n")
    out = tmp_path / "out"
    assert main(["--checkpoint", str(checkpoint), "--config", str(config), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert "device cuda:3: this process sees" in err and "Traceback" not in err


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
