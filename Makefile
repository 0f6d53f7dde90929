# Two commands for a newcomer: `make demo` and `make test`. Both create (or reuse) the virtual environment
# and install everything they need; nothing has to be installed beforehand.
VENV ?= .venv
PYTHON ?= python3
# A CPU build of torch; on a GPU machine use e.g. `make TORCH_SPEC='torch>=2.4' test`.
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
# Two steps, so `make demo` does not wait for what only the tests drive (the OpenAI clients, lm-eval, bitsandbytes).
STAMP := $(VENV)/.road_vlm-installed
DEV_STAMP := $(VENV)/.road_vlm-dev-installed

.PHONY: install demo test test-fast gpu-check clean

install: $(DEV_STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e .
	touch $(STAMP)

$(DEV_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -e ".[dev,serve,quant]"
	touch $(DEV_STAMP)

demo: $(STAMP)
	$(VENV)/bin/road-vlm demo $(DEMO_ARGS)

# The whole suite, slow end-to-end tests included (this is what CI runs); the 25 slowest tests are listed at the end.
test: $(DEV_STAMP)
	DS_ACCELERATOR=cpu $(PY) -m pytest -q -ra --durations=25; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: treating as a failure"; exit 1; fi; exit $$rc

# Everything except the tests marked slow.
test-fast: $(DEV_STAMP)
	DS_ACCELERATOR=cpu $(PY) -m pytest -q -ra -m "not slow"

# On a GPU machine: the one-shot GPU check with the machine's own CUDA torch (no venv, nothing downloaded);
# writes benchmarks/results/<date>-<gpu>.{json,md}. `bash scripts/gpu_check.sh --dry-run` runs it on a CPU.
gpu-check:
	bash scripts/gpu_check.sh

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
