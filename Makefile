# Everything runs inside .venv, created on first use: `make demo` and `make test` need no set-up.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.ovss-installed
# Reference outputs of the official implementations (parity tests); CI sets it explicitly.
export OVSS_REFERENCE_DIR ?= $(wildcard $(abspath ../shared/reference))

.PHONY: install test demo bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

test: install
	$(BIN)/python -m pytest -q

demo: install
	$(BIN)/ovss segment sample_images --classes "cat,person,cup,table,rocket,sky,smoke,camera" --out outputs/demo

bench: install
	$(BIN)/python benchmarks/bench_segment.py

clean:
	rm -rf $(VENV) outputs .pytest_cache
