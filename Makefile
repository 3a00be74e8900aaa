# moeserve: two commands do all set-up on a fresh machine.
#   make run   - set up, then run the main job: the embedded cluster (`moeserve up`) on 127.0.0.1:8000
#   make test  - set up, then lint, check layer boundaries and run the whole test suite
#   make bench - run every benchmark and rewrite its results in docs/benchmarks.md (ARGS="--only NAME")
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# SGLang's own code for the conformance tests, installed --no-deps (its requirements pull CUDA torch).
SGLANG_REQS := tests/doubles/sglang_cpu/requirements.txt
# Reinstall only when a dependency list changes.
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml $(SGLANG_REQS) | cksum | cut -d' ' -f1)

.PHONY: setup run test lint fmt bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml $(SGLANG_REQS)
	@# Mooncake's transfer engine loads libibverbs even for TCP; install it when we can (root).
	@if ! ldconfig -p 2>/dev/null | grep -q libibverbs.so.1; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libibverbs1; \
	  else echo "warning: Debian package libibverbs1 is missing and we are not root; KV transfer will not load" >&2; fi; \
	fi
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@# Linters of the deployment files (docker-compose.yml, deploy/Dockerfile.*), from npm.
	@if command -v npm >/dev/null 2>&1 && [ ! -x $(VENV)/node/node_modules/.bin/dclint ]; then \
	  npm install --silent --no-audit --no-fund --prefix $(VENV)/node dclint@3.1.0 dockerfile-utils@0.16.3; \
	fi
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	$(BIN)/python -m pip install -q --no-deps -r $(SGLANG_REQS)
	@rm -f $(VENV)/.installed-*
	@touch $@

run: setup
	OMP_NUM_THREADS=1 $(BIN)/moeserve up $(ARGS)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports
	$(BIN)/mypy
	$(BIN)/python scripts/gen_proto.py --check
	$(BIN)/python scripts/helm_docs.py --check
	$(BIN)/python scripts/planner_docs.py --check

fmt: setup
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

test: lint
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q

bench: setup
	OMP_NUM_THREADS=1 $(BIN)/python bench/all.py $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
