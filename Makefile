# One command for the main job, one for the tests; both create the environment they need.
PYTHON ?= python3
VENV ?= .venv
DEMO_DIR ?= demo-data
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv demo test test-fast check ui similar validate clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

## The whole pipeline on a generated sample dataset in $(DEMO_DIR), through Dagster; MODEL=clip_vit_b_32 for a CLIP.
demo: $(STAMP)
	$(BIN)/python -m imgemb_assets.demo --data-dir $(DEMO_DIR) $(if $(MODEL),--model $(MODEL))

## The test suite, slow end-to-end tests included (CI runs this).
test: $(STAMP)
	$(BIN)/python -m pytest

## The lint, format and type gate (CI runs it before the tests).
check: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

## The tests without the slow end-to-end ones.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow"

## The Dagster UI on the demo's instance and data (run `make demo` first).
ui: $(STAMP)
	set -a && . $(DEMO_DIR)/demo.env && set +a && DAGSTER_MAX_PARTITIONS_FOR_DA_TIMESTAMP_FETCH=2000 \
		$(BIN)/dagster dev -w workspace.yaml

## The images most like one of the demo's (ID=img_000012) or like a photo file (IMAGE=path/to/photo.jpg).
similar: $(STAMP)
	set -a && . $(DEMO_DIR)/demo.env && set +a && $(BIN)/imgemb similar $(if $(IMAGE),--image $(IMAGE),$(ID))

validate: $(STAMP)
	$(BIN)/dagster definitions validate -w workspace.yaml

clean:
	rm -rf $(DEMO_DIR) $(VENV) *.egg-info

## The container image, built with root podman (no Docker or registry needed; storage in
## IMGEMB_IMAGE_SCRATCH, default /var/tmp/imgemb-image), and its smoke test. Not part of CI.
.PHONY: image image-smoke image-clean
image:
	deploy/image/build.sh

image-smoke: image
	deploy/image/smoke_test.sh

image-clean:
	deploy/image/clean.sh
