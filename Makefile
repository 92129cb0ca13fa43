# The two commands of the README:
#   make compare   set up (virtual environment, packages, data where the machine allows) and
#                  run the main job: the PyTorch MLP tutorial's own experiment, mlp_mnist, trained
#                  in JAX and PyTorch side by side (mlp_fashion where MNIST cannot be fetched)
#   make test      set up the same way and run the parity test suite (.ci/run runs this)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: compare test data fashion-data mnist-data onednn lint clean

compare: $(VENV)/.installed fashion-data onednn
	@if $(BIN)/jaxnets download mnist; then \
		$(BIN)/jaxnets compare mlp_mnist; \
	else \
		echo "warning: MNIST could not be fetched (above: what was tried); the same network" \
		     "runs on Fashion-MNIST instead: jaxnets compare mlp_fashion"; \
		$(BIN)/jaxnets compare mlp_fashion; \
	fi

test: $(VENV)/.installed data onednn
	$(BIN)/python -m pytest

lint: $(VENV)/.installed
	$(BIN)/ruff check jaxnets torchref parity_tests bench

# torch is pinned and installed first: an unpinned torch pulls several GB of CUDA packages.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

data: fashion-data mnist-data

# Debian packages through apt, as root or through sudo
can_apt = command -v apt-get >/dev/null 2>&1 && { [ "$$(id -u)" = 0 ] || command -v sudo >/dev/null 2>&1; }
apt_install = $$([ "$$(id -u)" = 0 ] || echo sudo) apt-get update -q && \
	$$([ "$$(id -u)" = 0 ] || echo sudo) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q $(1)

# MNIST into ~/.cache/jaxnets/mnist (checksums checked; nothing to do when it is there already).
# Failing to fetch it is only a warning: the MNIST experiments then run on Fashion-MNIST.
mnist-data: $(VENV)/.installed
	@$(BIN)/jaxnets download mnist || echo "warning: MNIST could not be fetched; the MNIST" \
		"experiments will run on Fashion-MNIST and the real-MNIST test is skipped"

# Fashion-MNIST from Debian's package where apt is available; otherwise jaxnets tries TFDS.
FASHION_DIR := /usr/share/datasets/fashion-mnist
fashion-data:
	@if [ -d $(FASHION_DIR) ]; then :; \
	elif $(call can_apt); then $(call apt_install,dataset-fashion-mnist); \
	else \
		echo "note: no apt-get here; jaxnets will load Fashion-MNIST through tensorflow-datasets"; \
	fi

# JAX's CPU convolutions through oneDNN (jaxnets/onednn.py): Debian's libdnnl-dev where apt
# is available, then the FFI library compiled against it. Without it "auto" keeps the
# canonical Eigen path (slower CNN training; the tests that need the library say so).
ONEDNN_LIB := jaxnets/native/libjaxnets_onednn.so
onednn: $(ONEDNN_LIB)

$(ONEDNN_LIB): jaxnets/native/onednn_conv.cc jaxnets/native/transpose.cc $(VENV)/.installed
	@if [ -f /usr/include/dnnl.hpp ]; then :; \
	elif $(call can_apt); then $(call apt_install,libdnnl-dev); \
	fi
	@if [ -f /usr/include/dnnl.hpp ]; then $(BIN)/python -m jaxnets.onednn build; \
	else echo "note: no libdnnl-dev here; JAX convolutions stay on XLA's own path"; fi

clean:
	rm -rf $(VENV) runs .pytest_cache $(ONEDNN_LIB)
