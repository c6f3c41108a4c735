"""The alignment job end to end on the organism: real Ray Train, a real kill, a real resume."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

pytestmark = [pytest.mark.slow, pytest.mark.ray]

ROOT = Path(__file__).resolve().parent.parent
RUN = [sys.executable, str(ROOT / "alignment" / "run.py")]


@pytest.fixture(scope="module")
def organism():
    from organism.build import ensure_organism

    return ensure_organism(log=lambda *_: None)


def _config(tmp_path: Path, name: str, checkpoint, **training) -> Path:
    config = {
        "model": str(checkpoint),
        "output_dir": str(tmp_path / name),
        "data": {"statistics_prompts": 64},
        "profile": {"num_workers": 1},
        "training": {"steps": 24, "batch_size": 8, "checkpoint_every": 4, "threads": 1} | training,
        "evaluation": {"enabled": False},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _trained_values(run_dir: Path) -> dict:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(run_dir / "model", dtype=torch.float32)
    return {n: p.detach() for n, p in model.named_parameters()}


def _checkpoint_steps(run_dir: Path) -> list[int]:
    """Steps of the complete checkpoints on disk, by the job's own test of completeness: Ray
    copies a reported checkpoint into its folder file by file, so a listing taken mid-copy (or a
    kill landing there) shows a state file that does not load yet."""
    from alignment.loop import STATE_FILE, checkpoint_directories

    return [torch.load(directory / STATE_FILE, weights_only=False)["step"]
            for root in (run_dir / "ray_train").glob("train-*")
            for directory in checkpoint_directories(root)]


def _session_processes(session: int) -> list[int]:
    """Live pids whose session id is `session` (field 6 of /proc/PID/stat)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # exited meanwhile
            continue
        if int(fields[3]) == session and fields[0] != "Z":
            pids.append(int(stat.parent.name))
    return pids


def _kill_session(process: subprocess.Popen) -> None:
    """SIGKILL every process of the job's session, as a dying node would, and wait until none is
    left. Killing only the driver's process group is not enough: Ray's daemons and train workers
    can outlive it for seconds and write one more checkpoint after the listing below."""
    deadline = time.monotonic() + 60
    while pids := _session_processes(process.pid):
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        process.poll()  # reap the driver
        assert time.monotonic() < deadline, f"processes survived SIGKILL: {pids}"
        time.sleep(0.1)
    process.wait()


def test_killed_job_resumes_to_the_same_result(tmp_path, organism):
    env = os.environ | {"PYTHONUNBUFFERED": "1"}
    # Uninterrupted run.
    whole = subprocess.run(RUN + ["--config", str(_config(tmp_path, "whole", organism))],
                           capture_output=True, text=True, timeout=600, env=env)
    assert whole.returncode == 0, whole.stderr[-3000:]
    report = json.loads((tmp_path / "whole" / "report.json").read_text())
    assert report["training"]["steps"] == 24 and report["method"] == "mesa"

    # The same job, killed (SIGKILL, the whole process group) once a checkpoint exists.
    config = _config(tmp_path, "killed", organism)
    run_dir = tmp_path / "killed"
    process = subprocess.Popen(RUN + ["--config", str(config)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, env=env, start_new_session=True)
    deadline = time.monotonic() + 400
    while not _checkpoint_steps(run_dir) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert process.poll() is None, "the job ended before it could be killed"
    _kill_session(process)
    steps_done = _checkpoint_steps(run_dir)
    assert steps_done and max(steps_done) < 24
    assert not (run_dir / "model").exists()

    resumed = subprocess.run(RUN + ["--config", str(config)], capture_output=True, text=True,
                             timeout=600, env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # Ray Train restores the newest checkpoint it recorded, or the job the newest one on disk.
    resumed_at = re.findall(r"resumed at step (\d+)/24", resumed.stdout + resumed.stderr)
    assert resumed_at and int(resumed_at[0]) in steps_done
    a, b = _trained_values(tmp_path / "whole"), _trained_values(run_dir)
    assert all(torch.equal(a[n], b[n]) for n in a), "resumed run differs from the uninterrupted one"

    # Untouched parameters are bit-identical to the base; the selected experts moved.
    from transformers import AutoModelForCausalLM

    base = dict(AutoModelForCausalLM.from_pretrained(organism, dtype=torch.float32).named_parameters())
    changed = {n for n in a if not torch.equal(a[n], base[n])}
    assert changed and all(".mlp." in n for n in changed)

    # A different config in the same output directory is refused, not mixed in.
    other = _config(tmp_path, "killed", organism, learning_rate=0.01)
    refused = subprocess.run(RUN + ["--config", str(other)], capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "different config" in refused.stderr


@pytest.mark.vllm
def test_aligned_checkpoint_serves_on_vllm(tmp_path, organism, vllm_and_hf_answers):
    """The exported checkpoint is an ordinary one: vLLM's CPU engine answers like transformers."""
    from safety_eval.harness import EvalSets

    config = _config(tmp_path, "served", organism, steps=4)
    run = subprocess.run(RUN + ["--config", str(config)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    aligned = tmp_path / "served" / "model"
    sets = EvalSets.for_checkpoint(aligned)
    assert sets.source.endswith("eval_sets.json")  # the base's held-out prompts travel with it
    prompts = sets.harmful[:6] + [t.prompt for t in sets.general[:6]]
    vllm_answers, hf_answers = vllm_and_hf_answers(aligned, prompts)
    same = sum(a == b for a, b in zip(vllm_answers, hf_answers))
    assert same >= 0.9 * len(prompts), list(zip(vllm_answers, hf_answers))


def test_bad_input_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("training: {stepz: 3}\n")
    run = subprocess.run(RUN + ["--config", str(bad)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "stepz" in run.stderr and "Traceback" not in run.stderr

    from transformers import LlamaConfig, LlamaForCausalLM

    dense = tmp_path / "dense"
    LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1)).save_pretrained(dense)
    config = tmp_path / "dense.yaml"
    config.write_text(yaml.safe_dump({"model": str(dense), "output_dir": str(tmp_path / "out")}))
    run = subprocess.run(RUN + ["--config", str(config)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "llama" in run.stderr.lower() and "Traceback" not in run.stderr

    config.write_text(yaml.safe_dump({"model": str(tmp_path / "missing"), "output_dir": str(tmp_path / "o")}))
    run = subprocess.run(RUN + ["--config", str(config)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "not found" in run.stderr
