"""A small garak scan of a base model and its aligned checkpoint, both behind one gateway.

    python -m launch.redteam.garak_scan --setup                 # once: garak's own venv, .venv-garak
    python -m launch.redteam.garak_scan --aligned runs/compare/organism0-seed0/mesa-mask/model
                                         [--base organism]
                                         [--output runs/garak] [--config launch/redteam/garak.yaml]

One `mesa-serve` process serves both models side by side (applications "base" at /base and
"aligned" at /aligned, fresh random API keys); garak, run from `.venv-garak` (README, Engines:
garak's pinned dependencies conflict with vLLM's), scans each through its OpenAI-compatible
generator with the probes and string detectors of `launch/redteam/garak.yaml`, offline. Writes
OUTPUT/{base,aligned}.report.jsonl (garak's reports), OUTPUT/summary.json and OUTPUT/summary.md
(pass rates per probe and detector: the share of answers garak's detector judged safe).

Errors print one line and exit 1: a missing `.venv-garak` (with the command that creates it), a
gateway that does not start, a garak run that fails or leaves a configured probe without results.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import subprocess
import sys
import threading
import time
import venv
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = Path(__file__).resolve().parent / "garak.yaml"
DEFAULT_VENV = ROOT / ".venv-garak"
GARAK_VERSION = "0.17.1"
SETUP_COMMAND = "python -m launch.redteam.garak_scan --setup"
GENERATOR = ("openai", "OpenAICompatible")
# What garak 0.17.1 imports for the OpenAI-compatible generator, the dan/donotanswer/encoding probes
# and their string detectors, found by trial in an empty venv (`--no-deps` garak, then each missing
# module until the scan ran offline); the version ranges are garak's own. The encoding libraries
# (base2048, ecoji, zalgolib) are imported lazily by encoding probes other than the configured ones.
# garak's full dependency set (torch, transformers, langchain, litellm, provider SDKs: ~2 GB) is
# what `--setup --full` installs.
LIGHT_DEPENDENCIES = [
    "openai>=2.0,<3.0",
    "backoff>=2.1.1",
    "httpx",
    "requests",
    "aiohttp",
    "pyyaml",
    "jsonschema",
    "xdg-base-dirs>=6.0.1",
    "colorama>=0.4.3",
    "tqdm>=4.67.1",
    "numpy>=2.0.0",
    "nltk>=3.10.3",
    "langdetect==1.0.9",
    "markdown>=3.10.0",
    "mikeshardmind-base2048>=1.0.2",
    "ecoji>=0.1.1",
    "zalgolib>=0.2.2",
]
# The gateway's engines: two tiny organisms on a 2-core machine. The context covers garak's longest
# DAN prompts (~4.7k characters); longer prompts come back as HTTP 400 and count as "nones".
ENGINE = {"dtype": "float32", "gpu_memory_utilization": 0.1, "max_model_len": 4096, "max_num_seqs": 16}
LABELS = ("base", "aligned")


class ScanError(RuntimeError):
    """A one-line, user-facing failure."""


def log(message: str) -> None:
    print(f"[garak-scan] {message}", flush=True)


# -- garak's virtualenv ---------------------------------------------------------------------------


def venv_python(venv_dir: Path) -> Path:
    return venv_dir / "bin" / "python"


def require_garak(venv_dir: Path) -> Path:
    """The venv's python, or a ScanError saying how to create the venv."""
    python = venv_python(venv_dir)
    hint = f"create it with: {SETUP_COMMAND} (or: make garak-setup)"
    if not python.exists():
        raise ScanError(f"garak's virtualenv {venv_dir} is missing; {hint}")
    probe = subprocess.run(
        [str(python), "-c", "import importlib.metadata as m; print(m.version('garak'))"],
        capture_output=True,
        text=True,
    )
    if probe.returncode != 0:
        raise ScanError(f"garak is not installed in {venv_dir}; {hint}")
    if probe.stdout.strip() != GARAK_VERSION:
        log(
            f"warning: {venv_dir} has garak {probe.stdout.strip()}; "
            f"this config was written for {GARAK_VERSION}"
        )
    return python


def directory_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def _cpu_torch_constraint() -> list[str]:
    """On a CPU install, pin garak's torch to this environment's CPU build: left alone, pip picks
    the newest torch, whose wheels pull several GB of CUDA libraries."""
    try:
        from importlib.metadata import version

        torch_version = version("torch")
    except Exception:
        return []
    return [f"torch=={torch_version}"] if "+cpu" in torch_version else []


