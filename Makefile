PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test

.PHONY: demo test bench bench-peers lint docs clean zoo zoo-tracr

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet -e .
	touch $@

$(TEST_STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet -e ".[test,dev]"
	touch $@ $(STAMP)

## make demo: learn an explanation of a shipped model, print it and write a PNG
demo: $(STAMP)
	$(BIN)/explainer train --model planted-joint --seed 0 --out demo-run --overwrite
	$(BIN)/explainer show demo-run --png demo-run/masks.png

## make test: the whole test suite, notebooks included, on TEST_WORKERS processes (most tests
## compile and step small programs on one core, so two processes use a two-core machine)
TEST_WORKERS ?= 2
test: $(TEST_STAMP)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist worksteal

bench: $(TEST_STAMP)
	$(BIN)/python benchmarks/speed.py
	$(BIN)/python benchmarks/robustness.py
	$(BIN)/python benchmarks/zoo.py
	$(BIN)/python benchmarks/reliability.py
	$(BIN)/python benchmarks/scale.py
	$(BIN)/python benchmarks/growth.py
	$(BIN)/python benchmarks/frontier.py
	$(BIN)/python benchmarks/optimality.py

## the peer race: auto-circuit in its own environment (.venv-peers) against ours, on induction and ioi
PEERS := .venv-peers
PEERS_STAMP := $(PEERS)/.installed

$(PEERS_STAMP): benchmarks/peers-requirements.txt
	$(PYTHON) -m venv $(PEERS)
	$(PEERS)/bin/python -m pip install --quiet --upgrade pip
	$(PEERS)/bin/pip install --quiet -r benchmarks/peers-requirements.txt
	touch $@

bench-peers: $(TEST_STAMP) $(PEERS_STAMP)
	$(PEERS)/bin/python -m doctest benchmarks/peers_run.py
	$(BIN)/python benchmarks/peers.py --peers-python $(PEERS)/bin/python

lint: $(TEST_STAMP)
	$(BIN)/ruff check explainer adversary tests benchmarks notebooks docs
	$(BIN)/ruff format --check explainer adversary tests benchmarks notebooks docs

## make docs: rewrite the generated pages of docs/ (cli.md, settings.md, results.md) from the code and results
docs: $(TEST_STAMP)
	$(BIN)/python docs/generate.py

## regenerate the planted models shipped in the zoo (deterministic, no training)
zoo: $(STAMP)
	$(BIN)/python -m explainer.zoo.planted

## regenerate the tracr-compiled models shipped in the zoo (needs the tracr extra, part of the test extras)
zoo-tracr: $(TEST_STAMP)
	$(BIN)/python -m explainer.zoo.tracr_import

clean:
	rm -rf $(VENV) $(PEERS) demo-run .pytest_cache
