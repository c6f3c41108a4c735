"""Model integrity (moe_routing.fingerprint): the fingerprint's invariances, what it catches, the
manifest the organism builder writes, and (vLLM-marked) the engine-side fingerprint."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moe_routing import fingerprint as fp
from moe_routing.tiny import tiny_model

ROOT = Path(__file__).resolve().parent.parent


def _manifest(model, tmp_path: Path) -> dict:
    fp.write_manifest(model, tmp_path)
    return fp.read_manifest(tmp_path)


def _mismatched(result: dict) -> set[tuple[int, object]]:
    return {(m["layer"], m["expert"]) for m in result["mismatches"]}


def test_sign_patterns_are_signs_and_shards_are_blocks_of_the_whole():
    whole = fp.sign_patterns((6, 10))
    assert whole.shape == (fp.NUM_PATTERNS, 6, 10)
    assert set(whole.unique().tolist()) == {-1.0, 1.0}
    assert not torch.equal(whole[0], whole[1])  # the K patterns differ
    assert torch.equal(fp.sign_patterns((6, 10), rows=(2, 5), cols=(3, 7)), whole[:, 2:5, 3:7])


def test_closed_form_statistics_of_one_matrix():
    w = torch.tensor([[3.0, 0.0], [0.0, 4.0]])
    (row,) = fp.finish(fp.matrix_raw_stats(w))
    patterns = fp.sign_patterns((2, 2))
    assert row[0] == pytest.approx(5.0)
    for k in range(fp.NUM_PATTERNS):
        assert row[1 + k] == pytest.approx(float(3 * patterns[k, 0, 0] + 4 * patterns[k, 1, 1]) / 5)
    assert fp.finish(fp.matrix_raw_stats(torch.zeros(2, 2)))[0] == [0.0] * (1 + fp.NUM_PATTERNS)


def test_fused_padded_packed_layout_gives_the_unfused_fingerprint():
    """An engine layout (gate and up fused, intermediate padded, entries permuted per expert like
    a kernel's prepacking) fingerprints through templates put in the same layout."""
    generator = torch.Generator().manual_seed(1)
    experts, inner, padded, hidden = 5, 6, 8, 7
    gate, up = torch.randn(experts, inner, hidden, generator=generator), torch.randn(experts, inner, hidden)
    w13 = torch.zeros(experts, 2 * padded, hidden)
    w13[:, :inner], w13[:, padded : padded + inner] = gate, up
    permutation = torch.randperm(2 * padded * hidden, generator=generator)

    def pack(t):
        return t.reshape(t.shape[0], -1)[:, permutation]

    k = fp.NUM_PATTERNS
    for matrix, start in ((gate, 0), (up, padded)):
        templates = torch.zeros(1 + k, 2 * padded, hidden)
        templates[0, start : start + inner] = 1
        templates[1:, start : start + inner] = fp.sign_patterns((inner, hidden))
        templates = pack(templates)
        fused = fp.raw_stats(pack(w13), templates[0], templates[1:])
        torch.testing.assert_close(fused, fp.matrix_raw_stats(matrix), rtol=1e-5, atol=1e-4)


def test_tensor_parallel_shards_add_up_to_the_whole():
    w = torch.randn(3, 8, 5)
    shards = [fp.raw_stats(w[:, r : r + 4], torch.ones(4, 5), fp.sign_patterns((8, 5), rows=(r, r + 4)))
              for r in (0, 4)]
    torch.testing.assert_close(shards[0] + shards[1], fp.matrix_raw_stats(w), rtol=1e-5, atol=1e-5)
    layer = {"decoder_layer": 0, "router": fp.router_raw_stats(torch.randn(3, 5)).tolist()}
    partials = [{"architecture": "qwen3_moe", "num_experts": 3,
                 "layers": [layer | {m: s.tolist() for m in fp.EXPERT_MATRICES}]} for s in shards]
    whole = fp.finish(fp.matrix_raw_stats(w))
    combined = fp.combine(partials)["layers"][0]
    for m in fp.EXPERT_MATRICES:
        torch.testing.assert_close(torch.tensor(combined[m]), torch.tensor(whole), rtol=1e-6, atol=1e-6)


def test_swapped_expert_and_rescaled_router_row_are_caught(tmp_path):
    model = tiny_model("qwen3_moe", seed=0)
    manifest = _manifest(model, tmp_path)
    assert fp.compare(manifest, fp.model_fingerprint(model))["ok"]
    tampered = copy.deepcopy(model)
    with torch.no_grad():
        experts = tampered.model.layers[0].mlp.experts
        for name in ("gate_up_proj", "down_proj"):
            param = getattr(experts, name)
            param[[2, 5]] = param[[5, 2]].clone()
        tampered.model.layers[2].mlp.gate.weight[3] *= 1.1
    result = fp.compare(manifest, fp.model_fingerprint(tampered))
    assert not result["ok"]
    assert _mismatched(result) == {(0, 2), (0, 5), (1, 3)}  # MoE layer 1 is decoder layer 2
    by_pair = {(m["layer"], m["expert"]): m["parts"] for m in result["mismatches"]}
    assert by_pair[(0, 2)] == ["gate", "up", "down"] and by_pair[(1, 3)] == ["router"]
    assert result["checked_pairs"] == 2 * 8


def test_whole_router_rescaled_by_1_1_is_caught(tmp_path):
    model = tiny_model("mixtral", seed=0)
    manifest = _manifest(model, tmp_path)
    with torch.no_grad():
        model.model.layers[1].mlp.gate.weight *= 1.1
    result = fp.compare(manifest, fp.model_fingerprint(model))
    assert _mismatched(result) == {(1, e) for e in range(8)}
    assert all(m["parts"] == ["router"] for m in result["mismatches"])


@pytest.mark.parametrize("architecture", ["qwen3_moe", "qwen2_moe", "mixtral", "olmoe", "deepseek_v2"])
def test_bf16_round_trip_is_not_flagged(architecture, tmp_path):
    model = tiny_model(architecture, seed=0)
    manifest = _manifest(model, tmp_path)
    result = fp.compare(manifest, fp.model_fingerprint(model.to(torch.bfloat16)))
    assert result["ok"], result["mismatches"]


def test_shared_expert_change_is_caught(tmp_path):
    model = tiny_model("qwen2_moe", seed=0)
    manifest = _manifest(model, tmp_path)
    assert all("shared" in layer for layer in manifest["layers"])
    with torch.no_grad():
        model.model.layers[1].mlp.shared_expert.down_proj.weight *= 1.1
    result = fp.compare(manifest, fp.model_fingerprint(model))
    assert result["mismatches"] == [{"layer": 1, "decoder_layer": 1, "expert": "shared", "parts": ["down"]}]


def test_bad_manifests_give_one_clear_error(tmp_path):
    model = tiny_model("qwen3_moe", seed=0)
    assert fp.read_manifest(tmp_path) is None  # no manifest: not an error, not a pass
    path = tmp_path / fp.MANIFEST_FILE
    path.write_text("{not json")
    with pytest.raises(fp.ManifestError, match="not readable JSON"):
        fp.read_manifest(tmp_path)
    path.write_text(json.dumps({"format_version": 99}))
    with pytest.raises(fp.ManifestError, match="format_version 99"):
        fp.read_manifest(tmp_path)
    manifest = _manifest(model, tmp_path)
    truncated = manifest | {"layers": manifest["layers"][:1]}
    with pytest.raises(fp.ManifestError, match="2 MoE layers|1 MoE layers"):
        fp.compare(truncated, fp.model_fingerprint(model))
    broken = copy.deepcopy(manifest)
    del broken["layers"][0]["gate"]
    with pytest.raises(fp.ManifestError, match="structure"):
        fp.compare(broken, fp.model_fingerprint(model))


def _swap_experts_and_scale_router(checkpoint: Path, out: Path) -> Path:
    """A copy of a saved checkpoint with experts 0 and 1 of decoder layer 0 swapped and the last
    MoE router scaled by 1.1, edited in the safetensors file itself."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(checkpoint, out)
    tensors = load_file(out / "model.safetensors")
    prefix = "model.layers.0.mlp.experts."
    for name in ("gate_proj", "up_proj", "down_proj"):
        a, b = f"{prefix}0.{name}.weight", f"{prefix}1.{name}.weight"
        tensors[a], tensors[b] = tensors[b], tensors[a]
    routers = sorted(k for k in tensors if k.endswith("mlp.gate.weight"))
    tensors[routers[-1]] = tensors[routers[-1]] * 1.1
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return out


def test_organism_build_writes_the_manifest_and_a_tampered_checkpoint_is_caught(quick_organism, tmp_path):
    from moe_routing.profiler import load_checkpoint

    manifest = fp.read_manifest(quick_organism)
    assert manifest is not None and manifest["architecture"] == "qwen3_moe"
    model, _ = load_checkpoint(str(quick_organism), dtype=torch.float32)
    assert fp.compare(manifest, fp.model_fingerprint(model))["ok"]
    tampered = _swap_experts_and_scale_router(quick_organism, tmp_path / "tampered")
    model, _ = load_checkpoint(str(tampered), dtype=torch.float32)
    result = fp.compare(manifest, fp.model_fingerprint(model))
    last = len(manifest["layers"]) - 1
    assert {(0, 0), (0, 1)} <= _mismatched(result)
    assert {(last, e) for e in range(manifest["shape"]["num_experts"])} <= _mismatched(result)


ENGINE_SCRIPT = """
import json, sys
if __name__ == "__main__":
    from vllm import LLM
    from moe_routing import fingerprint
    llm = LLM(model=sys.argv[1], dtype=sys.argv[2], enforce_eager=True, gpu_memory_utilization=0.2,
              max_model_len=512, seed=0, worker_extension_cls="serving.routing_worker.RoutingRecorder")
    served = fingerprint.combine(llm.collective_rpc("routing_fingerprint"))
    result = fingerprint.compare(fingerprint.read_manifest(sys.argv[3]), served)
    print("INTEGRITY " + json.dumps(result))
"""


@pytest.mark.slow
@pytest.mark.vllm
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_engine_fingerprint_matches_the_manifest_and_catches_tampering(quick_organism, tmp_path, dtype):
    """The fingerprint vLLM's worker computes from its own (fused, prepacked, maybe bf16) weights
    matches the builder's manifest; on a tampered checkpoint it does not."""
    tampered = _swap_experts_and_scale_router(quick_organism, tmp_path / "tampered")
    results = {}
    for name, checkpoint in (("original", quick_organism), ("tampered", tampered)):
        command = [sys.executable, "-c", ENGINE_SCRIPT, str(checkpoint), dtype, str(quick_organism)]
        run = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=ROOT)
        lines = [line for line in run.stdout.splitlines() if line.startswith("INTEGRITY ")]
        assert run.returncode == 0 and lines, run.stderr[-3000:]
        results[name] = json.loads(lines[0].removeprefix("INTEGRITY "))
    assert results["original"]["ok"], results["original"]["mismatches"]
    assert {(0, 0), (0, 1)} <= _mismatched(results["tampered"])
