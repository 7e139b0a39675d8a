# Two commands on a fresh machine (only python3 needed):
#   make demo   set up .venv, simulate a dataset, denoise, evaluate, write a montage
#   make test   set up .venv and run the test suite
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
DEMO   ?= demo_out
# Denoising method of the demo: the best the project has.
DEMO_METHOD ?= wiener
DEMO_N ?= 2000

.PHONY: setup demo test lint clean-demo

setup: $(VENV)/.installed

# torch first: the CPU build pinned for this project's machines (a plain
# `torch` requirement would pull a multi-GB CUDA build).
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[dev,nn]"
	touch $@

demo: setup
	$(BIN)/cryoden simulate --volume phantom --n $(DEMO_N) --snr 0.1 --defocus-range 10000 25000 \
	    --max-shift 0 --seed 1 --out $(DEMO)/sim.zarr --overwrite
	$(BIN)/cryoden denoise $(DEMO)/sim.zarr --method $(DEMO_METHOD) --out $(DEMO)/denoised.zarr --overwrite
	@echo "--- raw (noisy) images against the clean truth"
	$(BIN)/cryoden evaluate $(DEMO)/sim.zarr --truth $(DEMO)/sim.zarr
	@echo "--- $(DEMO_METHOD) against the clean truth"
	$(BIN)/cryoden evaluate $(DEMO)/denoised.zarr --truth $(DEMO)/sim.zarr --png $(DEMO)/montage.png
	@echo "montage: $(DEMO)/montage.png"

test: setup
	$(BIN)/python -m pytest -q -p no:cacheprovider

lint: setup
	$(BIN)/ruff check cryoden_dist tests benchmarks
	$(BIN)/ruff format --check cryoden_dist tests benchmarks

clean-demo:
	rm -rf $(DEMO)
