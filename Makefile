# Two commands a newcomer needs: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell sha1sum pyproject.toml | cut -c1-12)

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev,train,postgres]'
	rm -f $(VENV)/.installed-* && touch $@

demo: $(STAMP)
	$(BIN)/egiz demo

test: $(STAMP)
	$(BIN)/pytest

lint: $(STAMP)
	$(BIN)/ruff check gateway cloud_sync tests bench images
	$(BIN)/mypy
	$(BIN)/mypy bench

bench: $(STAMP)
	$(BIN)/python bench/ingest.py
	$(BIN)/python bench/buffer.py
	$(BIN)/python bench/sync.py
	$(BIN)/python bench/detect.py
	$(BIN)/python bench/detect_real.py
	$(BIN)/python bench/viewer.py
	$(BIN)/python bench/connectors.py
	$(BIN)/python bench/oee.py
	$(BIN)/python bench/footprint.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .egiz-demo
