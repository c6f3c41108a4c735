"""Child processes for tests, benchmarks and the demo: the gateway (`mesa-serve` on a Serve config
written from Python, its own local Ray instance, stopped with its whole process group) and a
Prometheus server scraping it with deploy/prometheus/rules.yml."""

from __future__ import annotations

import json
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
RULES = Path(__file__).resolve().parent.parent / "deploy" / "prometheus" / "rules.yml"


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
    args: list[str] | None = None,
):
    """Start `mesa-serve` on `applications` (with more command-line `args`), wait until it
    serves, stop it on exit."""
    port = port or free_port()
    workdir = Path(tempfile.mkdtemp(prefix="mesa-gateway-"))
    config_path = workdir / "serve.yaml"
    config_path.write_text(yaml.safe_dump(serve_config(applications, port)))
    log_path = Path(log_path) if log_path else workdir / "gateway.log"
    child_env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | env
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [sys.executable, "-u", "-m", "serving.cli", str(config_path), *(args or [])],
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


def stop(process: subprocess.Popen, grace_s: float = 60, first: signal.Signals = signal.SIGINT) -> None:
    """`first` (SIGINT: mesa-serve shuts Serve and its Ray instance down), then SIGKILL to every
    process left in its session: Ray's daemons and vLLM's engine processes live there too, and
    an engine whose replica was killed would otherwise keep running."""
    if process.poll() is None:
        process.send_signal(first)
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


@contextmanager
def running_prometheus(targets: list[str], workdir: Path, *, binary: str = "prometheus",
                       scrape_interval: str = "1s", timeout_s: float = 60, rules: str | None = None):
    """A Prometheus server scraping `targets` and evaluating the gateway's alert rules (or the
    rules file text `rules`); yields its HTTP API base URL (http://127.0.0.1:PORT/api/v1) once
    every target is up. A target is host:port (metrics at /metrics) or a full metrics URL (an
    application under a route prefix: http://host:port/aligned/metrics)."""
    import httpx

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "rules.yml").write_text(RULES.read_text() if rules is None else rules)
    scrape_configs = []
    for i, target in enumerate(targets):
        url = httpx.URL(target if "://" in target else f"http://{target}/metrics")
        scrape_configs.append({"job_name": f"mesa-gateway-{i}", "metrics_path": url.path,
                               "static_configs": [{"targets": [f"{url.host}:{url.port}"]}]})
    config = {
        "global": {"scrape_interval": scrape_interval, "evaluation_interval": scrape_interval},
        "rule_files": ["rules.yml"],
        "scrape_configs": scrape_configs,
    }
    (workdir / "prometheus.yml").write_text(json.dumps(config))
    port = free_port()
    with open(workdir / "prometheus.log", "w") as log:  # the child keeps its own copy of the handle
        process = subprocess.Popen(
            [binary, f"--config.file={workdir / 'prometheus.yml'}", f"--storage.tsdb.path={workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}"],
            stdout=subprocess.DEVNULL, stderr=log,
        )
    api = f"http://127.0.0.1:{port}/api/v1"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                active = httpx.get(f"{api}/targets").json()["data"]["activeTargets"]
                if len(active) == len(targets) and all(t["health"] == "up" for t in active):
                    break
            except (httpx.HTTPError, KeyError, ValueError):
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"Prometheus did not come up with every target; see "
                                   f"{workdir}/prometheus.log")
            time.sleep(1)
        yield api
    finally:
        process.terminate()
        process.wait(30)


def alerts(api: str, name: str) -> dict[tuple, str]:
    """The states (pending / firing) of alert `name`, by its labels other than alertname/severity."""
    import httpx

    result = {}
    for alert in httpx.get(f"{api}/alerts").json()["data"]["alerts"]:
        labels = dict(alert["labels"])
        if labels.pop("alertname") == name:
            labels.pop("severity", None)
            result[tuple(sorted(labels.items()))] = alert["state"]
    return result
