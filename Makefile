# Two commands on a fresh machine (only python3 needed):
#   make demo   set up .venv, simulate a dataset, denoise, evaluate, write a montage
#   make test   set up .venv and run the test suite
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
DEMO   ?= demo_out
# Methods the demo runs and compares ("sim" = the raw noisy images); the montage shows mfvdm.
DEMO_METHODS ?= wiener spca-wiener class-average mfvdm
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
	    --seed 1 --out $(DEMO)/sim.zarr --overwrite
	@for method in $(DEMO_METHODS); do \
	    $(BIN)/cryoden denoise $(DEMO)/sim.zarr --method $$method --out $(DEMO)/$$method.zarr --overwrite || exit 1; \
	done
	@echo "--- rel_mse against the clean CTF-free images (lower is better)"
	@for store in sim $(DEMO_METHODS); do \
	    printf '%-14s ' $$store; \
	    $(BIN)/cryoden evaluate $(DEMO)/$$store.zarr --truth $(DEMO)/sim.zarr --json 2>/dev/null \
	      | $(BIN)/python -c "import json,sys; d=json.load(sys.stdin); print(f\"rel_mse {d['rel_mse']:.4f}  psnr {d['psnr']:.2f}  ssim {d['ssim']:.3f}\")" \
	      || exit 1; \
	done
	$(BIN)/cryoden plot $(DEMO)/mfvdm.zarr --truth $(DEMO)/sim.zarr --out $(DEMO)/montage.png

test: setup
	$(BIN)/python -m pytest -q -p no:cacheprovider

lint: setup
	$(BIN)/ruff check cryoden_dist tests benchmarks notebooks
	$(BIN)/ruff format --check cryoden_dist tests benchmarks

clean-demo:
	rm -rf $(DEMO)
