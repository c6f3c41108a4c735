"""Starting or joining Ray with token authentication on, from an empty home directory.

Ray 2.60 clusters authenticate every control-plane call with one shared token. Ray looks for it in
``$RAY_AUTH_TOKEN``, then the file ``$RAY_AUTH_TOKEN_PATH``, then ``~/.ray/auth_token``. A local
``ray.init()`` creates the default file when it is missing (with the process umask, usually 0644),
but ``ray start --head`` does not: on a machine that never ran Ray it fails with "no
authentication token was found". Everything in this project that starts or joins a cluster for
the user goes through this module, so the token exists (mode 0600) before Ray looks for it, its
location is said once, and its value is never printed.

Creating a token only makes sense for a cluster we start ourselves: joining an existing cluster
needs *that* cluster's token, so a missing one is an error that says where to put it.
"""

from __future__ import annotations

import os
import secrets
import stat
import sys
from collections.abc import Callable
from pathlib import Path

AUTH_MODE = "RAY_AUTH_MODE"
TOKEN_ENV = "RAY_AUTH_TOKEN"
TOKEN_PATH_ENV = "RAY_AUTH_TOKEN_PATH"
TOKEN_HINT = (f"copy the cluster's token (on its head node: `ray get-auth-token`) into a file of mode 0600 "
              f"and point {TOKEN_PATH_ENV} at it, or put it in ~/.ray/auth_token")


class RayClusterError(RuntimeError):
    """Ray could not be started or joined; the message says why and what to do."""


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def ray_binary() -> str:
    """The `ray` CLI of this Python environment (a venv's bin/ need not be on PATH), else PATH's."""
    candidate = Path(sys.executable).parent / "ray"
    return str(candidate) if candidate.exists() else "ray"


def token_auth_enabled(env: dict[str, str] | None = None) -> bool:
    """Token auth is on unless the user turned it off explicitly (Ray 2.60's local default)."""
    return (env if env is not None else os.environ).get(AUTH_MODE, "token").lower() == "token"


def auth_token_path(env: dict[str, str] | None = None) -> Path:
    """Where Ray reads the token file: ``$RAY_AUTH_TOKEN_PATH``, else ``~/.ray/auth_token``."""
    explicit = (env if env is not None else os.environ).get(TOKEN_PATH_ENV)
    return Path(explicit).expanduser() if explicit else Path.home() / ".ray" / "auth_token"


def ensure_auth_token(*, create: bool = True, log: Callable[[str], None] = _say) -> Path | None:
    """Make sure Ray will find a token; returns the token file (None: token auth is off, or the
    token comes from ``$RAY_AUTH_TOKEN``).

    A missing file is created with a fresh 256-bit token and mode 0600 (its directory 0700) when
    ``create``; otherwise a missing or empty file raises RayClusterError naming the path. An existing
    file readable by others is narrowed to 0600. One line goes to ``log``; never the token.
    """
    if not token_auth_enabled():
        log(f"Ray token auth is off ({AUTH_MODE}={os.environ[AUTH_MODE]}): anyone who can reach the "
            "cluster's ports can run code on it")
        return None
    if os.environ.get(TOKEN_ENV):
        log(f"Ray token auth: token from ${TOKEN_ENV}")
        return None
    path = auth_token_path()
    if path.is_file() and path.stat().st_size > 0:
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            path.chmod(0o600)
            log(f"Ray token auth: token in {path} (narrowed from mode {mode:04o} to 0600)")
        else:
            log(f"Ray token auth: token in {path}")
        return path
    if path.exists() and not path.is_file():
        raise RayClusterError(f"Ray token path {path} is not a file")
    if not create:
        raise RayClusterError(f"Ray token auth is on but there is no token at {path}: {TOKEN_HINT}")
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    token = secrets.token_hex(32)  # the format of `ray get-auth-token --generate`
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    except OSError as error:
        raise RayClusterError(f"cannot write the Ray token file {path}: {error.strerror}") from None
    with os.fdopen(descriptor, "w") as file:
        file.write(token)
    path.chmod(0o600)  # O_CREAT's mode does not apply to an empty file that already existed
    log(f"Ray token auth: created a new token in {path} (mode 0600; `ray get-auth-token` shows it)")
    return path


def ray_cli_env(base: dict[str, str] | None = None, *, keep_address: bool = False) -> dict[str, str]:
    """Environment for a `ray` CLI child (`ray start`, `ray job submit`): token auth on unless
    turned off, this environment's bin/ first on PATH (the job driver runs `python` from it).
    ``RAY_ADDRESS`` is dropped unless ``keep_address``: the caller names the cluster."""
    env = dict(os.environ if base is None else base)
    if not keep_address:
        env.pop("RAY_ADDRESS", None)
    env.setdefault(AUTH_MODE, "token")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """A `host:port` GCS address must accept a TCP connection: ray.init would otherwise retry a
    dead address for many minutes before it gives up. Other forms (ray://, auto) go to Ray."""
    import socket

    host, sep, port = address.rpartition(":")
    if not sep or "://" in address or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as error:
        raise RayClusterError(
            f"could not join the Ray cluster at {address}: nothing answers there ({error}); "
            "is the cluster up (`ray status`), and is RAY_ADDRESS right?"
        ) from error


def init_ray(address: str | None = None, *, log: Callable[[str], None] = _say, **kwargs):
    """``ray.init`` with the token in place first. ``address`` None joins ``$RAY_ADDRESS`` when set
    (as `ray job submit` sets it), else starts a local instance; "local" always starts one. A
    cluster left by `ray start` is joined only when named (RAY_ADDRESS or ``address``).
    A failure raises RayClusterError with Ray's reason and a hint."""
    import ray

    if ray.is_initialized():
        return ray.get_runtime_context()
    joining = address not in (None, "local") or (address is None and bool(os.environ.get("RAY_ADDRESS")))
    if not joining:
        ensure_auth_token(create=True, log=log)
    elif AUTH_MODE in os.environ or os.environ.get(TOKEN_ENV) or auth_token_path().is_file():
        ensure_auth_token(create=False, log=log)
    # else: joining with no token and no explicit mode; Ray then joins without token auth, as it
    # does by default, and a cluster that wants a token fails below with the hint.
    # Never Ray's own fallback for address=None: it joins the cluster a `ray start` recorded in
    # /tmp/ray/ray_current_cluster, which may be long dead, and then hangs retrying it.
    target = address if address is not None else (os.environ.get("RAY_ADDRESS") or "local")
    if joining:
        _check_reachable(target)
    try:
        return ray.init(address=target, **kwargs)
    except Exception as error:  # Ray raises ConnectionError, AuthenticationError, RuntimeError ...
        reason = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
        where = f"the Ray cluster at {target}" if joining else "a local Ray instance"
        hint = TOKEN_HINT if "auth" in reason.lower() or "token" in reason.lower() else (
            "is the cluster up (`ray status`)?" if joining else "see /tmp/ray/session_latest/logs")
        raise RayClusterError(f"could not start or join {where}: {reason}; {hint}") from error
