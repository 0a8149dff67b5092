# goleash — every entry point a person or CI uses. Targets that need the host
# set up (BCC, headers, Go toolchains, venv) run `setup` first; it is idempotent.
SHELL := /bin/bash
VENV  := .venv
PY    := $(VENV)/bin/python
export GOLEASH_CACHE ?= /var/cache/goleash

.PHONY: setup demo test test-unit bench mutants proto lint offsets-table image test-image

setup:
	@bash scripts/setup.sh

## the main job: a real Go service leaks, is detected, degraded to HTTP/1.1, recovered
demo: setup
	@$(PY) -m goleash.demo

## the whole suite, BPF tests included (root: without it the probe tests cannot run,
## and a run that skipped them would say nothing about them)
test:
	@if [ "$$(id -u)" != 0 ]; then \
		echo "make test: needs root to attach BPF probes (run \`sudo make test\`);" \
			"\`make test-unit\` runs the tests that need no root" >&2; \
		exit 2; \
	fi
	@$(MAKE) --no-print-directory setup
	@$(PY) -m pytest -q tests

## the agent/control-plane image (deploy/Dockerfile) with podman, from a local
## Debian base made by mmdebstrap: no registry needed
image:
	@bash scripts/image.sh

## the image run as the manifests run it: control-plane and agent containers, a Go
## process on the host, `goleash ps` through the published port (root, podman)
test-image: setup image
	@GOLEASH_TEST_IMAGE=1 $(PY) -m pytest -q tests/image

## pure-Python tests only (no root needed once set up)
test-unit: setup
	@$(PY) -m pytest -q tests/unit

bench: setup
	@$(PY) -m goleash.bench

## plant known bugs (scripts/mutants.py) in a copy of the tree and check that the tests
## meant to catch each one fail (root; ~10 min; not part of `make test`)
mutants: setup
	@$(PY) scripts/mutants.py

## regenerate agent/goleash/gobin/offsets_table.json from every toolchain's DWARF
offsets-table: setup
	@$(PY) -m goleash.gobin.offsets_table

## regenerate agent/goleash/api/ from proto/goleash/v1 (commit the result: CI checks it)
proto: setup
	@$(PY) scripts/genproto.py

lint: setup
	@$(VENV)/bin/ruff check agent tests
	@$(VENV)/bin/ruff format --check agent tests
	@$(VENV)/bin/mypy
