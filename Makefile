# Two commands on a fresh machine with Python 3.11:  `make demo`  and  `make test`.
# Both install the pinned set in constraints.txt; `make test-latest` runs the suite on the newest
# releases instead (drift shows there before it can break the pinned install).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
LATEST_VENV ?= .venv-latest
# CPU build of torch; on a GPU machine use e.g. TORCH_SPEC="torch==2.11.0" (installed first, so
# nothing else can pull a different build).
TORCH_SPEC ?= torch==2.13.0
PINNED := -c constraints.txt --build-constraint constraints.txt
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
DEMO_DIR ?= runs/demo
TEST_CMD = python -m pytest -m "not gpu" -n auto --dist loadscope --no-loadscope-reorder tests

.PHONY: install demo test lint test-latest lock clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -c constraints.txt pip
	$(BIN)/python -m pip install -q $(PINNED) "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q $(PINNED) -e ".[test]"
	touch $@

## the main job: train the offline default recipe, then evaluate base vs adapted
demo: install
	rm -rf $(DEMO_DIR)
	$(BIN)/peftctl train recipe=tiny_lora output_dir=$(DEMO_DIR)
	$(BIN)/peftctl eval $(DEMO_DIR)

## the test suite, as CI runs it (GPU tests are deselected; run them with -m gpu on a GPU)
test: install
	$(BIN)/$(TEST_CMD)

## the same suite on the newest release of every dependency (torch stays TORCH_SPEC: the CPU build)
test-latest:
	rm -rf $(LATEST_VENV)
	$(PYTHON) -m venv $(LATEST_VENV)
	$(LATEST_VENV)/bin/python -m pip install -q --upgrade pip
	$(LATEST_VENV)/bin/python -m pip install -q "$(TORCH_SPEC)"
	$(LATEST_VENV)/bin/python -m pip install -q --upgrade --upgrade-strategy eager -e ".[test]"
	$(LATEST_VENV)/bin/python -m pip freeze --exclude-editable > $(LATEST_VENV)/freeze.txt
	$(LATEST_VENV)/bin/python -c "import transformers, peft; print('newest: transformers', transformers.__version__, '| peft', peft.__version__)"
	$(LATEST_VENV)/bin/$(TEST_CMD)

## re-pin constraints.txt to the newest releases, after `make test-latest` passed on them
## (the header down to "# runtime and test dependencies" is kept; the build backend's pins are edited by hand)
lock: test-latest
	sed '/^# runtime and test dependencies/q' constraints.txt > constraints.txt.new
	grep -v -e '^torch==' -e '^#' $(LATEST_VENV)/freeze.txt >> constraints.txt.new
	mv constraints.txt.new constraints.txt

## lint and formatting check (ruff, configured in pyproject.toml); `ruff format` fixes formatting
lint: install
	$(BIN)/ruff check peftctl tests benchmarks
	$(BIN)/ruff format --check peftctl tests benchmarks

clean:
	rm -rf $(VENV) $(LATEST_VENV) runs .pytest_cache
