# A newcomer needs two commands:  make demo  (install + the main job)  and  make test.
# Both create ./.venv on first use. TORCH picks the torch build: torch==2.13.0 resolves to a
# local CPU wheel on the project's machines; elsewhere pass e.g. TORCH="torch --index-url ..."
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
LAPLACE := laplace-torch==0.3 backpack-for-pytorch==1.7.1 curvlinops-for-pytorch==3.0.1 asdfghjkl==0.1a4
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test

.PHONY: install demo test benchmark clean

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch first, pinned: installing the package afterwards then keeps this build instead of
	# pulling the newest torch with several GB of CUDA libraries.
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e .
	touch $(STAMP)

# The test extras (pytest, pyscf, pymatgen, laplace-torch's dependencies) only for the tests:
# the demo stays quick to install. laplace-torch and BackPACK declare torchvision, whose wheel
# breaks the CPU torch build and which neither needs: they go in last, without dependencies.
$(TEST_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -e ".[test]"
	$(BIN)/python -m pip install --quiet --no-deps $(LAPLACE)
	touch $(TEST_STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/ase-race demo

test: $(TEST_STAMP)
	$(BIN)/python -m pytest -q

benchmark: $(STAMP)
	$(BIN)/python benchmarks/speed.py

clean:
	rm -rf $(VENV) build *.egg-info