def setup_venv(venv_dir: Path = DEFAULT_VENV, *, full: bool = False) -> dict:
    """Create `venv_dir` and install garak there: `--no-deps` plus LIGHT_DEPENDENCIES, or with all of
    garak's dependencies (`full`). Returns what it took (seconds, bytes)."""
    started = time.monotonic()
    log(
        f"creating {venv_dir} "
        f"({'garak with all its dependencies' if full else 'garak --no-deps + light deps'})"
    )
    venv.EnvBuilder(with_pip=True, clear=venv_dir.exists()).create(venv_dir)
    pip = [str(venv_python(venv_dir)), "-m", "pip", "install", "--disable-pip-version-check"]
    if full:
        constraints = venv_dir / "constraints.txt"
        constraints.write_text("\n".join(_cpu_torch_constraint()) + "\n")
        commands = [pip + [f"garak=={GARAK_VERSION}", "-c", str(constraints)]]
    else:
        # garak last: installed before its light deps, pip would list every unmet pin as an error
        commands = [pip + LIGHT_DEPENDENCIES, pip + ["--no-deps", f"garak=={GARAK_VERSION}"]]
    for command in commands:
        log("$ " + " ".join(command[2:]))
        if subprocess.run(command).returncode != 0:
            raise ScanError(f"pip failed while installing garak into {venv_dir} (see pip's output above)")
    require_garak(venv_dir)
    result = {
        "garak": GARAK_VERSION,
        "mode": "full" if full else "light",
        "seconds": round(time.monotonic() - started, 1),
        "bytes": directory_size(venv_dir),
    }
    (venv_dir / "mesa-garak-setup.json").write_text(json.dumps(result, indent=1) + "\n")
    log(
        f"garak {GARAK_VERSION} ready in {venv_dir}: {result['seconds']} s, {result['bytes'] / 2**20:.0f} MiB"
    )
    return result


# -- garak's config and report --------------------------------------------------------------------


def load_config(path: Path) -> dict:
    if not path.is_file():
        raise ScanError(f"garak config not found: {path}")
    config = yaml.safe_load(path.read_text())
    if not isinstance(config, dict):
        raise ScanError(f"{path}: not a garak config (expected a YAML mapping)")
    return config


def generator_options(config: dict) -> dict:
    family, name = GENERATOR
    return (
        config.setdefault("plugins", {})
        .setdefault("generators", {})
        .setdefault(family, {})
        .setdefault(name, {})
    )


def configured_probes(config: dict) -> list[str]:
    """The probes of run.spec.include, as garak names them in reports ("dan.DUDE")."""
    include = ((config.get("run") or {}).get("spec") or {}).get("include") or []
    return [entry.removeprefix("probes.") for entry in include if entry.startswith("probes.")]


def key_env_var(config: dict) -> str:
    return generator_options(config).get("key_env_var") or "OPENAICOMPATIBLE_API_KEY"


def model_config(template: dict, *, uri: str, model: str, report_dir: Path, prefix: str) -> dict:
    """The template aimed at one model: generator URI and model name, report location."""
    config = json.loads(json.dumps(template))  # deep copy
    if "api_key" in generator_options(config):
        raise ScanError("the garak config holds an api_key; keys come from the environment only")
    config["plugins"]["target_type"] = ".".join(GENERATOR)
    config["plugins"]["target_name"] = model
    generator_options(config)["uri"] = uri
    reporting = config.setdefault("reporting", {})
    reporting["report_dir"] = str(report_dir.resolve())
    reporting["report_prefix"] = prefix
    return config


def parse_report(path: Path) -> list[dict]:
    """garak's `entry_type: eval` rows: passed / evaluated outputs per probe and detector.

    `passed` counts outputs the detector scored below the threshold (a safe answer), `fails` those
    at or above it, `nones` outputs that never came back (errors); pass_rate = passed / (passed +
    fails), None when nothing was evaluated."""
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as error:
            raise ScanError(f"{path}:{number}: not JSON ({error})") from None
        if entry.get("entry_type") != "eval":
            continue
        passed, fails = int(entry["passed"]), int(entry.get("fails", 0))
        total = int(entry.get("total_evaluated", passed + fails))
        rows.append(
            {
                "probe": entry["probe"],
                "detector": entry["detector"],
                "passed": passed,
                "total": total,
                "nones": int(entry.get("nones", 0)),
                "pass_rate": passed / total if total else None,
            }
        )
    return rows


def check_report(rows: list[dict], probes: list[str], label: str, report: Path) -> list[str]:
    """Problems that make a scan unusable; garak exits 0 even when a probe failed to load."""
    seen = {row["probe"] for row in rows}
    missing = [p for p in probes if p not in seen and not any(s.startswith(p + ".") for s in seen)]
    problems = []
    if missing:
        problems.append(f"{label}: no results for probe(s) {', '.join(missing)} in {report}")
    empty = sorted({row["probe"] for row in rows if row["total"] == 0})
    if empty:
        problems.append(f"{label}: every answer to {', '.join(empty)} failed (all nones)")
    return problems


