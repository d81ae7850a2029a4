# `make test` is the project's test command: it builds its own environment, so a fresh machine needs nothing else.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# The native kernels are rebuilt whenever their sources change (pip's editable install builds them only once).
NATIVE_SRC := $(wildcard qlora_kit/csrc/*)
NATIVE_STAMP := build/.native-$(notdir $(VENV))
# Tests fail, instead of skipping 170 of them, when the kernels did not build; `make test REQUIRE_NATIVE=0`
# on a machine without a C compiler.
REQUIRE_NATIVE ?= 1

.PHONY: test test-all install native demo clean

$(STAMP): pyproject.toml setup.py
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU build first: anything that depends on torch must find it already satisfied.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

$(NATIVE_STAMP): $(STAMP) $(NATIVE_SRC) setup.py
	$(PY) setup.py -q build_ext --inplace
	mkdir -p $(dir $@) && touch $@

install: $(STAMP) $(NATIVE_STAMP)

native: $(NATIVE_STAMP)

test: $(STAMP) $(NATIVE_STAMP)
	QLORA_KIT_REQUIRE_NATIVE=$(REQUIRE_NATIVE) $(PY) -m pytest -q -m "not slow and not gpu" -p no:cacheprovider

test-all: $(STAMP) $(NATIVE_STAMP)
	QLORA_KIT_REQUIRE_NATIVE=$(REQUIRE_NATIVE) $(PY) -m pytest -q

# The embedded default: QLoRA on the shipped tiny model and data, on CPU, no network; then export and generate.
demo: $(STAMP) $(NATIVE_STAMP)
	rm -rf runs/tiny-cpu
	$(VENV)/bin/qlora-kit train recipes/tiny-cpu.yaml
	$(PY) tools/demo_eval.py demo/model runs/tiny-cpu/adapter demo/data/eval.jsonl
	$(VENV)/bin/qlora-kit export runs/tiny-cpu/adapter --out runs/tiny-cpu/merged
	$(VENV)/bin/qlora-kit generate runs/tiny-cpu/merged --file demo/prompts.jsonl --max-new-tokens 8

clean:
	rm -rf $(VENV) build *.egg-info qlora_kit/*.so
