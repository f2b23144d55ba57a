# Set-up, test and benchmark entry points. `make demo` and `make test` work from a fresh clone
# without a GPU: they create .venv when it is missing and install the package into it (editable).
#
# MMGEN_CUDA=auto|0|1 and MMGEN_CUDA_ARCHS (default 80;90a) choose what the native build compiles.

PYTHON ?= python3
# Pinned: on the project's machines pip takes this version's CPU build from local disk, while an
# unpinned torch would pull a multi-GB CUDA build. Override TORCH to install another build.
TORCH ?= torch==2.13.0
# Triton's CPU interpreter (the CI tests of the Triton kernels) works with this version and numpy 2.4.
TRITON ?= triton==3.8.0
# Upstream packages the parity tests build tiny random models with. Their declared dependencies
# (torchvision, pytorch-lightning, ...) would replace the pinned torch and are not needed for the
# modules the tests import, so they are installed without them (attrs, from the test extra, is).
UPSTREAM_NODEPS ?= dall-e==0.1 taming-transformers==0.0.1
# Every other package of the venv is pinned to the versions the test suite was verified with, so that
# an upstream release cannot break a fresh clone overnight. `make test-latest` resolves the newest
# versions the ranges in pyproject.toml allow (in .venv-latest); `make lock` then moves the pins
# forward to them, on purpose. CONSTRAINTS= (empty) installs without pins.
CONSTRAINTS ?= constraints.txt
VENV ?= .venv
space := $(subst ,, )
VPY := $(VENV)/bin/python
PIP := $(VPY) -m pip install $(if $(CONSTRAINTS),--constraint $(CONSTRAINTS))
# What the lock leaves to the variables above (torch and triton are per machine).
UNLOCKED := torch triton dall-e taming-transformers mmgen-engine

export MMGEN_CUDA MMGEN_CUDA_ARCHS

.PHONY: venv install demo lint test test-latest lock bench clean FORCE

venv: $(VENV)/.venv-ready

# torch goes in first, so that installing the package finds its dependency already satisfied; the
# build tools go in with the package (no build isolation), so that a new lock re-pins them too.
$(VENV)/.venv-ready:
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) "$(TORCH)" "$(TRITON)"
	touch $@

# Rewritten only when the native build options change, so that changing them rebuilds.
$(VENV)/.build-config: $(VENV)/.venv-ready FORCE
	@echo "MMGEN_CUDA=$(MMGEN_CUDA) MMGEN_CUDA_ARCHS=$(MMGEN_CUDA_ARCHS)" | cmp -s - $@ \
		|| echo "MMGEN_CUDA=$(MMGEN_CUDA) MMGEN_CUDA_ARCHS=$(MMGEN_CUDA_ARCHS)" > $@

# The install is editable, so Python changes need no reinstall; build inputs do.
NATIVE_INPUTS := setup.py pyproject.toml CMakeLists.txt $(shell find csrc -type f 2>/dev/null)

install: $(VENV)/.installed

$(VENV)/.installed: $(VENV)/.build-config $(NATIVE_INPUTS) $(CONSTRAINTS)
	$(PIP) setuptools wheel pybind11
	$(PIP) --no-build-isolation -e ".[test]"
	$(VPY) -m pip install --no-deps $(UPSTREAM_NODEPS)
	touch $@

demo: install
	$(VENV)/bin/mmgen demo

# Lint and import order (configuration in pyproject.toml); `ruff check --fix .` mends most findings.
lint: install
	$(VENV)/bin/ruff check .

# pytest exits with 5 when it collected no tests: that is a failure here.
test: install lint
	@$(VPY) -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; exit 1; fi; \
	exit $$rc

# The same suite in .venv-latest, with the newest versions the package's ranges allow.
test-latest:
	$(MAKE) test VENV=.venv-latest CONSTRAINTS=

# Pins what .venv-latest resolved (run `make test-latest` first and see it pass).
lock:
	test -x .venv-latest/bin/python || { echo "make lock: run make test-latest first" >&2; exit 1; }
	{ echo "# Pins for the project's venv (make install uses them; make lock rewrites them from .venv-latest)."; \
	  .venv-latest/bin/python -m pip freeze --all --exclude-editable \
	  | grep -viE '^($(subst $(space),|,$(UNLOCKED)))==' | LC_ALL=C sort -f; } > constraints.txt

bench: install
	$(VPY) benchmarks/bench_caption.py

clean:
	rm -rf build dist *.egg-info mmgen_engine/_C*.so $(VENV)/.installed $(VENV)/.build-config
	find . -path ./$(VENV) -prune -o \( -name __pycache__ -o -name .pytest_cache \) -type d -print \
		| xargs rm -rf
