# Two entry points: `make demo` and `make test`. Both build .venv from nothing.
# torch goes in first, pinned to the CPU build on this machine; anything installed
# before it that depends on torch would pull the CUDA build (several GB).
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed

CHROMIUM := /usr/bin/chromium
CJK_FONT := /usr/share/fonts/truetype/wqy/wqy-zenhei.ttc

.PHONY: install demo test lint clean bench

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet torch==2.13.0
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
