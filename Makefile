# Everything runs inside .venv, created on first use: `make demo` and `make test` need no set-up.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.ovss-installed
# Reference outputs of the official implementations (parity tests); CI sets it explicitly.
export OVSS_REFERENCE_DIR ?= $(wildcard $(abspath ../shared/reference))

.PHONY: install test demo bench report-check clean

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

# Render a small comparison report in headless Chromium (installed from Debian when missing) and
# fail on errors or loads from outside its folder; look at outputs/report-check/report.png.
report-check: install
	$(BIN)/python tests/report_check.py

clean:
	rm -rf $(VENV) outputs .pytest_cache
