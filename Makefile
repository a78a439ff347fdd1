# Two entry points on a fresh machine: `make demo` and `make test`. Each sets itself up.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: setup demo test test-deps lint

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first, pinned: 2.13.0 is the CPU wheel; an open range would pull a multi-GB CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(VENV)/bin/medagent demo

test-deps: setup
	bash tools/install_test_deps.sh

# pytest exit 5 means no test ran: treated as a failure on purpose, never as a pass.
test: test-deps
	@$(PY) -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing on purpose"; exit 1; fi; \
	exit $$rc

lint: setup
	$(VENV)/bin/ruff check agent tests tools
	$(VENV)/bin/ruff format --check agent tests tools
	$(VENV)/bin/mypy
