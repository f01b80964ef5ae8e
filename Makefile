# Two entry points for a fresh machine (both idempotent; the second run reuses the venv and skips done stages):
#   make demo   install everything, then run the whole pipeline on the built-in demo dataset
#   make test   install everything, then run the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
ARCH := $(shell uname -m)
ifeq ($(ARCH),aarch64)
TORCH_PAIR := torch==2.9.1 torchvision==0.24.1
else
TORCH_PAIR := torch==2.14.1 torchvision==0.29.1
endif
STAMP := $(VENV)/.weakseg-installed

.PHONY: demo test install bench clean-runs

demo: $(STAMP)
	$(VENV)/bin/weakseg run configs/demo.yaml $(ARGS)

test: $(STAMP)
	$(VENV)/bin/pytest -q $(ARGS)

install: $(STAMP)

# torch/torchvision first, explicitly and with pip (the pair on local disk), then the project and its extras.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch, torchvision" 2>/dev/null || $(PY) -m pip install $(TORCH_PAIR)
	$(PY) -m pip install -e ".[dev,crf,smp,onnx,report]"
	touch $(STAMP)

clean-runs:
	rm -rf runs
