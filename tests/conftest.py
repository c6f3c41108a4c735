"""Shared fixtures: tiny random MoE models of every supported architecture, built locally."""

from __future__ import annotations

import functools

import pytest
import torch

from moe_routing.tiny import byte_tokenizer, tiny_model

# Each entry: (id, architecture, config overrides). DeepSeek-V2 is tested in both routing modes.
ARCHITECTURES = [
    ("qwen3_moe", "qwen3_moe", {}),
    ("qwen2_moe", "qwen2_moe", {}),
    ("mixtral", "mixtral", {}),
    ("olmoe", "olmoe", {}),
    ("deepseek_v2", "deepseek_v2", {}),
    ("deepseek_v2_grouped", "deepseek_v2",
     {"topk_method": "group_limited_greedy", "n_group": 4, "topk_group": 2}),
]
ARCH_IDS = [a[0] for a in ARCHITECTURES]


@functools.cache
def _model(arch_id: str):
    _, architecture, overrides = next(a for a in ARCHITECTURES if a[0] == arch_id)
    return tiny_model(architecture, seed=0, **overrides)


@pytest.fixture(params=ARCH_IDS)
def model(request):
    """A tiny model of each architecture (shared across tests: tests must leave it unchanged)."""
    return _model(request.param)


@pytest.fixture(scope="session")
def tokenizer():
    return byte_tokenizer()


@pytest.fixture
def batch(tokenizer):
    """A left-padded batch of two prompts of different lengths."""
    return tokenizer(["What is 12 plus 30?", "Reverse: cat"], return_tensors="pt", padding=True)


# A few steps of the organism recipe on a smaller model: the real code path in seconds.
QUICK_ORGANISM = dict(
    hidden_size=64, num_layers=2, moe_intermediate_size=32, vocab_size=400,
    stage1=dict(steps=3, batch_size=4, learning_rate=3e-3, harmful_share=0.3, benign_share=0.2,
                recognition_share=0.1),
    stage2=dict(steps=2, batch_size=4, learning_rate=1e-3, harmful_share=0.5, benign_share=0.2),
)


@pytest.fixture
def quick_config():
    from organism.build import OrganismConfig

    return lambda **changes: OrganismConfig(**(QUICK_ORGANISM | changes))


@pytest.fixture(scope="session")
def quick_organism(tmp_path_factory):
    """A barely trained organism checkpoint (for mechanics, not for safety figures)."""
    from organism.build import OrganismConfig, build_organism

    return build_organism(OrganismConfig(**QUICK_ORGANISM), tmp_path_factory.mktemp("organism") / "quick",
                          log=lambda *_: None)


@pytest.fixture
def vllm_and_hf_answers(tmp_path):
    """answers(checkpoint, prompts) -> (vLLM CPU engine answers, transformers answers), greedy,
    24 new tokens. vLLM runs in a subprocess (its workers need their own __main__)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    def answers(checkpoint, prompts):
        from moe_routing.profiler import load_checkpoint
        from safety_eval.generation import HFChatGenerator

        (tmp_path / "prompts.json").write_text(json.dumps(prompts))
        script = Path(__file__).parent / "scripts" / "vllm_chat.py"
        run = subprocess.run([sys.executable, str(script), str(checkpoint), str(tmp_path / "prompts.json")],
                             capture_output=True, text=True, timeout=600)
        lines = [line for line in run.stdout.splitlines() if line.startswith("VLLM_OUTPUTS ")]
        assert run.returncode == 0 and lines, run.stderr[-3000:]
        served = [a.strip() for a in json.loads(lines[0].removeprefix("VLLM_OUTPUTS "))]
        model, tokenizer = load_checkpoint(checkpoint, dtype=torch.float32)
        return served, HFChatGenerator(model, tokenizer).generate(prompts, max_new_tokens=24)

    return answers


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)


def pytest_collection_modifyitems(config, items):
    """GPU tests skip cleanly where there is no CUDA device (CI, the CPU machines)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def require_binary(name: str) -> str:
    """The path of a system binary the test needs. Missing: skip on a developer machine, fail in CI
    (CI=true), where `make install` installs it, so the test cannot silently stop running."""
    import os
    import shutil

    path = shutil.which(name)
    if path is None:
        message = f"{name} not installed (make install installs Debian's prometheus package)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


def metric_total(text: str, name: str, **labels) -> float:
    """The sum of a Prometheus exposition's samples called `name` whose labels include `labels`."""
    from prometheus_client.parser import text_string_to_metric_families

    return sum(sample.value for family in text_string_to_metric_families(text) for sample in family.samples
               if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()))
