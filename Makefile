# Every target sets up what it needs: Debian packages (when root and missing) and .venv/.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEBS := mosquitto mosquitto-clients nats-server prometheus systemd lintian binutils python3-venv
N ?= 20000
# Eclipse Tahu's JavaScript Sparkplug client: the outside witness of tests/tahu/test_tahu.py.
TAHU := $(VENV)/tahu/node_modules/sparkplug-client/package.json
TAHU_VERSION := 3.2.4
# examples/read_jetstream.mjs's packages, exactly as its package-lock.json pins them.
JSREADER := $(VENV)/jsreader/node_modules/protobufjs/package.json

.PHONY: demo test lint typecheck protos bench profile hil clean debs venv package

demo: $(STAMP)
	$(BIN)/python -m devkit demo --readings $(N)

test: $(STAMP) $(TAHU) $(JSREADER)
	$(BIN)/ruff check bridge devkit tests tools bench examples hil
	$(BIN)/mypy
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check bridge devkit tests tools bench examples hil

typecheck: $(STAMP)
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python -m bench $(if $(QUICK),--quick,)

profile: $(STAMP)
	$(BIN)/python -m pip install -q py-spy
	$(BIN)/python -m bench.profile $(if $(LOAD),--load $(LOAD),)

# Every hil/ scenario at full size in network namespaces (root); the table goes to docs/hil.md.
hil: $(STAMP)
	$(BIN)/python -m hil run all --write

# The gateway package: build/bridge_<version>_<arch>.deb (tools/build_deb.py; PACKAGE_DIR=...).
package: $(STAMP)
	$(BIN)/python tools/build_deb.py $(or $(PACKAGE_DIR),build)

protos: $(STAMP)
	$(BIN)/python tools/gen_protos.py

venv: $(STAMP)

NEED_NPM = @command -v npm >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nodejs npm; \
	  else echo "error: npm is missing (run: sudo apt-get install nodejs npm)"; exit 1; fi; }

$(TAHU): | $(STAMP)
	$(NEED_NPM)
	npm install --prefix $(VENV)/tahu --no-audit --no-fund --silent sparkplug-client@$(TAHU_VERSION)

$(JSREADER): examples/package.json examples/package-lock.json | $(STAMP)
	$(NEED_NPM)
	mkdir -p $(VENV)/jsreader
	cp examples/package.json examples/package-lock.json $(VENV)/jsreader/
	npm ci --prefix $(VENV)/jsreader --no-audit --no-fund --silent

debs:
	@missing=""; for p in $(DEBS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing Debian packages:$$missing"; \
	    DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	  else echo "error: missing Debian packages:$$missing (run: sudo apt-get install$$missing)"; exit 1; fi; \
	fi
	@# The packaged mosquitto/nats services are not needed by the bridge's own demo and tests,
	@# which start private brokers on free ports.

$(STAMP): pyproject.toml | debs
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache .pytest_cache .ruff_cache
