"""`mesa-profile`: prompt files in, counts + summary out; bad input gets a message, not a trace."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from moe_routing.profiler import main, read_prompts
from moe_routing.stats import RoutingCounts
from moe_routing.tiny import save_tiny_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_checkpoint("olmoe", tmp_path_factory.mktemp("ckpt") / "olmoe")


@pytest.fixture
def prompt_files(tmp_path):
    txt = tmp_path / "a.txt"
    txt.write_text("\n".join(f"add {i} and {i + 1}" for i in range(12)) + "\n\n")
    jsonl = tmp_path / "b.jsonl"
    jsonl.write_text("\n".join(json.dumps({"prompt": f"reverse word{i}"}) for i in range(9)))
    return txt, jsonl


def test_read_prompts_formats(tmp_path, prompt_files):
    txt, jsonl = prompt_files
    assert len(read_prompts(txt)) == 12  # blank lines skipped
    assert read_prompts(jsonl)[0] == "reverse word0"
    listing = tmp_path / "c.json"
    listing.write_text(json.dumps(["x", {"text": "y"}]))
    with pytest.raises(ValueError, match="record 1 has no field 'prompt'"):
        read_prompts(listing)
    listing.write_text(json.dumps([{"text": "y"}]))
    assert read_prompts(listing, field="text") == ["y"]


def test_profile_and_compare(checkpoint, prompt_files, tmp_path, capsys):
    txt, jsonl = prompt_files
    out = tmp_path / "out"
    code = main(["--checkpoint", str(checkpoint), "--prompts", str(txt), "--compare", str(jsonl),
                 "--out", str(out), "--top-n", "4", "--bootstrap", "20", "--batch-size", "5"])
    assert code == 0
    report = json.loads((out / "profile.json").read_text())
    counts = RoutingCounts.load(out / "counts_prompts.npz")
    assert counts.num_sequences == 12 and report["prompts"]["tokens"] == counts.num_tokens
    assert RoutingCounts.load(out / "counts_compare.npz").num_sequences == 9
    assert len(report["ranking"]) == 4
    rds = [r["risk_difference"] for r in report["ranking"]]
    assert rds == sorted(rds, reverse=True)
    assert np.allclose(np.sum(report["prompts"]["frequency"], axis=1), counts.top_k)
    assert "stability" in capsys.readouterr().out
    # A rerun of the same command resumes from OUT/partial; --no-resume starts over.
    assert sorted(p.name for p in (out / "partial").glob("*.npz")) == ["compare.npz", "prompts.npz"]
    rerun = ["--checkpoint", str(checkpoint), "--prompts", str(txt), "--out", str(out),
             "--batch-size", "6"]
    with pytest.raises(SystemExit, match="2"):
        main(rerun)  # other settings than the saved partial counts
    assert "holds a partial profile of other prompts or settings" in capsys.readouterr().err
    assert main([*rerun, "--no-resume"]) == 0


@pytest.mark.parametrize(
    "args, message",
    [
        (["--prompts", "missing.txt"], "prompt file not found: missing.txt"),
        (["--batch-size", "0"], "batch_size must be >= 1"),
        (["--workers", "-1"], "--workers must be >= 0"),
        (["--checkpoint", "./no/such/dir"], "checkpoint directory not found: ./no/such/dir"),
    ],
)
def test_bad_arguments_exit_with_message(checkpoint, prompt_files, tmp_path, capsys, args, message):
    base = {"--checkpoint": str(checkpoint), "--prompts": str(prompt_files[0]),
            "--out": str(tmp_path / "o")}
    base.update(dict(zip(args[::2], args[1::2])))
    with pytest.raises(SystemExit) as exit_info:
        main([item for pair in base.items() for item in pair])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_unsupported_checkpoint_from_the_shell(tmp_path, prompt_files):
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
                                 num_hidden_layers=1, num_attention_heads=2)).save_pretrained(tmp_path)
    result = subprocess.run(
        [sys.executable, "-m", "moe_routing.profiler", "--checkpoint", str(tmp_path),
         "--prompts", str(prompt_files[0]), "--out", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 2
    assert "unsupported model architecture 'llama'" in result.stderr
    assert "Traceback" not in result.stderr
