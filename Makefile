# Two entry points: `make demo` and `make test`. Both build .venv from nothing.
# torch goes in first, pinned to the CPU build on this machine; anything installed
# before it that depends on torch would pull the CUDA build (several GB).
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed

# llama.cpp built for this CPU (-march=native) but without its AMX kernels, which crash in
# ggml_backend_amx_mul_mat on small matrices (ggml-org/llama.cpp#20824) on CPUs that have AMX.
# The wheel is built once into its own folder: pip's wheel cache ignores compiler flags.
LLAMA_CPP    := llama-cpp-python==0.3.36
LLAMA_CFLAGS := -mno-amx-tile -mno-amx-int8 -mno-amx-bf16
LLAMA_WHEELS := $(HOME)/.cache/loraforge/llama-cpp-noamx-0.3.36

CHROMIUM := /usr/bin/chromium
CJK_FONT := /usr/share/fonts/truetype/wqy/wqy-zenhei.ttc

.PHONY: install demo test lint clean bench

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet torch==2.13.0
	ls $(LLAMA_WHEELS)/llama_cpp_python-*.whl >/dev/null 2>&1 || \
	  CFLAGS="$(LLAMA_CFLAGS)" CXXFLAGS="$(LLAMA_CFLAGS)" $(BIN)/pip wheel --quiet --no-deps --no-cache-dir \
	    -w $(LLAMA_WHEELS) $(LLAMA_CPP)
	$(BIN)/pip install --quiet --force-reinstall --no-deps $(LLAMA_WHEELS)/llama_cpp_python-*.whl
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/python -m loraforge.demo

# the chat page's test drives Debian's Chromium through playwright (no browser download),
# with a CJK font so the screenshot shows Chinese glyphs rather than boxes
$(CHROMIUM) $(CJK_FONT):
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium fonts-wqy-zenhei

test: install $(CHROMIUM) $(CJK_FONT)
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check src tests benchmarks

bench: install
	$(BIN)/python benchmarks/train_throughput.py

clean:
	rm -rf $(VENV) .cache build *.egg-info src/*.egg-info
