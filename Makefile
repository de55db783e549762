# Quickstart: `make run` (install + `dvc repro` on the defaults) and `make test`.
# The install is idempotent: it re-runs only when pyproject.toml changes.
VENV   ?= .venv
PYTHON ?= python3
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# A real tracking store with a model registry, in the repo root, unless the caller set one.
export MLFLOW_TRACKING_URI ?= sqlite:///$(CURDIR)/mlflow.db
export GX_ANALYTICS_ENABLED := false
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: install run test test-fast params clean-run ui

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch 2.14.1 / torchvision 0.29.1 come from this machine's disk (the pip constraint file caps them).
	# uv installs the same set as pip, with pip's own index settings and constraints, ~4x faster
	# (tools/fast_install.py); plain pip is the fallback wherever uv cannot be had. Modules are
	# byte-compiled here, not on first import: an environment may set PYTHONDONTWRITEBYTECODE (this
	# box does, and so does this Makefile), and then every stage process would compile torch anew.
	$(BIN)/python tools/fast_install.py --python $(BIN)/python -- -e '.[dev]' || { \
	  echo "make install: uv did not install; pip does"; \
	  $(BIN)/python -m pip install --quiet --no-compile -e '.[dev]' && \
	  { $(BIN)/python -m compileall -qq -j 0 $$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])') || true; }; }
	touch $(STAMP)

params: install
	$(BIN)/python -m pipeline.config compose -o params.yaml $(OVERRIDES)

run: install
	@PATH=$(CURDIR)/$(BIN):$$PATH; \
	start=$$(date +%s); dvc repro; rc=$$?; \
	python -m pipeline.gate --show reports/gate.json --since $$start --repro-rc $$rc; \
	echo; echo "MLflow UI on this store:  $(BIN)/mlflow ui --backend-store-uri $(MLFLOW_TRACKING_URI)"; \
	exit $$rc

# One pytest worker per core, at most 4 (a smoke test holds a `dvc repro` of about 1 GB RSS);
# `--dist loadfile` keeps a module on one worker, so its module-scoped fixtures are built once.
# TEST_JOBS=0 runs in one process (pdb, -x).
TEST_JOBS ?= $(shell n=$$(nproc 2>/dev/null || echo 1); [ $$n -gt 4 ] && n=4; [ $$n -lt 2 ] && n=0; echo $$n)
XDIST = $(if $(filter 0,$(TEST_JOBS)),,-n $(TEST_JOBS) --dist loadfile --no-loadscope-reorder)

test: install
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/python -m pytest $(XDIST) $(PYTEST_ARGS)

# Everything but the smoke tier (real `dvc repro` in a repo copy): the quick loop while coding.
test-fast: install
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/python -m pytest $(XDIST) -m "not smoke" $(PYTEST_ARGS)

ui: install
	$(BIN)/mlflow ui --backend-store-uri $(MLFLOW_TRACKING_URI)
