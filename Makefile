# The two commands the README opens with. Each builds .venv by itself.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo ui test clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned to the CPU wheel on this machine's disk; a loose
	# requirement would pull a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m lorabooth demo --output runs/demo

# The web page on this machine only (http://127.0.0.1:7860), the training
# form set to the built-in toy model; runs go to lorabooth-runs/.
ui: $(STAMP)
	$(BIN)/python -m lorabooth ui --model toy --workspace lorabooth-runs

# The browser tests (sweep report, web page) need headless Chromium, tune's
# PostgreSQL test a PostgreSQL server to start: installed here when they can
# be; when they cannot, the scripts say so and those tests are skipped.
# The suite in JOBS processes (pytest-xdist; each test module stays in one,
# so its fixtures are built once), one torch thread each (tests/conftest.py):
# on 2 cores this took 634 s where one process took 1075 s, most of a test
# being a fresh Python importing torch, diffusers and peft.
JOBS ?= 2
test: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	scripts/ensure-chromium
	scripts/ensure-postgresql
	$(BIN)/python -m pytest tests -n $(JOBS) --dist loadscope --durations=40

clean:
	rm -rf $(VENV) runs
