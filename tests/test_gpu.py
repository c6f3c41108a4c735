"""The routing core on a CUDA device: same decisions as on CPU, hooks work on GPU tensors."""

from __future__ import annotations

import pytest
import torch

from moe_routing.instrument import capture_routing, force_experts, mask_experts
from moe_routing.profiler import ProfileSettings, profile_routing
from moe_routing.tiny import byte_tokenizer, tiny_model

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("architecture", ["qwen3_moe", "deepseek_v2"])
def test_instrumentation_on_cuda(architecture):
    tokenizer = byte_tokenizer()
    model = tiny_model(architecture).to("cuda")
    batch = tokenizer(["What is 2 plus 2?", "hi"], return_tensors="pt", padding=True).to("cuda")
    with torch.no_grad():
        baseline = model(**batch).logits
        with capture_routing(model) as capture, mask_experts(model, [(0, 1)]), \
                force_experts(model, {1: [2]}):
            model.generate(**batch, max_new_tokens=4, min_new_tokens=4, do_sample=False,
                           pad_token_id=0)
        assert torch.equal(model(**batch).logits, baseline)
    trace = capture.trace()
    assert trace.generated.any()
    assert not (trace.expert_ids[:, 0] == 1).any()
    assert (trace.expert_ids[:, 1] == 2).any(dim=-1).all()


def test_profile_on_cuda_matches_cpu():
    tokenizer = byte_tokenizer()
    prompts = [f"add {i} and {i * 7}" for i in range(20)]
    settings = ProfileSettings(batch_size=8)
    cpu = profile_routing(tiny_model("mixtral"), tokenizer, prompts, settings, progress=False)
    gpu = profile_routing(tiny_model("mixtral").to("cuda"), tokenizer, prompts, settings,
                          progress=False)
    # Kernels differ across devices, so a near-tie may flip: allow a tiny share of hits to move.
    moved = abs(cpu.sequence_hits - gpu.sequence_hits).sum() / (2 * cpu.sequence_hits.sum())
    assert (cpu.sequence_tokens == gpu.sequence_tokens).all()
    assert moved < 0.01


@pytest.mark.ray
def test_the_jobs_evaluation_runs_on_the_gpu_with_gpu_training(quick_organism, tmp_path):
    from test_alignment import evaluate_with_gpu_training

    report = evaluate_with_gpu_training(quick_organism, tmp_path, gpus=1)
    assert report["device"] == "cuda:0"
    assert 0 <= report["summary"]["safety_rate"] <= 1
    assert report["summary"]["fsour_attack_success"] is not None  # the searches' hooks on the GPU
