# The two commands of the README:
#   make compare   set up (virtual environment, packages, data where the machine allows) and
#                  run the main job: mlp_fashion trained in JAX and PyTorch side by side
#   make test      set up the same way and run the parity test suite (.ci/run runs this)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: compare test data lint clean

compare: $(VENV)/.installed data
	$(BIN)/jaxnets compare mlp_fashion

test: $(VENV)/.installed data
	$(BIN)/python -m pytest

lint: $(VENV)/.installed
	$(BIN)/ruff check jaxnets torchref parity_tests bench

# torch is pinned and installed first: an unpinned torch pulls several GB of CUDA packages.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

# Fashion-MNIST from Debian's package where apt is available; otherwise jaxnets tries TFDS.
FASHION_DIR := /usr/share/datasets/fashion-mnist
data:
	@if [ -d $(FASHION_DIR) ]; then :; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q dataset-fashion-mnist; \
	elif command -v apt-get >/dev/null 2>&1 && command -v sudo >/dev/null 2>&1; then \
		sudo apt-get update -q && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -q dataset-fashion-mnist; \
	else \
		echo "note: no apt-get here; jaxnets will load Fashion-MNIST through tensorflow-datasets"; \
	fi

clean:
	rm -rf $(VENV) runs .pytest_cache
