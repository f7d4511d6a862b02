# mentor: the commands a newcomer needs. `make demo` and `make test` install first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
STAMP := $(VENV)/.installed

.PHONY: install demo test test-fast bench bench-quick lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# The pinned CPU build of torch first (see DEVELOPERS.md): a bare `torch` would pull a multi-GB CUDA build.
	$(BIN)/python -m pip install -q "torch==$(TORCH_VERSION)"
	$(BIN)/python -m pip install -q -e ".[dev,lm]"
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/mentor demo

test: install
	$(BIN)/python -m pytest -q

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

# kd_mnist1d runs torchdistill side by side: it needs the peer environment .venv-bench (torch 2.14.1 +
# torchvision 0.29.1 + torchdistill + mentor), which bench/setup_peer_env.sh makes (about 2 minutes, 5.8 GB).
bench: install
	$(BIN)/python bench/overhead.py
	$(BIN)/python bench/overhead_recipes.py
	bash bench/setup_peer_env.sh
	.venv-bench/bin/python bench/kd_mnist1d.py
	$(BIN)/python bench/soft_vs_hard.py
	$(BIN)/python bench/catalogue_mnist1d.py
	$(BIN)/python bench/catalogue_tuned.py --pairs cnn mlp
	$(BIN)/python bench/select_students.py
	$(BIN)/python bench/quant_mnist1d.py
	$(BIN)/python bench/cache.py
	$(BIN)/python bench/mvq.py
	$(BIN)/python bench/online.py --noisy

bench-quick: install
	$(BIN)/python bench/overhead.py --quick
	$(BIN)/python bench/overhead_recipes.py --quick
	bash bench/setup_peer_env.sh
	.venv-bench/bin/python bench/kd_mnist1d.py --quick
	$(BIN)/python bench/soft_vs_hard.py --quick
	$(BIN)/python bench/catalogue_mnist1d.py --quick
	$(BIN)/python bench/catalogue_tuned.py --quick --pairs cnn mlp
	$(BIN)/python bench/select_students.py --quick
	$(BIN)/python bench/quant_mnist1d.py --quick
	$(BIN)/python bench/cache.py --quick
	$(BIN)/python bench/mvq.py --quick
	$(BIN)/python bench/online.py --quick --noisy

lint: install
	$(BIN)/ruff check src tests bench
	$(BIN)/mypy

clean:
	rm -rf runs .pytest_cache .mypy_cache .ruff_cache
