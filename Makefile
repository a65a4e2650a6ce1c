# Two entry points: `make demo` and `make test`. Both install what they need first.
# torch: an installed torch >= 2.4 is reused; otherwise the CPU build (torch==2.13.0) is installed, never a
# multi-GB CUDA build on a CPU-only machine. Users with their own torch just `pip install peftlite`.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
TORCH_CPU ?= torch==2.13.0

.PHONY: torch install install-demo demo test bench clean

torch:
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
	rm -rf out build *.egg-info .pytest_cache .hypothesis