def summarize(results: dict[str, list[dict]]) -> dict:
    """Pass rates per (probe, detector) side by side, plus totals over all rows per model."""
    keys = []
    for rows in results.values():
        for row in rows:
            if (row["probe"], row["detector"]) not in keys:
                keys.append((row["probe"], row["detector"]))
    table = []
    for probe, detector in keys:
        entry = {"probe": probe, "detector": detector}
        for label, rows in results.items():
            match = next((r for r in rows if (r["probe"], r["detector"]) == (probe, detector)), None)
            entry[label] = (
                None if match is None else {k: match[k] for k in ("passed", "total", "nones", "pass_rate")}
            )
        table.append(entry)
    totals = {}
    for label, rows in results.items():
        passed, total = sum(r["passed"] for r in rows), sum(r["total"] for r in rows)
        totals[label] = {
            "passed": passed,
            "total": total,
            "nones": sum(r["nones"] for r in rows),
            "pass_rate": passed / total if total else None,
        }
    return {"rows": table, "totals": totals}


def _rate(cell: dict | None) -> str:
    if cell is None:
        return "-"
    if cell["pass_rate"] is None:
        return f"n/a (0/0, {cell['nones']} none)"
    nones = f", {cell['nones']} none" if cell["nones"] else ""
    return f"{100 * cell['pass_rate']:.1f} ({cell['passed']}/{cell['total']}{nones})"


def markdown_table(summary: dict, labels: list[str]) -> str:
    header = "| probe | detector | " + " | ".join(f"{label} pass % (passed/n)" for label in labels)
    delta = len(labels) == 2
    lines = [header + (f" | {labels[1]} - {labels[0]} (pp) |" if delta else " |")]
    lines.append("|" + " --- |" * (2 + len(labels) + delta))
    for row in summary["rows"] + [{"probe": "**all rows**", "detector": "", **summary["totals"]}]:
        cells = [row["probe"], row["detector"]] + [_rate(row.get(label)) for label in labels]
        if delta:
            a, b = row.get(labels[0]), row.get(labels[1])
            ok = a and b and a["pass_rate"] is not None and b["pass_rate"] is not None
            cells.append(f"{100 * (b['pass_rate'] - a['pass_rate']):+.1f}" if ok else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# -- running garak --------------------------------------------------------------------------------

_NOISE = re.compile(r"it/s\]|s/it\]|\d+%\||^\s*$")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def run_garak(
    python: Path, config_path: Path, *, api_key: str, key_env: str, log_path: Path, timeout_s: float
) -> str:
    """garak on one config; its output goes to `log_path`, result lines are echoed. Returns the
    output (ANSI colours removed)."""
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env |= {key_env: api_key, "TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1"}
    command = [str(python), "-m", "garak", "--config", str(config_path)]
    output = []
    with open(log_path, "w") as log_file:
        process = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            text=True,
            errors="replace",
            cwd=config_path.parent,
        )
        killed = []
        timer = threading.Timer(timeout_s, lambda: (killed.append(True), process.kill()))
        timer.start()
        try:
            for line in process.stdout:
                log_file.write(line)
                output.append(line)
                for part in _ANSI.sub("", line).split("\r"):
                    if not _NOISE.search(part):
                        print("  garak | " + part.rstrip(), flush=True)
            returncode = process.wait()
        finally:
            timer.cancel()
            if process.poll() is None:
                process.kill()
                process.wait()
    if killed:
        raise ScanError(f"garak ran past {timeout_s:.0f} s on {config_path.name}; see {log_path}")
    text = _ANSI.sub("", "".join(output))
    if returncode != 0:
        raise ScanError(f"garak failed (exit {returncode}) on {config_path.name}; see {log_path}")
    failures = sorted(set(re.findall(r"failed to load (?:probe|detector|generator) \S+", text)))
    if failures or "Didn't successfully import" in text:
        what = "; ".join(failures) or "a plugin failed to import"
        raise ScanError(f"garak: {what} (missing dependency in .venv-garak?); see {log_path} and garak.log")
    return text


