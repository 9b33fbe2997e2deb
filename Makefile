# Set-up is two commands on a fresh machine:  `make train` (install + default run) and `make test`.
PY := .venv/bin/python
FASHION_MNIST := data/FashionMNIST/raw/train-images-idx3-ubyte

.PHONY: train test lint clean-venv results

.venv/installed: pyproject.toml
	python3 -m venv .venv || (apt-get install -y -q python3-venv && python3 -m venv .venv) \
	  || (echo "python3 -m venv failed: install python3-venv (apt-get install python3-venv)"; exit 1)
	.venv/bin/pip install --quiet -e ".[dev]"
	touch $@

# Real Fashion-MNIST: an existing local copy, else torchvision's download, else Debian's package.
$(FASHION_MNIST): | .venv/installed
	$(PY) -c 'from src.data.mnist import FashionMNISTDataModule as D; D(data_dir="data", local_copies=["/usr/share/datasets/fashion-mnist"]).prepare_data()' 2>/dev/null \
	  || apt-get install -y -q dataset-fashion-mnist \
	  || (apt-get update -q && apt-get install -y -q dataset-fashion-mnist) \
	  || echo "could not install dataset-fashion-mnist; src.train will say where it looked"

train: .venv/installed $(FASHION_MNIST)
	$(PY) -m src.train $(ARGS)

# Both tiers in one pytest session (one start-up; fast modules fill the cores while slow ones wait on commands):
# the fast tier is in-process on tiny data (alone: pytest -m "not slow", what to run while editing), the slow tier
# runs the commands as a user does (sweeps, DDP, signals). pyproject.toml: one worker per core, a module per worker.
test: .venv/installed
	$(PY) -m ruff check src tests
	$(PY) -m pytest

lint: .venv/installed
	$(PY) -m ruff check src tests
	$(PY) -m ruff format --check src tests

clean-venv:
	rm -rf .venv

# Re-measure RESULTS.md's tables and rewrite them (hours on 2 cores): make results ARGS="--only NAME --cifar-dir DIR"
results: .venv/installed
	$(PY) -m benchmarks.results $(ARGS)
