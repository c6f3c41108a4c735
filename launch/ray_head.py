"""A Ray head on this machine for `ray job submit` (the demo's step 2, the README recipe's test).

`ray start --head --block` runs in a session of its own, on free ports, with token auth on (the
token is created first when missing); on exit every process of that session is stopped, so other
Ray instances on the machine are left alone (`ray stop` would stop them all). A head that does not
come up raises RayClusterError with the last lines of its log: the reason, not only a path.
"""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable
from contextlib import contextmanager, suppress
from pathlib import Path

from launch.processes import free_port, session_processes, stop
from moe_routing.ray_cluster import RayClusterError, ensure_auth_token, ray_binary, ray_cli_env

START_TIMEOUT_S = 180


def log_tail(path: Path, lines: int = 12) -> str:
    """The last non-empty lines of a log file, indented for a console message."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "    (no log written)"
    kept = [line for line in text.splitlines() if line.strip()][-lines:]
    return "\n".join(f"    {line}" for line in kept) or "    (the log is empty)"


def start_failure(log_path: Path, exit_code: int | None) -> str:
    how = "timed out" if exit_code is None else f"exited with code {exit_code}"
    tail = log_tail(log_path)
    hint = ("the head could not find its auth token: create one with `ray get-auth-token --generate` "
            "or set RAY_AUTH_TOKEN_PATH to a 0600 token file" if "token" in tail.lower()
            else "another Ray on these ports? `ray status` lists what runs")
    return f"the local Ray cluster did not start ({how}); last lines of {log_path}:\n{tail}\nhint: {hint}"


@contextmanager
def local_ray_cluster(log_path: Path, *, log: Callable[[str], None] = print,
                      timeout_s: float = START_TIMEOUT_S):
    """Yields the head's dashboard / job-server address (http://127.0.0.1:PORT)."""
    import httpx

    log_path = Path(log_path)
    ensure_auth_token(create=True, log=log)
    dashboard, gcs_port = free_port(), free_port()
    command = [ray_binary(), "start", "--head", "--block", f"--port={gcs_port}",
               f"--dashboard-port={dashboard}", "--dashboard-host=127.0.0.1", "--include-dashboard=true",
               "--disable-usage-stats"]
    with open(log_path, "w") as file:  # the child keeps its own copy of the handle
        process = subprocess.Popen(command, stdout=file, stderr=subprocess.STDOUT, start_new_session=True,
                                   env=ray_cli_env())
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if httpx.get(f"{address}/api/version", timeout=5).status_code < 500:
                    break
            except httpx.HTTPError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise RayClusterError(start_failure(log_path, process.poll()))
            time.sleep(1)
        yield address
    finally:
        for pid in session_processes(process.pid):
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        stop(process, grace_s=10, first=signal.SIGTERM)
        # The head records its address for later `ray.init()` calls; it is dead now.
        recorded = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"
        with suppress(OSError):
            if recorded.read_text().strip().endswith(f":{gcs_port}"):
                recorded.unlink()
