# Two commands on a fresh machine with Python 3.11:  `make demo`  and  `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU build of torch; on a GPU machine use e.g. TORCH_SPEC="torch==2.11.0" (installed first, so
# nothing else can pull a different build).
TORCH_SPEC ?= torch==2.13.0
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
DEMO_DIR ?= runs/demo

.PHONY: install demo test lint clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $@

## the main job: train the offline default recipe, then evaluate base vs adapted
demo: install
	rm -rf $(DEMO_DIR)
	$(BIN)/peftctl train recipe=tiny_lora output_dir=$(DEMO_DIR)
	$(BIN)/peftctl eval $(DEMO_DIR)

## the test suite, as CI runs it (GPU tests are deselected; run them with -m gpu on a GPU)
test: install
	$(BIN)/python -m pytest -m "not gpu" tests

## lint and formatting check (ruff, configured in pyproject.toml); `ruff format` fixes formatting
lint: install
	$(BIN)/ruff check peftctl tests benchmarks
	$(BIN)/ruff format --check peftctl tests benchmarks

clean:
	rm -rf $(VENV) runs .pytest_cache
