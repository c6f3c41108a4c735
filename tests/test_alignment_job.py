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


def _kill_after_first_checkpoint(config: Path, run_dir: Path, env: dict) -> list[int]:
    """Start the job, SIGKILL its whole session once a complete checkpoint exists; the steps
    checkpointed by then."""
    process = subprocess.Popen(RUN + ["--config", str(config)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, env=env, start_new_session=True)
    deadline = time.monotonic() + 400
    while not _checkpoint_steps(run_dir) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert process.poll() is None, "the job ended before it could be killed"
    _kill_session(process)
    return _checkpoint_steps(run_dir)


def _run_job(config: Path, env: dict) -> subprocess.CompletedProcess:
    run = subprocess.run(RUN + ["--config", str(config)], capture_output=True, text=True, timeout=600,
                         env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    return run


def test_killed_job_resumes_to_the_same_result(tmp_path, organism):
    env = os.environ | {"PYTHONUNBUFFERED": "1"}
    # Uninterrupted run.
    _run_job(_config(tmp_path, "whole", organism), env)
    report = json.loads((tmp_path / "whole" / "report.json").read_text())
    assert report["training"]["steps"] == 24 and report["method"] == "mesa"

    # The same job, killed (SIGKILL, the whole process group) once a checkpoint exists.
    config = _config(tmp_path, "killed", organism)
    run_dir = tmp_path / "killed"
    steps_done = _kill_after_first_checkpoint(config, run_dir, env)
    assert steps_done and max(steps_done) < 24
    assert not (run_dir / "model").exists()

    resumed = _run_job(config, env)
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


LAYOUT = {"steps": 12, "checkpoint_every": 4}  # the data-parallel tests' jobs: 3 checkpoints


@pytest.fixture(scope="module")
def one_worker(tmp_path_factory, organism) -> Path:
    """The reference of the data-parallel tests: one unsharded worker, global batch 8."""
    tmp_path = tmp_path_factory.mktemp("one-worker")
    env = os.environ | {"PYTHONUNBUFFERED": "1"}
    _run_job(_config(tmp_path, "one", organism, num_workers=1, **LAYOUT), env)
    return tmp_path / "one"


def _assert_trains_what_one_worker_does(one: Path, other: Path, organism) -> dict:
    """`other`'s trained values within 0.1% of the largest update of `one`'s, the same parameters
    changed (experts only), the same losses to 1e-3; returns `other`'s values."""
    from transformers import AutoModelForCausalLM

    a, b = _trained_values(one), _trained_values(other)
    base = dict(AutoModelForCausalLM.from_pretrained(organism, dtype=torch.float32).named_parameters())
    changed = [n for n in a if not torch.equal(a[n], base[n])]
    assert changed and {n for n in b if not torch.equal(b[n], base[n])} == set(changed)
    assert all(".mlp." in n for n in changed)  # experts and routers, nothing else
    update = max(float((a[n] - base[n]).abs().max()) for n in changed)
    difference = max(float((a[n] - b[n]).abs().max()) for n in changed)
    print(f"{other.name}: largest update {update:.3e}, largest difference from one worker {difference:.3e}")
    assert difference <= 1e-3 * update, f"{other.name} differs by {difference:.3e}, updates {update:.3e}"
    history = [json.loads((run / "report.json").read_text())["training"]["history"] for run in (one, other)]
    for x, y in zip(*history):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-3), (x, y)
    return b


def _assert_a_killed_job_resumes_to(expected: dict, config: Path, run_dir: Path, env: dict) -> None:
    steps_done = _kill_after_first_checkpoint(config, run_dir, env)
    assert steps_done and max(steps_done) < LAYOUT["steps"]
    resumed = _run_job(config, env)
    assert re.findall(rf"resumed at step (\d+)/{LAYOUT['steps']}", resumed.stdout + resumed.stderr)
    killed = _trained_values(run_dir)
    differing = [n for n in expected if not torch.equal(expected[n], killed[n])]
    assert not differing, f"the resumed {run_dir.name} run differs in {differing[:3]}"


def test_two_workers_train_what_one_does_and_a_killed_two_worker_job_resumes_exactly(
        tmp_path, organism, one_worker):
    """Ray Train, 2 CPU workers (gloo) vs 1, same global batch of 8: every loss is divided by
    global counts, the token transport plan is solved over both workers' tokens and the forced
    routes are drawn for the global batch, so the trained values agree up to float32 summation
    order (DDP's all-reduce, matmuls of other batch shapes). Tolerance: the largest difference
    under 0.1% of the largest change training made, over 12 Adam steps at lr 1e-3 (Adam divides
    by sqrt(v), so a rounding difference in a near-zero gradient can grow; measured 3e-7 against
    updates of 7e-3, 20x inside; tests/test_alignment.py shows, with gloo, that a per-worker
    transport plan does not give one worker's loss). A killed 2-worker job then resumes to exactly
    the uninterrupted run."""
    env = os.environ | {"PYTHONUNBUFFERED": "1"}
    _run_job(_config(tmp_path, "two", organism, num_workers=2, **LAYOUT), env)
    two = _assert_trains_what_one_worker_does(one_worker, tmp_path / "two", organism)
    _assert_a_killed_job_resumes_to(two, _config(tmp_path, "killed", organism, num_workers=2, **LAYOUT),
                                    tmp_path / "killed", env)


def test_impossible_worker_layouts_are_refused_with_one_line(tmp_path, organism):
    """Before any profiling: a global batch the workers cannot split, and more workers than the
    Ray cluster has CPUs (or GPUs) for; Ray itself would wait for those forever."""

    def job(name, **training):
        return subprocess.run(RUN + ["--config", str(_config(tmp_path, name, organism, **training))],
                              capture_output=True, text=True, timeout=300)

    odd = job("odd", num_workers=2, batch_size=7)
    assert odd.returncode == 2 and "divisible by training.num_workers 2" in odd.stderr, odd.stderr[-2000:]
    many = os.cpu_count() + 1
    crowded = job("crowded", num_workers=many, batch_size=8 * many)
    assert crowded.returncode == 2, crowded.stderr[-2000:]
    assert f"needs {many} CPUs (one per worker), but the Ray cluster has" in crowded.stderr
    assert "Traceback" not in crowded.stderr and not (tmp_path / "crowded" / "profile").exists()
    if not torch.cuda.is_available():
        gpus = job("gpus", num_workers=1, use_gpu=True)
        assert gpus.returncode == 2 and "needs 1 GPUs (one per worker)" in gpus.stderr, gpus.stderr[-2000:]


def _tensor_layout(run_dir: Path) -> dict:
    """Every tensor of the exported checkpoint: name -> (shape, dtype), from the files alone."""
    from safetensors import safe_open

    layout = {}
    for path in sorted((run_dir / "model").glob("*.safetensors")):
        with safe_open(path, "pt") as tensors:
            for name in tensors.keys():
                piece = tensors.get_slice(name)
                layout[name] = (tuple(piece.get_shape()), piece.get_dtype())
    return layout


def test_sharded_workers_train_what_one_does_export_alike_and_resume_exactly(tmp_path, organism, one_worker):
    """training.sharding fsdp, 2 CPU workers (FSDP2 on gloo: the frozen weights sharded, the
    deltas and routers replicated and their gradients averaged) vs 1 unsharded worker, same
    global batch: the same tolerance and reasoning as the 2-worker DDP test above. The exported
    checkpoint has the unsharded one's files, tensor names, shapes and dtypes, and a killed
    sharded job resumes to exactly the uninterrupted one."""
    env = os.environ | {"PYTHONUNBUFFERED": "1"}
    sharded = _run_job(_config(tmp_path, "fsdp", organism, num_workers=2, sharding="fsdp", **LAYOUT), env)
    assert "[align] memory: " in sharded.stdout
    two = _assert_trains_what_one_worker_does(one_worker, tmp_path / "fsdp", organism)
    assert _tensor_layout(tmp_path / "fsdp") == _tensor_layout(one_worker)
    files = [{p.name for p in (run / "model").iterdir()} for run in (tmp_path / "fsdp", one_worker)]
    assert files[0] == files[1]
    _assert_a_killed_job_resumes_to(two, _config(tmp_path, "killed", organism, num_workers=2, sharding="fsdp",
                                                 **LAYOUT), tmp_path / "killed", env)


def test_training_over_the_memory_estimate_is_refused_with_one_line(tmp_path, organism):
    """The estimate (alignment.sharding) against this machine's memory, before any training
    worker starts: a global batch of 4096 rows of 4096 tokens needs terabytes."""
    run = subprocess.run(RUN + ["--config", str(_config(tmp_path, "huge", organism, batch_size=4096,
                                                        max_length=4096))],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 2, run.stderr[-2000:]
    assert "training needs about" in run.stderr and "training.memory_check false" in run.stderr
    assert "Traceback" not in run.stderr and not (tmp_path / "huge" / "ray_train").exists()


def test_a_diverged_loss_stops_the_job_with_one_line_and_writes_no_checkpoint(tmp_path, organism):
    """A NaN in the weights (here the final norm, read after every router, so profiling is
    unharmed) makes the first step's loss NaN: the job says so in one line, exit 1, before the
    step writes NaN into the weights or a checkpoint is reported."""
    import shutil

    from safetensors.torch import load_file, save_file

    poisoned = tmp_path / "poisoned"
    shutil.copytree(organism, poisoned)
    for path in poisoned.glob("*.safetensors"):
        tensors = load_file(path)
        if "model.norm.weight" in tensors:
            tensors["model.norm.weight"] = torch.full_like(tensors["model.norm.weight"], float("nan"))
            save_file(tensors, path, metadata={"format": "pt"})
    run = subprocess.run(RUN + ["--config", str(_config(tmp_path, "nan", poisoned, steps=4))],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 1, run.stderr[-3000:]
    # Ray forwards the worker's own traceback too, in whatever order its log stream delivers.
    assert re.search(r"^error: training stopped: non-finite training loss at step 1 .*weights$", run.stderr,
                     re.MULTILINE), run.stderr[-3000:]
    assert _checkpoint_steps(tmp_path / "nan") == []
