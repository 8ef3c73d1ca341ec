# Two commands on a fresh clone: `make run` serves, `make test` tests.
# Both create .venv, install the pinned project and the viewer's JavaScript first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 5000
# options of the benchmarks, e.g. make bench ARGS="--scenarios jpeg --repeat 1"
ARGS ?=

.PHONY: install run test bench bench-pregen lint clean

$(BIN)/.installed: pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c requirements.lock -e '.[dev]'
	touch $@

node_modules/.installed: package.json package-lock.json
	npm ci --omit=peer --no-audit --no-fund --loglevel=error
	touch $@

install: $(BIN)/.installed node_modules/.installed

run: install
	$(BIN)/tileserver serve --host $(HOST) --port $(PORT)

test: install
	$(BIN)/python -m pytest

bench: install
	$(BIN)/python -m bench.tiles $(ARGS)

bench-pregen: install
	$(BIN)/python -m bench.pregen $(ARGS)

# ruff (style, imports, docstrings) and mypy (types of app/; [tool.mypy] in pyproject.toml)
lint: install
	$(BIN)/ruff check app tests bench
	$(BIN)/mypy

# what `make install` and `make run` create (the demo slide, the tile cache, the audit log)
clean:
	rm -rf $(VENV) node_modules data tile_cache audit