def scan(args) -> dict:
    python = require_garak(args.garak_venv)
    template = load_config(args.config)
    probes = configured_probes(template)
    if not probes:
        raise ScanError(f"{args.config}: run.spec.include names no probes")
    aligned = Path(args.aligned)
    if not (aligned / "config.json").is_file():
        raise ScanError(f"--aligned {aligned}: not a checkpoint directory (no config.json)")
    output = Path(args.output).resolve()
    output.mkdir(parents=True, exist_ok=True)
    models = {"base": args.base, "aligned": str(aligned.resolve())}

    from launch.processes import gateway_app, running_gateway

    user_key, admin_key = secrets.token_hex(16), secrets.token_hex(16)
    applications = [
        gateway_app(label, route_prefix=f"/{label}", model=model, engine=dict(ENGINE), num_cpus=args.num_cpus)
        for label, model in models.items()
    ]
    env = {"MESA_API_KEYS": user_key, "MESA_ADMIN_KEY": admin_key}
    started = time.monotonic()
    log(
        f"starting one gateway with base={models['base']} and aligned={models['aligned']} "
        f"(two vLLM engines, ~1-2 min on CPU; log: {output / 'gateway.log'})"
    )
    summary = {"garak": GARAK_VERSION, "config": str(args.config), "models": {}}
    results = {}
    try:
        with running_gateway(
            applications, env=env, log_path=output / "gateway.log", timeout_s=args.gateway_timeout
        ) as gateway:
            log(f"gateway up at {gateway.url} after {time.monotonic() - started:.0f} s")
            for label in LABELS:
                config = model_config(
                    template, uri=f"{gateway.url}/{label}/v1", model=label, report_dir=output, prefix=label
                )
                config_path = output / f"{label}.garak.yaml"
                config_path.write_text(yaml.safe_dump(config, sort_keys=False))
                report = output / f"{label}.report.jsonl"
                report.unlink(missing_ok=True)
                log(
                    f"garak on {label} ({models[label]}): {len(probes)} probes; "
                    f"log: {output / (label + '.garak.log')}"
                )
                t0 = time.monotonic()
                run_garak(
                    python,
                    config_path,
                    api_key=user_key,
                    key_env=key_env_var(template),
                    log_path=output / f"{label}.garak.log",
                    timeout_s=args.garak_timeout,
                )
                if not report.is_file():
                    raise ScanError(
                        f"garak wrote no report at {report}; see {output / (label + '.garak.log')}"
                    )
                rows = parse_report(report)
                problems = check_report(rows, probes, label, report)
                if problems:
                    raise ScanError("; ".join(problems))
                results[label] = rows
                summary["models"][label] = {
                    "model": models[label],
                    "report": str(report),
                    "wall_s": round(time.monotonic() - t0, 1),
                }
                log(f"garak on {label} done in {time.monotonic() - t0:.0f} s")
    except (RuntimeError, TimeoutError) as error:
        if isinstance(error, ScanError):
            raise
        first = str(error).strip().splitlines()[0]
        raise ScanError(f"the gateway failed: {first}; see {output / 'gateway.log'}") from None
    summary |= summarize(results)
    summary["wall_s"] = round(time.monotonic() - started, 1)
    table = markdown_table(summary, list(LABELS))
    (output / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    (output / "summary.md").write_text(
        f"# garak {GARAK_VERSION} scan: base vs aligned\n\n"
        f"base = `{models['base']}`, aligned = `{models['aligned']}`; config `{args.config}`; "
        f"{summary['wall_s']:.0f} s in all.\n"
        "Pass % = answers garak's detector judged safe / answers evaluated (higher is safer); "
        "'none' = requests that returned no answer (e.g. a prompt longer than the context).\n\n"
        + table
        + "\n"
    )
    print(table, flush=True)
    log(f"wrote {output / 'summary.json'} and {output / 'summary.md'} ({summary['wall_s']:.0f} s in all)")
    return summary


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m launch.redteam.garak_scan", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--setup", action="store_true", help=f"create the garak venv (garak {GARAK_VERSION}) and exit"
    )
    parser.add_argument(
        "--full", action="store_true", help="with --setup: all of garak's dependencies (~2 GB)"
    )
    parser.add_argument("--aligned", help="aligned checkpoint directory (with config.json)")
    parser.add_argument(
        "--base", default="organism", help="base model: 'organism' or a checkpoint (default: organism)"
    )
    parser.add_argument(
        "--output", type=Path, default=Path("runs/garak"), help="output directory (default: runs/garak)"
    )
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="garak config template")
    parser.add_argument(
        "--garak-venv", type=Path, default=DEFAULT_VENV, help="garak's virtualenv (default: .venv-garak)"
    )
    parser.add_argument(
        "--num-cpus", type=float, default=0.5, help="Ray CPUs per gateway application (default: 0.5)"
    )
    parser.add_argument("--gateway-timeout", type=float, default=900, help="seconds to wait for the gateway")
    parser.add_argument("--garak-timeout", type=float, default=3600, help="seconds one garak run may take")
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.setup:
            setup_venv(args.garak_venv, full=args.full)
            return
        if not args.aligned:
            parser.error("--aligned is required (an aligned checkpoint directory), or --setup")
        scan(args)
    except ScanError as error:
        print(f"garak_scan: error: {error}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("garak_scan: interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
