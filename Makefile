# Two entry points: `make demo` and `make test`. Both install what they need first.
# Where: an active virtualenv is used as it is; otherwise the project's own .venv, created on first use with
# access to the system's packages (so an installed torch is reused, and system Pythons that refuse pip
# installs, PEP 668, are never written to). The `peftlite` command lands in that environment's bin/.
# torch: an installed torch >= 2.4 is reused; otherwise the CPU build (torch==2.13.0) is installed, never a
# multi-GB CUDA build on a CPU-only machine. Users with their own torch just `pip install peftlite`.
SYSTEM_PYTHON ?= python3
IN_VENV := $(shell $(SYSTEM_PYTHON) -c "import sys; print(int(sys.prefix != sys.base_prefix))" 2>/dev/null)
ifeq ($(IN_VENV),1)
PYTHON ?= $(SYSTEM_PYTHON)
else
PYTHON ?= .venv/bin/python
endif
PIP := $(PYTHON) -m pip
TORCH_CPU ?= torch==2.13.0

.PHONY: venv torch install install-demo demo test bench clean

venv:
	@if [ "$(PYTHON)" = ".venv/bin/python" ] && [ ! -x .venv/bin/python ]; then \
		echo "creating .venv (no virtualenv is active)"; \
		$(SYSTEM_PYTHON) -m venv --system-site-packages .venv || { \
			echo "could not create .venv: install the venv module (Debian/Ubuntu: apt install python3-venv) or activate a virtualenv"; \
			exit 1; }; \
	fi

torch: venv
	@$(PYTHON) -c "import torch, sys; v = tuple(int(p) for p in torch.__version__.split('+')[0].split('.')[:2]); sys.exit(v < (2, 4))" 2>/dev/null \
		&& echo "using installed torch $$($(PYTHON) -c 'import torch; print(torch.__version__)')" \
		|| $(PIP) install -q "$(TORCH_CPU)"

install: torch
	$(PIP) install -q -e ".[test,demo]"

install-demo: torch
	$(PIP) install -q -e ".[demo]"

demo: install-demo
	$(PYTHON) examples/quickstart.py

test: install
	$(PYTHON) -m pytest tests

bench: install
	$(PYTHON) benchmarks/bench_lora_layer.py
	$(PYTHON) benchmarks/bench_model.py

clean:
	rm -rf out build *.egg-info .pytest_cache .hypothesis .venv
