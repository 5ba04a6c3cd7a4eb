PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test fuzz lint typecheck bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/flnode demo

test: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider tests

# Every Hypothesis test with FLNODE_FUZZ_FACTOR (default 20) times the examples and a random seed, printed
# first; replay a failure with `make fuzz SEED=<seed>`.
fuzz: $(STAMP)
	@seed="$(SEED)"; [ -n "$$seed" ] || seed=$$(od -An -N4 -tu4 /dev/urandom | tr -d ' '); \
	factor=$${FLNODE_FUZZ_FACTOR:-20}; \
	echo "fuzz: hypothesis seed $$seed, $${factor}x examples (replay: make fuzz SEED=$$seed)"; \
	FLNODE_FUZZ_FACTOR=$$factor FLNODE_HYPOTHESIS_ONLY=1 $(BIN)/python -m pytest -q -p no:cacheprovider tests --hypothesis-show-statistics \
		--hypothesis-profile=fuzz --hypothesis-seed=$$seed

lint: $(STAMP)
	$(BIN)/ruff check .

typecheck: $(STAMP)
	$(BIN)/mypy protocol consensus node cli

bench: $(STAMP)
	$(BIN)/python -m bench.run_all --quick

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
