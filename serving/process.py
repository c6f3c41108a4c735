"""Run the gateway in a child process (tests, benchmarks, the demo): `mesa-serve` on a Serve
config written from Python, its own local Ray instance, stopped with its whole process group."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import yaml

READY_LINE = "[serve] ready on"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class GatewayProcess:
    url: str
    process: subprocess.Popen
    log_path: Path

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]


def serve_config(applications: list[dict], port: int) -> dict:
    return {"http_options": {"host": "127.0.0.1", "port": port}, "applications": applications}


def gateway_app(name: str = "organism", route_prefix: str = "/", **args) -> dict:
    return {
        "name": name,
        "route_prefix": route_prefix,
        "import_path": "serving.app:build_app",
        "args": {"served_model_name": name} | args,
    }


@contextmanager
def running_gateway(
    applications: list[dict],
    *,
    env: dict[str, str],
    port: int | None = None,
    log_path: Path | None = None,
    timeout_s: float = 900,
):
    """Start `mesa-serve` on `applications`, wait until it serves, stop it on exit."""
    port = port or free_port()
    workdir = Path(tempfile.mkdtemp(prefix="mesa-gateway-"))
    config_path = workdir / "serve.yaml"
    config_path.write_text(yaml.safe_dump(serve_config(applications, port)))
    log_path = log_path or workdir / "gateway.log"
    child_env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | env
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [sys.executable, "-u", "-m", "serving.cli", str(config_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=child_env,
            start_new_session=True,
        )
    gateway = GatewayProcess(f"http://127.0.0.1:{port}", process, log_path)
    try:
        deadline = time.monotonic() + timeout_s
        while READY_LINE not in log_path.read_text(errors="replace"):
            if process.poll() is not None:
                raise RuntimeError(
                    f"the gateway exited with code {process.returncode}:\n{gateway.log_tail()}"
                )
            if time.monotonic() > deadline:
                raise TimeoutError(f"the gateway did not start in {timeout_s} s:\n{gateway.log_tail()}")
            time.sleep(1)
        yield gateway
    finally:
        stop(process)


def stop(process: subprocess.Popen, grace_s: float = 60) -> None:
    """SIGINT to mesa-serve (it shuts Serve and its Ray instance down), then SIGKILL to every
    process left in its session: Ray's daemons and vLLM's engine processes live there too, and
    an engine whose replica was killed would otherwise keep running."""
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(grace_s)
        except subprocess.TimeoutExpired:
            pass
    for pid in session_processes(process.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    process.wait()


def session_processes(session_id: int) -> list[int]:
    """Processes whose session id is `session_id` (Linux /proc)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getsid(int(entry.name)) == session_id:
                    pids.append(int(entry.name))
            except (ProcessLookupError, PermissionError):
                continue
    return pids
