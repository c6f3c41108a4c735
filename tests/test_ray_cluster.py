"""Ray with token auth from an empty home directory: the token helper, the demo's local head and
the README's `ray start` / `ray job submit` recipe, each run under a HOME no earlier test filled."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from moe_routing.ray_cluster import RayClusterError, auth_token_path, ensure_auth_token, ray_cli_env

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def organism():
    """Resolved before `empty_home` (module scope first), so from the usual organism cache."""
    from organism.build import ensure_organism

    return ensure_organism(log=lambda *_: None)


@pytest.fixture
def empty_home(tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for name in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE", "RAY_ADDRESS"):
        monkeypatch.delenv(name, raising=False)
    return home


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_missing_token_is_created_0600_and_never_logged(empty_home):
    lines = []
    path = ensure_auth_token(log=lines.append)
    assert path == empty_home / ".ray" / "auth_token" == auth_token_path()
    token = path.read_text()
    assert re.fullmatch(r"[0-9a-f]{64}", token)
    assert _mode(path) == 0o600 and _mode(path.parent) == 0o700
    assert len(lines) == 1 and str(path) in lines[0] and "created" in lines[0]
    assert ensure_auth_token(log=lines.append) == path and path.read_text() == token  # reused, kept
    assert "created" not in lines[1] and not any(token in line for line in lines)


def test_an_existing_token_readable_by_others_is_narrowed(empty_home):
    path = empty_home / ".ray" / "auth_token"
    path.parent.mkdir()
    path.write_text("a" * 64)
    path.chmod(0o644)  # what Ray's own `ray.init()` leaves behind with umask 022
    lines = []
    assert ensure_auth_token(log=lines.append) == path
    assert _mode(path) == 0o600 and path.read_text() == "a" * 64 and "0644" in lines[0]


def test_token_path_from_the_environment(empty_home, monkeypatch, tmp_path):
    target = tmp_path / "secrets" / "ray-token"
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(target))
    assert ensure_auth_token(log=lambda _: None) == target
    assert _mode(target) == 0o600 and not (empty_home / ".ray").exists()


def test_joining_without_the_clusters_token_names_the_path(empty_home):
    with pytest.raises(RayClusterError, match=re.escape(str(empty_home / ".ray" / "auth_token"))):
        ensure_auth_token(create=False, log=lambda _: None)
    assert not (empty_home / ".ray").exists()  # a made-up token would not match the cluster's


def test_token_from_the_environment_or_auth_off_writes_nothing(empty_home, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_TOKEN", "b" * 64)
    lines = []
    assert ensure_auth_token(log=lines.append) is None and "$RAY_AUTH_TOKEN" in lines[0]
    assert "b" * 64 not in lines[0]
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    assert ensure_auth_token(log=lines.append) is None and "off" in lines[1]
    assert not (empty_home / ".ray").exists()


def test_cli_env_keeps_token_auth_on_and_finds_this_environments_ray(monkeypatch):
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    monkeypatch.setenv("RAY_ADDRESS", "http://elsewhere:8265")
    env = ray_cli_env()
    assert env["RAY_AUTH_MODE"] == "token" and "RAY_ADDRESS" not in env
    assert env["PATH"].split(os.pathsep)[0] == str(Path(sys.executable).parent)
    assert ray_cli_env(keep_address=True)["RAY_ADDRESS"] == "http://elsewhere:8265"
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    assert ray_cli_env()["RAY_AUTH_MODE"] == "disabled"  # an explicit choice is the user's


def test_a_failed_head_start_shows_the_reason_from_its_log(tmp_path):
    from launch.ray_head import start_failure

    log = tmp_path / "ray-head.log"
    log.write_text("Usage stats collection is disabled.\n\n" + "\n".join(f"line {i}" for i in range(30))
                   + "\nRuntimeError: Token authentication is enabled but no authentication token was "
                   "found\n")
    message = start_failure(log, 1)
    assert "exited with code 1" in message and str(log) in message
    assert "no authentication token was found" in message and "line 29" in message
    assert "line 5" not in message  # the tail, not the whole log
    assert "hint:" in message and "ray get-auth-token --generate" in message


@pytest.mark.ray
@pytest.mark.slow
def test_the_demos_ray_head_starts_from_an_empty_home_and_runs_a_job(empty_home, tmp_path):
    from launch.ray_head import local_ray_cluster
    from moe_routing.ray_cluster import ray_binary

    lines = []
    with local_ray_cluster(tmp_path / "ray-head.log", log=lines.append) as address:
        token_file = empty_home / ".ray" / "auth_token"
        assert _mode(token_file) == 0o600 and any("created" in line for line in lines)
        job = subprocess.run(
            [ray_binary(), "job", "submit", "--address", address, "--", sys.executable, "-c",
             "import ray; ray.init(); print('JOB_CPUS', ray.cluster_resources()['CPU'])"],
            env=ray_cli_env(), capture_output=True, text=True, timeout=300)
        assert job.returncode == 0 and "JOB_CPUS" in job.stdout and "succeeded" in job.stdout, \
            job.stdout[-3000:] + job.stderr[-3000:]
    token = token_file.read_text()
    written = [tmp_path / "ray-head.log"] + list(Path("/tmp/ray/session_latest/logs").glob("*"))
    leaks = [p for p in written if p.is_file() and token in p.read_text(errors="replace")]
    assert not leaks and token not in job.stdout + job.stderr + "".join(lines)


RAY_START_RECORD = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"  # `ray start` writes it


@pytest.mark.ray
@pytest.mark.slow
def test_a_dead_clusters_ray_start_record_is_not_joined(empty_home):
    """A `ray start` head that died without `ray stop` leaves its address in /tmp/ray; Ray's own
    ray.init() would join it and hang retrying. init_ray starts a local instance instead."""
    saved = RAY_START_RECORD.read_text() if RAY_START_RECORD.is_file() else None
    RAY_START_RECORD.parent.mkdir(parents=True, exist_ok=True)
    RAY_START_RECORD.write_text("127.0.0.1:1\n")
    try:
        run = subprocess.run(
            [sys.executable, "-c", "import ray; from moe_routing.ray_cluster import init_ray; "
             "init_ray(num_cpus=1, include_dashboard=False); print('CPUS', ray.cluster_resources()['CPU'])"],
            cwd=ROOT, capture_output=True, text=True, timeout=240)
    finally:
        if saved is None:
            RAY_START_RECORD.unlink(missing_ok=True)
        else:
            RAY_START_RECORD.write_text(saved)
    assert run.returncode == 0 and "CPUS 1.0" in run.stdout, run.stdout[-2000:] + run.stderr[-2000:]


README_RECIPE = re.compile(r"<!-- ray-recipe -->\n```bash\n(.*?)```", re.S)


def _kill_session(session: int) -> None:
    from launch.processes import session_processes

    deadline = time.monotonic() + 60
    while (pids := session_processes(session)) and time.monotonic() < deadline:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.5)


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_the_readme_ray_recipe_runs_as_written_from_an_empty_home(organism, empty_home, tmp_path):
    """The README's block, with only the config and output directory swapped for a short job."""
    recipe = README_RECIPE.search((ROOT / "README.md").read_text())
    assert recipe, "README.md lost its <!-- ray-recipe --> block"
    script = recipe.group(1)
    for line in ("alignment/configs/organism.yaml", '"$PWD/runs/align-organism"'):
        assert line in script
    config = tmp_path / "quick.yaml"
    config.write_text(yaml.safe_dump({
        "model": str(organism), "data": {"statistics_prompts": 32},
        "profile": {"num_workers": 1}, "evaluation": {"enabled": False},
        "training": {"steps": 4, "batch_size": 8, "checkpoint_every": 4, "threads": 1}}))
    out = tmp_path / "align"
    script = script.replace("alignment/configs/organism.yaml", str(config)).replace(
        '"$PWD/runs/align-organism"', str(out))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "VIRTUAL_ENV"))}
    env["PATH"] = os.pathsep.join(p for p in env["PATH"].split(os.pathsep)
                                  if not p.startswith(str(ROOT / ".venv")))  # the recipe activates it
    process = subprocess.Popen(["bash", "-euo", "pipefail", "-c", script], cwd=ROOT, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    try:
        output, _ = process.communicate(timeout=1100)
    finally:
        _kill_session(process.pid)  # `ray start` left its daemons in this session
        with contextlib.suppress(OSError):  # and its address, which `ray stop` would have removed
            if RAY_START_RECORD.read_text().strip().endswith(":6379"):
                RAY_START_RECORD.unlink()
    assert process.returncode == 0, output[-5000:]
    assert re.search(r"Job 'raysubmit_\w+' succeeded", output), output[-3000:]
    assert (out / "model" / "config.json").is_file() and (out / "report.json").is_file()
    token = (empty_home / ".ray" / "auth_token").read_text()
    assert _mode(empty_home / ".ray" / "auth_token") == 0o600 and token not in output


def test_joining_a_cluster_needs_its_token_only_when_auth_is_asked_for(empty_home, monkeypatch):
    from moe_routing.ray_cluster import init_ray

    # RAY_AUTH_MODE=token and no token: a clear error before Ray is even asked.
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    with pytest.raises(RayClusterError, match="no token at"):
        init_ray("127.0.0.1:1", log=lambda _: None)
    # Mode unset, no token: Ray is asked (and fails here: nothing listens on port 1), and its
    # failure comes back as one RayClusterError naming the address, not a Ray traceback.
    monkeypatch.delenv("RAY_AUTH_MODE")
    with pytest.raises(RayClusterError, match="127.0.0.1:1"):
        init_ray("127.0.0.1:1", log=lambda _: None)
    assert not (empty_home / ".ray").exists()
