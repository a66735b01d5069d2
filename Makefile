# One-command entry points. `make test` and `make demo` each create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch 2.14.1 / torchvision 0.29.1 match each other; any torch >= 2.4 with its torchvision works.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1

.PHONY: install test test-all demo clean gpu-check camera-experiment distill-experiment

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_SPEC)
	$(BIN)/pip install -q -e ".[dev,train,baseline,export,serve]"
	touch $@

install: $(VENV)/.installed

# Two test processes (pytest-xdist), one file per process at a time, one torch thread each (conftest.py):
# 5 min on a 2-core CPU instead of 14-20 min in one process.
PYTEST_PARALLEL ?= -n 2 --dist loadfile

test: install
	$(BIN)/pytest -q $(PYTEST_PARALLEL)

test-all: install
	$(BIN)/pytest -q $(PYTEST_PARALLEL) -m "slow or not slow"

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache

demo: install
	$(BIN)/spd demo --out demo_out

# The canonical-camera rule measured (README "Any camera"): two v15-tiny runs, test rooms through
# a 1.5x lens; about 16 min on a 2-core CPU. Results in camera_out/camera_experiment.json.
camera-experiment: install
	$(BIN)/python -m spd.experiments.camera --out camera_out

# Distillation measured (docs/distillation.md): a dense-control teacher on labelled rooms, v15-tiny
# students on its pseudo-labels of other rooms; about 45 min on a 2-core CPU. distill_out/distill_experiment.json.
distill-experiment: install
	$(BIN)/python -m spd.experiments.distill --out distill_out

# The checks that need a GPU (cuda tests, bench on cuda, 50-step bf16 v15 training); figures to docs/gpu/.
# Without CUDA it says so and exits 0. Uses .venv if present, else the machine's python3.
gpu-check:
	bash scripts/gpu_check.sh docs/gpu
