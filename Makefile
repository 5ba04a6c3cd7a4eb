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

# The test suite also runs the bring-your-own-model tests: PyTorch's CPU build (torch==2.13.0 takes the CPU wheel
# where it lies on disk; a looser pin pulls the CUDA build) and scikit-learn. They must not skip.
TEST_STAMP := $(VENV)/.test-installed
$(TEST_STAMP): $(STAMP)
	$(BIN)/python -m pip install -q "torch==2.13.0"
	$(BIN)/python -m pip install -q -e '.[dev,torch,sklearn]'
	touch $(TEST_STAMP)

test: $(TEST_STAMP)
	@tests/system_deps.sh
	FLNODE_REQUIRE_TORCH=1 FLNODE_REQUIRE_CHROMIUM=1 $(BIN)/python -m pytest -q -p no:cacheprovider tests

# Every Hypothesis test with FLNODE_FUZZ_FACTOR (default 20) times the examples and a random seed, printed
# first; replay a failure with `make fuzz SEED=<seed>`.
fuzz: $(TEST_STAMP)
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
