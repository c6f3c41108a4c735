"""`benchmarks/gpu_check.py`, the check a lent GPU machine runs, in its reduced CPU form: every part
(model build, gateway with telemetry on and off, `vllm serve`, the probe suite and the per-request
counts on vLLM probe engines, the 2-GPU alignment step's skip) runs here so the GPU form does not rot."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_the_alignment_step_config_is_a_valid_alignment_config(tmp_path):
    from alignment.config import AlignmentConfig

    settings = _gpu_check().alignment_config("some/model", str(tmp_path), workers=2)
    config = AlignmentConfig.model_validate(settings)
    assert config.training.num_workers == 2 and config.training.use_gpu and not config.evaluation.enabled
    sharded = _gpu_check().alignment_config("some/model", str(tmp_path), workers=2, sharding="fsdp")
    assert AlignmentConfig.model_validate(sharded).training.sharding == "fsdp"


def test_the_gpu_form_has_qwen3_30b_a3b_layer_shapes():
    layer = _gpu_check().GPU.layer
    assert (layer["hidden_size"], layer["num_experts"], layer["num_experts_per_tok"]) == (2048, 128, 8)
    assert (layer["moe_intermediate_size"], layer["head_dim"]) == (768, 128)
    assert (layer["num_attention_heads"], layer["num_key_value_heads"]) == (32, 4)


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.vllm
def test_the_cpu_form_runs_every_part(tmp_path):
    output = tmp_path / "gpu_check.json"
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--smoke",
                          "--output", str(output)], capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert output.is_file(), run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads(output.read_text())
    assert run.returncode == 0 and report["failed"] == [], json.dumps(report, indent=1)[-6000:]
    assert report["model"]["num_hidden_layers"] == 2 and report["model"]["shapes"]["num_experts"] == 8
    part = report["throughput"]
    assert set(part["tokens_per_s"]) == {"gateway_telemetry_on", "gateway_telemetry_off", "vllm_serve"}
    assert part["telemetry_on_vs_off_throughput"] > 0 and part["gateway_vs_vllm_serve_throughput"] > 0
    check = part["telemetry_check"]
    assert check["ok"] and check["integrity"] == "ok" and check["generated"]["tokens"] > 0
    engines = report["engines"]
    assert engines["probe_suite"]["engine"] == "vllm" and engines["probe_suite"]["suite_s"] > 0
    agreement = engines["compiled_vs_eager"]  # the CPU form compares the eager engine with itself
    assert agreement["same_prompt_counts"] == agreement["same_generated_counts"] == 1.0
    assert report["alignment_dp"]["skipped"].startswith("needs 2 GPUs")
