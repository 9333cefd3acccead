# `make demo`: set up and run a short simple-vs-latent comparison on built-in settings (under 3 minutes
# on any CPU: 1.5 minutes of training, the step count fitted to this machine's pace).
# `make test`: set up and run the test suite.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test clean-test-runs

setup: $(VENV)/.installed

# TORCH_INDEX: PyTorch's own index for the build to install first (README: the CPU-only
# wheel, or a CUDA version); empty, the default index decides (on Linux x86-64, CUDA's).
TORCH_INDEX ?=

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(if $(TORCH_INDEX),$(VENV)/bin/pip install --quiet torch==2.13.0 --index-url $(TORCH_INDEX))
	$(VENV)/bin/pip install --quiet -e '.[dev]'
	touch $@

demo: setup
	$(VENV)/bin/trainlab multiply compare --preset demo --seeds 1 --budget-minutes 1.5

# The second pass runs the tests whose runs took --precision auto (the first pass records
# them) as a CPU whose auto picks bf16 (AMX, say) would: this machine's CPU need not be one
# (tests/conftest.py says more).
# Two pytest-xdist workers of one torch thread each: most of a test is Python, start-up and
# small tensors, so two single-threaded workers finish the suite about 1.5x sooner than one
# process with two threads (and never put two multi-threaded torch jobs on the same cores).
TEST_WORKERS ?= 2
PYTEST := OMP_NUM_THREADS=1 $(PY) -m pytest -n $(TEST_WORKERS)
test: setup
	$(PYTEST) tests --record-auto-tests=$(VENV)/auto-tests
	TRAINLAB_AUTO_PRECISION=bf16 $(PYTEST) tests --only-auto-tests=$(VENV)/auto-tests
