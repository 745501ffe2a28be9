"""One command for one CUDA GPU, offline, in under 9 minutes: lorakit against TRL + PEFT, serving, `pytest -m gpu`.

    python bench/gpu_suite.py --out runs/gpu-suite                     # the GPU machine (make bench-gpu)
    python bench/gpu_suite.py --wheels bundle/ --out runs/gpu-suite    # one with torch but not the rest
    python bench/gpu_suite.py --tiny --out /tmp/suite   # every row at toy size on the CPU (make test-gpu-suite)
    python bench/gpu_suite.py --make-bundle bundle/                    # on a connected machine: what --wheels needs

Prints one markdown table and writes it, with every number and each process's log, to --out (gpu_suite.md,
gpu_suite.json, logs/). Each training row runs lorakit, then TRL's SFTTrainer + PEFT on the same tokenized rows in
the same order with the same hyperparameters (bench/train_vs_peers.py's one_lorakit and one_trl, given the GPU:
bf16 autocast, the run's optimizer and checkpointing), each system in its own process, so that a peak is its own and
a crash ends one row only. TRL runs as its docs recommend for this machine's attention (train_vs_peers.trl_setting:
padding-free only with flash-attention, else padded rows, and packed rows one per micro-batch; its chunked NLL loss),
and the table names that setting. liger-kernel's kernels go to both systems or to neither (--no-liger, or not
installed): lorakit's train.kernels is auto or none to match. The rows:
  qlora-7b   configs/recipes/llama-2-7b-guanaco-qlora.yaml on a Llama-2-7B shape, guanaco-llama2-1k
  gemma-2b   configs/recipes/gemma-2-2b-custom.yaml with method lora (the recipe's is qlora) on a Gemma-2-2B
             shape, on guanaco chats (for the recipe's "your own chats")
  lora-1b    LoRA r16 all-linear on a Llama-3.2-1B shape in bf16, guanaco chats packed 8 x 2048, no checkpointing
  full-1b    the same rows, full fine-tuning (fp32 master weights, bf16 autocast), lr 2e-5
  dpo-1b     bench/dpo_vs_trl.py's DPO (LoRA r16 all-linear, sigmoid, beta 0.1) on the 1B shape, 4 pairs of up to
             1024 tokens a step, against TRL's DPOTrainer twice (its defaults, and precompute_ref_log_probs=True);
             only where --rows names it (and in --tiny): its three processes, ~75 s on an H100, do not fit the
             default budget beside the rest
  serve      bench/serve_load.py --distinct-adapters 8 on the 1B
  pytest     pytest -m gpu, on the test files that carry the marker
The models are random weights of the bundled reference shapes (src/lorakit/reference_models) with the built-in
alias's tokenizer (vocabulary 49,152), made on the GPU in bf16: speed and memory depend on the shapes alone. They
and the runs (about 25 GB) go to a folder under --out that is deleted at the end.

Measured: tokens/s (all input tokens) over steps 2..N; the peak memory as nvidia-smi reports it (memory.used above
its level before the process, sampled every 100 ms), else torch.cuda.max_memory_reserved, and the peak RSS on a
CPU, each cell saying which; the first and last step's loss; and beside them `lorakit plan`'s prediction for the
run's config on this device at its measured matmul peak, with its error.

Time. A budget (--budget, 530 s) bounds the whole suite, --wheels' install included. Each process's limit comes
from what it is expected to cost (the cost model above ROWS: GPU.md's step times scaled to this device's measured
matmul peak, its model's load timed as prepare made it, a process's start) times 1.5 plus 30 s, never past the time
left less what serving (40 s) and pytest (60 s, also its minimum) are kept; prepare compiles liger's Triton kernels
for every shape first, so no training process compiles them inside its limit. A row short of time trains fewer steps
(at least 3), as its steps cell says; a process that still runs out of time, or finds too little left to start, is
"not measured", never a failure, and its JSON has its own seconds beside the expected ones (process_s, expected_s)
to fit the costs to. Estimated from GPU.md's H200 numbers (expected_suite_s): 490 s with the install on an H200,
515 s on an H100 (the same bf16 peak; every step taken as 4.8 / 3.35 slower, the bandwidths' ratio). Exit status 1
when a lorakit row, serving or pytest failed (a failing TRL row is only reported), 2 when nothing could run.

--tiny runs every row on the CPU at toy size (the same architectures at tests/tiny.py's hidden 64 and 2 layers,
fp32, 64 examples in rows of 128 tokens, AdamW, 3 steps), TRL's where TRL is importable, serving with 2 adapters
and 4 requests, and skips pytest -m gpu. It fails unless every lorakit row logged a finite loss at each step, a
positive speed and a plan prediction, and serving answered every request.

The wheel bundle. The GPU machine (/work/shared/GPU.md; GPU_MACHINE below) has torch, transformers, accelerate,
numpy, pandas, pyarrow, matplotlib, sentencepiece, tokenizers, httpx, pytest, sacrebleu and triton, but not the rest
of lorakit's dependencies, nor the alias's tokenizer or ../shared/data. `--make-bundle DIR`, run with the project's
.venv on a machine that reaches PyPI, downloads BUNDLE's wheels for CPython 3.12 on x86-64 Linux, builds
rouge-score's (PyPI has only its sdist), adds the alias's tokenizer and the two data files (about 61 MB), then checks
that it installs on the GPU machine: pip's dry run of the install, offline, in a Python 3.12 virtual environment
holding GPU_MACHINE's packages (tests/integration/test_gpu_bundle.py runs the same check). Copy DIR over. `--wheels
DIR` then makes a virtual environment in OUT/env over this interpreter's own packages, installs this checkout
(editable) with its qlora, serve and bench extras from DIR alone (`pip install --no-index --find-links DIR`, the
bundle's versions over older copies), and runs the suite in it.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import math
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import dpo_vs_trl as dpo  # the same for DPO: its lorakit and two TRL runs
import train_vs_peers as peers  # bench/ is this script's folder: its lorakit and TRL runs, used as they are

ROOT = Path(__file__).resolve().parents[1]
MIB = 2**20
ALIAS = "smollm2-135m-instruct"  # the built-in model: its tokenizer goes with every model here
SHAPES = {"llama-2-7b": "meta-llama/Llama-2-7b-hf", "gemma-2-2b": "google/gemma-2-2b-it",
          "llama-3.2-1b": "meta-llama/Llama-3.2-1B-Instruct"}  # fmt: skip
TINY_SIZES = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "head_dim": 16}  # tests/tiny.py's  # fmt: skip
# --tiny's rows: 64 examples, rows of 128 tokens, batch 2, AdamW (8-bit paged AdamW is CUDA's)
TINY_ROWS = {"data": {"max_length": 128, "limit": 64},
             "train": {"batch_size": 2, "grad_accum": 1, "optimizer": "adamw"}}  # fmt: skip
PACKED_1B = {"data": {"max_length": 2048}, "train": {"batch_size": 8, "grad_accum": 1, "precision": "auto"}}
# DPO on the 1B: bench/dpo_vs_trl.py's settings, 4 pairs of sequences up to 1024 a step (run_body: new pairs each step).
DPO_1B = {"data": {"max_length": 1024}, "train": {"batch_size": 4, "grad_accum": 1, "precision": "auto"}}
TINY_WORDS = " at toy size (hidden 64, 2 layers, fp32; 64 examples, rows of 128 tokens, batch 2, AdamW)"
MIN_STEPS = 3  # two timed steps
OPTIM = {"adamw": "adamw_torch", "adamw_8bit": "adamw_bnb_8bit", "paged_adamw_8bit": "paged_adamw_8bit"}
# The reference GPU machine's Python packages (../shared/GPU.md, read 2026-12-04) as pip, installing there, finds them:
# name -> (version, its own requirements that bound what the bundle may bring). GPU.md gives the versions of torch,
# transformers and accelerate; every other package is taken at the oldest version those accept (transformers 5.17.0:
# huggingface-hub >= 1.5.0, < 2.0) or the first with CPython 3.12 wheels, so that a bundle that installs over these
# installs over newer ones too. Except pyarrow: GPU.md gives no version and a wheel of it (40 MB) would double the
# bundle, so it is taken to be at least 21.0 (2025-07, a year older than the machine's torch 2.11): the bundle's
# datasets must accept that (5.0 does; 5.1 needs 24 and huggingface-hub 1.31). The listed packages' own dependencies
# are there too (a working install has them), at their oldest likewise.
GPU_MACHINE = {
    "torch": ("2.11.0", ("typing-extensions>=4.10.0", "setuptools")), "triton": ("3.5.0", ()),
    "transformers": ("5.17.0", ("huggingface-hub<2.0,>=1.5.0", "tokenizers<0.24.0,>=0.23.1", "safetensors>=0.8.0",
                                "regex>=2025.10.22", "tqdm>=4.60", "typer")),
    "accelerate": ("1.15.0", ("huggingface-hub>=0.21.0", "safetensors>=0.4.3", "torch>=2.6.0")),
    "peft": ("0.17.0", ()), "numpy": ("1.26.2", ()), "pandas": ("2.1.1", ()), "pyarrow": ("21.0.0", ()),
    "matplotlib": ("3.8.0", ()), "sentencepiece": ("0.2.0", ()), "tokenizers": ("0.23.1", ()), "httpx": ("0.27.0", ()),
    "pytest": ("8.0.0", ()), "sacrebleu": ("2.4.0", ()),
    # their dependencies: torch's, transformers' and huggingface-hub's, httpx's, pandas', matplotlib's, pytest's,
    # sacrebleu's
    "filelock": ("3.13.1", ()), "typing-extensions": ("4.10.0", ()), "sympy": ("1.13.3", ()), "mpmath": ("1.3.0", ()),
    "networkx": ("3.2.1", ()), "jinja2": ("3.1.3", ()), "markupsafe": ("2.1.5", ()),
    "fsspec": ("2024.2.0", ('aiohttp!=4.0.0a0,!=4.0.0a1; extra == "http"',)),
    "setuptools": ("69.0.3", ()), "huggingface-hub": ("1.5.0", ()), "hf-xet": ("1.1.0", ()), "packaging": ("23.2", ()),
    "pyyaml": ("6.0.1", ()), "regex": ("2025.10.22", ()), "safetensors": ("0.8.0", ()), "tqdm": ("4.66.1", ()),
    "typer": ("0.15.1", ()), "typer-slim": ("0.15.1", ()), "click": ("8.1.7", ()), "shellingham": ("1.5.4", ()),
    "rich": ("13.7.0", ()), "markdown-it-py": ("3.0.0", ()), "mdurl": ("0.1.2", ()), "pygments": ("2.17.2", ()),
    "psutil": ("5.9.8", ()), "anyio": ("4.2.0", ()), "sniffio": ("1.3.0", ()), "certifi": ("2023.11.17", ()),
    "httpcore": ("1.0.2", ()), "h11": ("0.14.0", ()), "idna": ("3.6", ()), "python-dateutil": ("2.8.2", ()),
    "six": ("1.16.0", ()), "pytz": ("2023.3", ()), "tzdata": ("2023.4", ()), "contourpy": ("1.2.0", ()),
    "cycler": ("0.12.1", ()), "fonttools": ("4.47.0", ()), "kiwisolver": ("1.4.5", ()), "pillow": ("10.2.0", ()),
    "pyparsing": ("3.1.1", ()), "iniconfig": ("2.0.0", ()), "pluggy": ("1.3.0", ()), "portalocker": ("2.8.2", ()),
    "tabulate": ("0.9.0", ()), "colorama": ("0.4.6", ()), "lxml": ("5.0.0", ()),
}  # fmt: skip
# What install_bundle needs there and the machine lacks (pip's dry run against GPU_MACHINE, check_bundle, says so),
# at the versions installed here (where not installed, the latest), or pinned where the machine's packages bind them;
# rouge-score is built (PyPI has only its sdist).
BUNDLE = ("bitsandbytes", "datasets==5.0.1", "dill", "multiprocess", "xxhash", "fsspec==2026.6.0", "aiohttp",
          "aiohappyeyeballs", "aiosignal", "attrs", "frozenlist", "multidict", "propcache", "yarl", "tqdm", "pydantic",
          "pydantic-core", "annotated-types", "annotated-doc", "typing-inspection", "typing-extensions", "gguf",
          "fastapi", "starlette", "uvicorn", "opentelemetry-api", "importlib-metadata", "zipp", "peft", "trl",
          "liger-kernel", "absl-py", "nltk", "joblib", "cloudpickle", "defusedxml", "six", "requests", "urllib3",
          "charset-normalizer", "setuptools")  # fmt: skip
BUNDLE_DATA = ("guanaco/guanaco-llama2-1k-train.parquet", "guanaco/guanaco_1k_messages.jsonl", dpo.TRAIN)


@dataclass(frozen=True)
class Row:
    """One workload: its model, data file and config keys; the seconds a step costs on the reference H200."""

    name: str
    title: str
    shape: str  # a key of SHAPES
    data: str  # under --data
    recipe: str | None  # a recipe's keys; None: train_vs_peers' packed setting's
    keys: dict = field(default_factory=dict)  # set over them
    tiny: dict = field(default_factory=dict)  # and further, with --tiny
    step_s: tuple[float, float] = (2.0, 2.0)  # lorakit's, TRL's: seconds a step at REFERENCE_FLOPS
    quantized: bool = False  # loading also packs the weights into 4 bits
    objective: str = "sft"  # dpo: bench/dpo_vs_trl.py's runs, TRL twice (its defaults, its reference precomputed)
    optional: bool = False  # run when --rows names it (and with --tiny): the default suite fits its budget without it

    @property
    def systems(self) -> tuple[str, ...]:
        return dpo.SYSTEMS if self.objective == "dpo" else peers.SYSTEMS


# Step costs from GPU.md's measurements (tokens a step / tokens a second, H200): the QLoRA recipe 1,702 / 1,870
# (lorakit's dtype policy since) and 1,702 / 2,200 (TRL); the packed 1B 16,364 / 41,882 and 16,364 / 8,467 (TRL
# padding-free on sdpa, its slowest mode: one packed row per micro-batch should be faster). Not measured, estimated:
# Gemma-2-2B (2.6B parameters, checkpointing, 16 rows of <= 1024 a step: ~1.5 s) and full fine-tuning of the 1B
# (1.5x LoRA's FLOPs, fp32 AdamW over 1.2B weights).
ROWS = (
    Row("qlora-7b", "Llama-2-7B, QLoRA recipe", "llama-2-7b", BUNDLE_DATA[0],
        "configs/recipes/llama-2-7b-guanaco-qlora.yaml", step_s=(0.91, 0.77), quantized=True),
    Row("gemma-2b", "Gemma-2-2B, its recipe as LoRA", "gemma-2-2b", BUNDLE_DATA[1],
        "configs/recipes/gemma-2-2b-custom.yaml", {"method": "lora"}, {"train": {"grad_accum": 2}}, step_s=(1.5, 1.5)),
    Row("lora-1b", "Llama-3.2-1B, LoRA, packed 8 x 2048", "llama-3.2-1b", BUNDLE_DATA[1], None, PACKED_1B,
        step_s=(0.39, 1.93)),
    Row("full-1b", "Llama-3.2-1B, full fine-tuning, packed 8 x 2048", "llama-3.2-1b", BUNDLE_DATA[1], None,
        {**PACKED_1B, "method": "full", "train": {**PACKED_1B["train"], "lr": 2e-5}}, step_s=(0.6, 2.0)),
    # Not measured, estimated from the packed 1B's speeds: 8 sequences of ~600 tokens a step; TRL's padded, with a
    # reference forward. Its three processes (~75 s on an H100) do not fit the default budget beside the rows above.
    Row("dpo-1b", "Llama-3.2-1B, LoRA DPO (sigmoid, beta 0.1), 4 pairs x 1024", "llama-3.2-1b", dpo.TRAIN, None,
        DPO_1B, step_s=(0.2, 0.6), objective="dpo", optional=True),
)  # fmt: skip
DEFAULT_ROWS = tuple(r for r in ROWS if not r.optional)
# bench/serve_load.py's options: GPU.md's run had 48 requests x 48 tokens, whose one-at-a-time server alone took 90 s.
SERVE = {"distinct_adapters": 8, "requests": 16, "concurrency": 16, "max_tokens": 32, "max_batch": 16}
SERVE_TINY = {"distinct_adapters": 2, "requests": 4, "concurrency": 2, "max_tokens": 8, "max_batch": 2}
# Time limits. A process's expected seconds: START (imports, the CUDA context) + loading its model (as long as
# prepare took to make and save it, measured each run: GPU.md's 18 s for a 7B, 4 s for a 1B; twice that for QLoRA,
# which packs it into 4 bits) + FIRST_STEP (lazy initialization: cuBLAS, optimizer states; liger's Triton kernels
# come compiled from prepare's warm-up) + steps x the row's step_s x REFERENCE_FLOPS / this device's measured matmul
# peak. Its limit is SLACK x that + FLOOR, never past the budget less what pytest and serving are guaranteed; a
# process stopped there is reported "not measured", never as a failure.
REFERENCE_FLOPS = 790e12  # GPU.md's H200: the step costs above are at this matmul peak
START, FIRST_STEP, SLACK, FLOOR = 12.0, 5.0, 1.5, 30.0
MAKE_S = {"llama-2-7b": 18.0, "gemma-2-2b": 8.0, "llama-3.2-1b": 4.0}  # GPU.md's (the 2B's by its size)
WARM_S = 15.0  # prepare compiling liger's Triton kernels for every shape (not measured)
INSTALL_S = 30.0  # --wheels: pip from the bundle (not measured)
COSTS = {"serve": 60.0, "pytest": 45.0}  # H200 seconds (not measured: GPU.md's serving run was 3x larger)
MINIMUM = {"serve": 40.0, "pytest": 60.0}  # what the training rows never take from them
DEFAULT_BUDGET = 530.0  # the whole suite, --wheels' install included, inside 9 minutes on one H100
# --tiny, on this project's 2-core CPU: a process's imports and loading, a step; serving; generous, a safety net.
TINY_COSTS = {"process": 15.0, "step": 1.0, "serve": 25.0, "pytest": 0.0}
H100_PACE = 4.8 / 3.35  # H200 over H100 memory bandwidth: the H100's steps at most this much slower (same matmul peak)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, help="folder for gpu_suite.md, gpu_suite.json and logs/ (required)")
    p.add_argument("--tiny", action="store_true", help="every row at toy size on the CPU, fp32, 3 steps")
    p.add_argument("--wheels", type=Path, metavar="DIR", help="install what this machine lacks from this bundle first")
    p.add_argument("--make-bundle", type=Path, metavar="DIR", help="write the bundle for --wheels (needs PyPI)")
    p.add_argument("--budget", type=float,
                   help=f"seconds for the whole suite, install included (default {DEFAULT_BUDGET:.0f}; 900 with "
                   "--tiny, where it is only a safety net for make test on a busy machine)")  # fmt: skip
    p.add_argument("--steps", type=int, help="optimizer steps per run, at least 3 (default 6; 3 with --tiny)")
    p.add_argument("--rows", help=f"comma-separated, of {', '.join(r.name for r in ROWS)}, serve, pytest (default all "
                   f"but {', '.join(r.name for r in ROWS if r.optional)}; --tiny: all)")  # fmt: skip
    p.add_argument("--data", type=Path, help=f"the data sets (default {peers.DATA}, else the bundle's)")
    p.add_argument(
        "--no-liger",
        action="store_true",
        help="liger-kernel's kernels for neither system (lorakit: train.kernels none), even if installed",
    )
    p.add_argument("--_prepare", metavar="SPEC", help=argparse.SUPPRESS)
    p.add_argument("--_run", nargs=2, metavar=("SYSTEM", "SPEC"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._prepare:
        print(json.dumps(prepare(json.loads(Path(args._prepare).read_text()))))
        return 0
    if args._run:
        return child(*args._run)
    if args.make_bundle:
        return make_bundle(args.make_bundle)
    if args.out is None:
        p.error("--out DIR is required")
    if args.steps is not None and args.steps < MIN_STEPS:
        p.error(f"--steps must be at least {MIN_STEPS}: the first step is left out of the timing")
    started = float(os.environ.pop("GPU_SUITE_STARTED", 0)) or time.time()  # set across --wheels' exec
    if args.wheels and Path(sys.prefix).resolve() != (args.out / "env").resolve():
        install_bundle(args.wheels.resolve(), args.out.resolve(), started)  # runs the suite in OUT/env
        return 2  # only when the install failed
    return suite(args, started)


# --- the suite ---------------------------------------------------------------------------------------------


@dataclass
class Suite:
    """What every step of the run shares: options, folders, the time budget, the device and the models."""

    out: Path
    work: Path
    tiny: bool
    data: Path
    started: float  # the budget counts from here (before --wheels' install)
    budget: float
    steps: int
    tokenizer: str | None  # None: the alias's
    liger: bool  # liger-kernel's kernels, for both systems: installed, on a GPU, and no --no-liger
    device: dict = field(default_factory=dict)  # name, torch, memory_bytes, matmul_flops, made_s
    models: dict = field(default_factory=dict)  # shape -> folder
    failures: list[str] = field(default_factory=list)  # lorakit's own: the exit status

    def elapsed(self) -> float:
        return time.time() - self.started

    def left(self) -> float:
        return self.budget - self.elapsed()


def limit(s: Suite, expected: float, reserve: float = 0.0) -> float:
    """A process's time limit: SLACK x its expected seconds + FLOOR, within the budget's time left less `reserve`
    (the minimum of what must still run after it). With --tiny, the time left: there the budget is a safety net, and
    every row has to run (make test checks that each does)."""
    if s.tiny:
        return s.left() - reserve
    return min(SLACK * expected + FLOOR, s.left() - reserve)


def not_measured(limit_s: float, expected: float) -> dict:
    """A process stopped at its time limit, or never started for want of time: no number, and not a failure."""
    if limit_s < expected:
        return {"not_measured": f"{max(limit_s, 0):.0f} s of the budget left, {expected:.0f} s expected"}
    return {"not_measured": f"stopped at its limit of {limit_s:.0f} s ({expected:.0f} s expected)"}


def suite(args: argparse.Namespace, started: float) -> int:
    every = ROWS if args.tiny else DEFAULT_ROWS
    names = args.rows.split(",") if args.rows else [*(r.name for r in every), "serve", "pytest"]
    unknown = set(names) - {*(r.name for r in ROWS), "serve", "pytest"}
    if unknown:
        print(f"error: --rows: unknown {', '.join(sorted(unknown))}", file=sys.stderr)
        return 2
    rows = [r for r in ROWS if r.name in names]
    bundle = args.wheels.resolve() if args.wheels else None
    data = args.data or (bundle / "data" if bundle and not peers.DATA.is_dir() else peers.DATA)
    tokenizer = str(bundle / "tokenizer") if bundle and (bundle / "tokenizer").is_dir() else None
    if args.tiny and (missing := [r for r in rows if not (data / r.data).is_file()]):
        # make test on a checkout without ../shared (a clone elsewhere): the data sets are not copied into the repo.
        print(f"note: skipping the training rows {[r.name for r in missing]}: their data is not in {data} "
              "(../shared/data beside the repository)", file=sys.stderr)  # fmt: skip
        rows = [r for r in rows if r not in missing]
    (args.out / "logs").mkdir(parents=True, exist_ok=True)
    # The models and runs (about 25 GB on a GPU) beside the results, not in a /tmp that may be memory; deleted after.
    with tempfile.TemporaryDirectory(prefix="work-", dir=args.out.resolve()) as td:
        # Kernels for both systems or for neither: lorakit's train.kernels auto applies liger's where TRL's would.
        liger = not (args.tiny or args.no_liger) and importlib.util.find_spec("liger_kernel") is not None
        s = Suite(args.out.resolve(), Path(td), args.tiny, data.resolve(), started,
                  args.budget or (900.0 if args.tiny else DEFAULT_BUDGET), args.steps or (3 if args.tiny else 6),
                  tokenizer, liger)  # fmt: skip
        costs = TINY_COSTS if s.tiny else COSTS
        later = {n: costs[n] for n in ("serve", "pytest") if n in names}  # the work after the training rows
        reserve = sum(MINIMUM[n] for n in later)
        if not s.tiny:
            print(f"expected: {expected_suite_s(s.steps, rows, later):.0f} s on an H200, of a {s.budget:.0f} s budget",
                  file=sys.stderr)  # fmt: skip
        shapes = sorted({r.shape for r in rows} | ({"llama-3.2-1b"} if "serve" in names else set()))
        if not make_models(s, shapes, reserve):
            return 2
        results = [train_row(s, row, rows[i + 1 :], later) for i, row in enumerate(rows)]
        serve = serve_row(s, MINIMUM["pytest"] if "pytest" in later else 0) if "serve" in later else None
        tests = pytest_row(s) if "pytest" in later else None
    table = markdown(s, results, serve, tests)
    print(table)
    (s.out / "gpu_suite.md").write_text(table + "\n")
    summary = {"device": s.device, "tiny": s.tiny, "budget_s": s.budget, "wall_s": round(s.elapsed(), 1),
               "data": str(s.data), "liger": s.liger, "rows": results, "serve": serve, "pytest": tests,
               "failures": s.failures}  # fmt: skip
    (s.out / "gpu_suite.json").write_text(json.dumps(summary, indent=1))
    for failure in s.failures:
        print(f"FAILED {failure}", file=sys.stderr)
    return 1 if s.failures else 0


def process_seconds(row: Row, system: str, steps: int, made_s: float, pace: float = 1.0) -> float:
    """A process's expected seconds on a GPU (the cost model above): `made_s` is how long its model took to make and
    save, `pace` its steps' seconds against the reference H200's."""
    return START + made_s * (2 if row.quantized else 1) + FIRST_STEP + steps * row.step_s[system != "lorakit"] * pace


def process_s(s: Suite, row: Row, system: str, steps: int) -> float:
    """A process's expected seconds here: on a GPU at its measured matmul peak and model-making times."""
    if s.tiny:
        return TINY_COSTS["process"] + TINY_COSTS["step"] * steps
    pace = REFERENCE_FLOPS / s.device["matmul_flops"] if s.device else 1.0
    return process_seconds(row, system, steps, s.device.get("made_s", MAKE_S).get(row.shape, MAKE_S[row.shape]), pace)


def row_cost(s: Suite, row: Row, steps: int) -> float:
    """Expected seconds of a row's processes (lorakit's, TRL's) at `steps` steps."""
    return sum(process_s(s, row, system, steps) for system in row.systems)


def prepare_s(shapes: list[str]) -> float:
    """The expected seconds of the process that makes the models and warms the kernels."""
    return START + sum(MAKE_S[shape] for shape in shapes) + WARM_S


def expected_suite_s(
    steps: int, rows=DEFAULT_ROWS, later: dict | None = None, pace: float = 1.0, install: float = 0
) -> float:
    """The expected seconds of a suite on a GPU whose steps take `pace` x the H200's: the install, the models,
    each row's processes, serving and pytest."""
    later = COSTS if later is None else later
    shapes = {r.shape for r in rows} | ({"llama-3.2-1b"} if "serve" in later else set())
    trained = sum(process_seconds(r, x, steps, MAKE_S[r.shape], pace) for r in rows for x in r.systems)
    return install + prepare_s(sorted(shapes)) + trained + sum(later.values())


def make_models(s: Suite, shapes: list[str], reserve: float) -> bool:
    """The models (in a process of their own on a GPU: the suite's process never holds GPU memory), liger's kernels
    compiled for them, and the device's memory and matmul peak, into s.device and s.models."""
    spec = {"tiny": s.tiny, "shapes": shapes, "folder": str(s.work / "models"), "tokenizer": s.tokenizer,
            "liger": s.liger}  # fmt: skip
    if s.tiny:  # on the CPU: a process less (about 7 s on two cores)
        made = prepare(spec)
    else:
        path = s.work / "prepare.json"
        path.write_text(json.dumps(spec))
        rc, out, _ = spawn([sys.executable, __file__, "--_prepare", str(path)], s, "prepare",
                           limit(s, prepare_s(shapes), reserve))  # fmt: skip
        if rc != 0:
            print(f"error: making the models failed: {last_error(s, 'prepare', rc)}", file=sys.stderr)
            return False
        made = json.loads(out.strip().splitlines()[-1])
    s.device, s.models = made["device"], made["models"]
    return True


def prepare(spec: dict) -> dict:
    """Random weights of the reference shapes with the alias's tokenizer, saved (each one's seconds measured: its
    rows' processes load it in about as long); liger's kernels compiled; and this device, measured."""
    import platform

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from lorakit import model, plan

    device = "cpu" if spec["tiny"] else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit(f"no CUDA GPU here (torch {torch.__version__}); --tiny runs the suite on the CPU")
    path = spec["tokenizer"]
    tok = model.with_pad(AutoTokenizer.from_pretrained(path)) if path else model.load_tokenizer(ALIAS)
    models, made_s, configs = {}, {}, {}
    for shape in spec["shapes"]:
        t0 = time.perf_counter()
        raw = {k: v for k, v in plan._reference(SHAPES[shape]).items() if k not in ("_name_or_path", "torch_dtype")}
        kind = raw.pop("model_type")
        raw |= {"vocab_size": len(tok), "pad_token_id": tok.pad_token_id, "bos_token_id": tok.bos_token_id,
                "eos_token_id": tok.eos_token_id}  # fmt: skip
        if spec["tiny"]:
            raw |= TINY_SIZES | ({"query_pre_attn_scalar": 16} if kind == "gemma2" else {})
        configs[shape] = AutoConfig.for_model(kind, **raw)
        folder = Path(spec["folder"]) / shape
        with torch.device(device):  # random weights made where they run: a 7B in seconds on a GPU
            net = AutoModelForCausalLM.from_config(configs[shape],
                                                   dtype=torch.float32 if spec["tiny"] else torch.bfloat16)  # fmt: skip
        net.save_pretrained(folder)
        tok.save_pretrained(folder)
        models[shape] = str(folder)
        del net
        made_s[shape] = round(time.perf_counter() - t0, 1)
    warm_s = warm_kernels(configs) if device == "cuda" and spec.get("liger") else 0.0
    memory, flops = plan.this_device(device, seconds=0.5)
    name = torch.cuda.get_device_name(0) if device == "cuda" else f"CPU ({platform.machine()})"
    return {"models": models, "device": {"kind": device, "name": name, "torch": torch.__version__,
                                         "memory_bytes": memory, "matmul_flops": flops, "made_s": made_s,
                                         "warm_s": round(warm_s, 1)}}  # fmt: skip


def warm_kernels(configs: dict) -> float:
    """Compile liger-kernel's Triton kernels for each shape's sizes, once, here: the training processes then load them
    from Triton's on-disk cache instead of compiling them inside their time limits. A one-layer model of each shape
    (its widths are what the kernels specialize on) runs a forward and backward in bf16 weights, and in fp32 ones
    under bf16 autocast (full fine-tuning's master weights), at a token count that is a multiple of 16 and one that
    is not (Triton specializes on that too). Returns the seconds it took."""
    import torch
    from transformers import AutoModelForCausalLM

    from lorakit import kernels

    t0 = time.perf_counter()
    for config in configs.values():
        small = config.__class__.from_dict({**config.to_dict(), "num_hidden_layers": 1, "vocab_size": 256,
                                            "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2})  # fmt: skip
        for dtype in (torch.bfloat16, torch.float32):
            with torch.device("cuda"):
                net = AutoModelForCausalLM.from_config(small, dtype=dtype)
            if not kernels.apply(net, "auto", "cuda"):
                return time.perf_counter() - t0  # none for this architecture here: nothing to compile
            for n in (64, 67):
                ids = torch.randint(0, 256, (2, n), device="cuda")
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    net(input_ids=ids, labels=ids).loss.backward()
            del net
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def trl_installed() -> bool:
    """Whether TRL is importable here (the bench extra): without it, a row's TRL processes are not started."""
    return importlib.util.find_spec("trl") is not None


def train_row(s: Suite, row: Row, rows_after: list[Row], later: dict[str, float]) -> dict:
    """lorakit, then TRL, on one workload, at the most steps at which it, the rows after it and the work after them
    (`later`: expected seconds) fit the time left; the plan's prediction for lorakit's config. A process short of time
    is "not measured", never a lorakit failure (except with --tiny, whose point is that every row runs)."""
    steps, rest = s.steps, sum(later.values())
    while steps > MIN_STEPS and sum(row_cost(s, r, steps) for r in [row, *rows_after]) + rest > s.left():
        steps -= 1
    out = {"row": row.name, "title": row.title, "steps": steps, "of_steps": s.steps, "systems": {}}
    for system in row.systems:
        if system != "lorakit" and not trl_installed():
            out["systems"][system] = {"error": "TRL not installed (pip install -e '.[bench]')"}
            continue
        expected = process_s(s, row, system, steps)
        limit_s = limit(s, expected, sum(MINIMUM[n] for n in later))
        if limit_s < expected:
            got = not_measured(limit_s, expected)
        else:
            got = run_child(s, f"{row.name}-{system}", system, run_body(s, row, system, steps), limit_s, expected)
        if system == "lorakit" and (s.tiny or "not_measured" not in got):  # --tiny: every row must run
            problem = got.get("error") or got.get("not_measured") or check(got, steps)
        else:
            problem = None
        if problem:
            got["error"] = problem
            s.failures.append(f"{row.name} lorakit: {problem}")
        out["systems"][system] = got
    return out


def run_body(s: Suite, row: Row, system: str, steps: int) -> dict:
    """The run config of `system` on `row`: the recipe's (or train_vs_peers' packed setting's, or dpo_vs_trl's) keys,
    the row's, and this suite's: its model, data file, steps, folders, no eval and no checkpoints, and liger's kernels
    only where TRL gets them too."""
    from lorakit import config

    if row.recipe:
        base = config.load(ROOT / row.recipe).model_dump(mode="json")
    else:
        base = dpo.run_config(steps, s.work) if row.objective == "dpo" else peers.run_config("packed", steps, s.work)
    keys = config.merged(config.merged(row.keys, TINY_ROWS), row.tiny) if s.tiny else row.keys
    ours = {"model": s.models[row.shape], "output_dir": str(s.work / f"{row.name}-{system}"),
            "data": {"train": str(s.data / row.data), "eval": None, "cache_dir": str(s.work / "tokenized")},
            "train": {"max_steps": steps, "save_every": None, "eval_every": None, "log_every": 1,
                      "kernels": "auto" if s.liger else "none"}}  # fmt: skip
    body = config.merged(config.merged(base, keys), ours)
    if row.objective == "dpo":  # as dpo_vs_trl's: new pairs each step, and the reference scores only those
        body["data"]["limit"] = steps * body["train"]["batch_size"] * body["train"]["grad_accum"]
    return body


def predict(cfg, device: dict) -> dict:
    """`lorakit plan` for a run config on this device (its memory and the matmul peak measured before the runs, and
    the memory bandwidth plan lists for a GPU of its name: QLoRA's dequantization is priced at it)."""
    from lorakit import plan

    named = [(abs(size - device["memory_bytes"]), bandwidth) for name, (size, _, bandwidth) in plan.GPUS.items()
             if name.split()[0] in device["name"]]  # fmt: skip
    here = plan.Device(device["kind"], device["memory_bytes"], device["matmul_flops"], min(named)[1] if named else 0.0)
    est = plan.estimate(plan.load_shape(cfg.model), plan.setup_of(cfg, here.kind), {"this device": here})
    return {"peak_mib": round(est.peak_bytes / MIB), "tokens_per_s": round(est.tokens_per_s, 1)}


def check(got: dict, steps: int) -> str | None:
    """What is wrong with a lorakit run's numbers, if anything."""
    losses = got.get("losses", [])
    if len(losses) != steps or not all(math.isfinite(x) for x in losses):
        return f"expected {steps} finite losses, got {losses}"
    if not got.get("tokens_per_s", 0) > 0:
        return f"no speed measured ({got.get('tokens_per_s')})"
    plan = got.get("plan") or {}
    if not (plan.get("peak_mib", 0) > 0 and plan.get("tokens_per_s", 0) > 0):
        return f"no plan prediction ({got.get('plan_error') or plan})"
    return None


def serve_row(s: Suite, rest: float) -> dict:
    """bench/serve_load.py --distinct-adapters on the 1B, as it is."""
    size = SERVE_TINY if s.tiny else SERVE
    cmd = [sys.executable, str(ROOT / "bench" / "serve_load.py"), "--model", s.models["llama-3.2-1b"],
           *(x for key, value in size.items() for x in (f"--{key.replace('_', '-')}", str(value)))]  # fmt: skip
    expected = (TINY_COSTS if s.tiny else COSTS)["serve"]
    limit_s = limit(s, expected, rest)
    rc, out, peak = spawn(cmd, s, "serve", limit_s) if limit_s >= MINIMUM["serve"] else (None, "", None)
    got: dict = dict(size)
    if rc is None:
        got |= not_measured(limit_s, expected)
        if s.tiny:  # --tiny: serving must answer
            s.failures.append(f"serve: not measured: {got['not_measured']}")
        return got
    if rc != 0:
        got["error"] = last_error(s, "serve", rc)
    else:
        try:
            got |= serve_numbers(json.loads(out[out.rfind("\n{") + 1 :]))  # its JSON comes last, indented
        except (ValueError, KeyError, TypeError) as e:
            got["error"] = f"cannot read serve_load's result ({type(e).__name__}: {e}); see logs/serve.log"
        got |= memory(peak, None, None)
        if "error" not in got and (got["errors"] or not all(v > 0 for v in got["requests_per_s"].values())):
            got["error"] = f"{got['errors']} failed requests, requests/s {got['requests_per_s']}"
    if "error" in got:
        s.failures.append(f"serve: {got['error']}")
    return got


def serve_numbers(result: dict) -> dict:
    modes = ("batched_lora", "base_only", "peft_per_row", "one_at_a_time")
    return {"requests_per_s": {m: result[m]["requests_per_s"] for m in modes},
            "tokens_per_s": result["batched_lora"]["tokens_per_s"], "errors": sum(result[m]["errors"] for m in modes),
            "same_answers": result["same_answers_adapter_modes"]}  # fmt: skip


def pytest_row(s: Suite) -> dict:
    """pytest -m gpu on the files that carry the marker (the others' optional imports, e.g. openai, stay out)."""
    if s.tiny:
        return {"skipped": "no GPU in --tiny (pytest -m gpu skips every test on a CPU)"}
    files = sorted(str(f) for f in (ROOT / "tests").rglob("test_*.py") if "mark.gpu" in f.read_text())
    if not files:  # pytest given no file would collect the whole of tests/
        return {"skipped": "no test file carries the gpu marker"}
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", *files]
    limit_s = max(limit(s, COSTS["pytest"]), MINIMUM["pytest"])  # its minimum even past the budget
    rc, out, _ = spawn(cmd, s, "pytest", limit_s)
    if rc is None:
        return {"files": [str(Path(f).relative_to(ROOT)) for f in files]} | not_measured(limit_s, COSTS["pytest"])
    summary = re.findall(r"^=* ?(\d+ (?:passed|failed|skipped|errors?|deselected).*?) ?=*$", out, re.MULTILINE)
    got = {"files": [str(Path(f).relative_to(ROOT)) for f in files], "summary": summary[-1] if summary else "",
           "returncode": rc}  # fmt: skip
    if rc != 0:
        got["error"] = got["summary"] or last_error(s, "pytest", rc)
        s.failures.append(f"pytest -m gpu: {got['error']}")
    return got


# --- processes ---------------------------------------------------------------------------------------------


def run_child(s: Suite, name: str, system: str, body: dict, limit_s: float, expected: float) -> dict:
    """One system's run in its own process: its numbers, peak memory and versions, its error, or "not measured" when
    it ran out of time."""
    spec = s.work / f"{name}.json"
    spec.write_text(json.dumps({"config": body, "device": s.device, "liger": s.liger}))
    t0 = time.perf_counter()
    rc, out, peak = spawn([sys.executable, __file__, "--_run", system, str(spec)], s, name, limit_s)
    if rc is None:
        return not_measured(limit_s, expected)
    if rc != 0:
        return {"error": last_error(s, name, rc)}
    try:
        got = json.loads(out.strip().splitlines()[-1])
    except (IndexError, ValueError):
        return {"error": f"no result on its last line of output (logs/{name}.log)"}
    # The process's own seconds beside the cost model's: what the next run's costs should be fitted to.
    got |= {"process_s": round(time.perf_counter() - t0, 1), "expected_s": round(expected, 1)}
    return got | memory(peak, got.get("reserved_mib"), got.get("rss_mib"))


def memory(smi: float | None, reserved: float | None, rss: float | None) -> dict:
    if smi is not None:
        return {"peak_mib": round(smi), "peak_source": "nvidia-smi"}
    if reserved is not None:
        return {"peak_mib": round(reserved), "peak_source": "max_memory_reserved"}
    return {"peak_mib": None if rss is None else round(rss), "peak_source": "RSS"}


def spawn(cmd: list[str], s: Suite, name: str, limit: float) -> tuple[int | None, str, float | None]:
    """Run cmd in its own process group (stopped whole at `limit` seconds), stderr and stdout to logs/NAME.log:
    (return code, None when stopped; stdout; nvidia-smi's peak above its level before, on a GPU)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if s.tiny:
        env["CUDA_VISIBLE_DEVICES"] = ""  # the CPU, even on a GPU machine
    log = s.out / "logs" / f"{name}.log"
    smi = None if s.tiny else SmiPeak()
    print(f"[{time.strftime('%H:%M:%S')}] {name} (limit {limit:.0f} s)", file=sys.stderr, flush=True)
    with log.open("w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, cwd=ROOT, env=env,
                                start_new_session=True)  # fmt: skip
        try:
            out, _ = proc.communicate(timeout=limit)
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, rc = proc.communicate()[0], None
        except BaseException:  # Ctrl-C: its own session would outlive this process otherwise
            os.killpg(proc.pid, signal.SIGKILL)
            raise
    with log.open("a") as f:
        f.write(f"\n--- stdout ---\n{out}\n--- exit: {'stopped at its time limit' if rc is None else rc} ---\n")
    return rc, out, smi.stop() if smi else None


def last_error(s: Suite, name: str, rc: int | None) -> str:
    """The last line of a failed process's stderr (a traceback's error), for the table; the whole is in its log."""
    if rc is None:
        return "stopped at its time limit"
    text = (s.out / "logs" / f"{name}.log").read_text().split("\n--- stdout ---")[0]
    lines = [line for line in text.splitlines() if line.strip() and not line.startswith((" ", "\t"))]
    return (lines[-1] if lines else f"exit status {rc}")[:300]


class SmiPeak:
    """nvidia-smi's memory.used of this process's GPU every 100 ms, from before a process starts to its end."""

    def __init__(self) -> None:
        gpu = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0] or "0"
        self.samples: list[int] = []
        try:
            self.proc = subprocess.Popen(["nvidia-smi", f"--id={gpu}", "--query-gpu=memory.used",
                                          "--format=csv,noheader,nounits", "-lms", "100"],
                                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)  # fmt: skip
        except OSError:
            self.proc = None
            return
        first = self.proc.stdout.readline().strip()  # the level before: blocks until nvidia-smi's first sample
        self.base = int(first) if first.isdigit() else None
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            if line.strip().isdigit():
                self.samples.append(int(line))

    def stop(self) -> float | None:
        if self.proc is None:
            return None
        self.proc.terminate()
        self.proc.wait()
        self.reader.join(timeout=2)
        return max(self.samples) - self.base if self.samples and self.base is not None else None


def child(system: str, spec: str) -> int:
    """One run, in this process: its losses, tokens/s over steps 2..N and peak memory, as the last line of stdout."""
    import torch

    from lorakit import config

    spec = json.loads(Path(spec).read_text())
    cfg = config.validate(spec["config"])
    if system == "lorakit":
        run = peers.one_lorakit(cfg)
        seen = run["recorded_tokens"]  # input tokens so far, at each step
        got = {"losses": run["losses"], "tokens_per_s": speed([b - a for a, b in zip([0, *seen], seen)],
                                                               run["step_end_s"]),
               "padding_share": run["padding_share"]}  # fmt: skip
        try:
            got["plan"] = predict(cfg, spec["device"])
        except Exception as e:  # noqa: BLE001 - whatever breaks the prediction, the run's numbers still count
            got["plan_error"] = f"{type(e).__name__}: {e}"
    else:
        dpo_row = cfg.objective == "dpo"
        run, versions = one_trl_dpo(cfg, system, spec["liger"]) if dpo_row else one_trl(cfg, spec["liger"])
        padded = round(1 - sum(run["step_tokens"]) / sum(run["step_positions"]), 4)
        got = {"losses": run["losses"], "tokens_per_s": speed(run["step_tokens"], run["step_end_s"]),
               "padding_share": padded, **versions}  # fmt: skip
    if torch.cuda.is_available():
        got |= {"reserved_mib": torch.cuda.max_memory_reserved() / MIB,
                "allocated_mib": torch.cuda.max_memory_allocated() / MIB}  # fmt: skip
    got["rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    print(json.dumps(got))
    return 0


def speed(step_tokens: list[int], step_end_s: list[float]) -> float:
    """Input tokens a second over steps 2..N: the first step pays for lazy initialization in both systems."""
    seconds = step_end_s[-1] - step_end_s[0] if len(step_end_s) > 1 else 0
    return round(sum(step_tokens[1:]) / seconds, 1) if seconds > 0 else 0.0


def trl_device(cfg, liger: bool) -> tuple[dict, dict]:
    """What TRL's run takes from this run's device, precision, optimizer, checkpointing and method: the keywords of
    lorakit.model.load_model (on a GPU bf16, 4-bit for qlora, fp32 master weights for full: as lorakit's run loads it)
    and the trainer config's keys (bf16 autocast, the run's optimizer and checkpointing, liger's kernels when
    `liger`, which lorakit's run then has too)."""
    import torch

    gpu, t = torch.cuda.is_available(), cfg.train
    dtype = torch.bfloat16 if gpu and cfg.method != "full" else torch.float32
    load = {"dtype": dtype, "device": "cuda" if gpu else "cpu"}
    if cfg.method == "qlora":
        load |= {"quantization": "4bit", "compute_dtype": torch.bfloat16 if gpu else torch.float32}
    optim = "adamw_torch_fused" if gpu and t.optimizer == "adamw" else OPTIM[t.optimizer]  # lorakit's fused on GPUs
    keys = {"use_cpu": not gpu, "bf16": gpu, "gradient_checkpointing": t.gradient_checkpointing, "optim": optim,
            "use_liger_kernel": gpu and liger}  # fmt: skip
    return load, keys


def one_trl(cfg, liger: bool) -> tuple[dict, dict]:
    """train_vs_peers.one_trl as it is, given this run's device, precision, optimizer, checkpointing and method.

    one_trl is the CPU comparison's (fp32, no checkpointing, AdamW, LoRA); its seams, replaced here in this
    process that runs it once: the model loads and SFTConfig takes what trl_device says, TRL runs the rows as
    train_vs_peers.trl_setting says for this machine's attention (liger's kernels as trl_device's), and the trainer
    drops the LoRA config for full fine-tuning. (train_vs_peers' step clock syncs CUDA before each timestamp.)
    """
    import peft
    import torch
    import trl

    from lorakit import model

    gpu, t = torch.cuda.is_available(), cfg.train
    load, ours = trl_device(cfg, liger)
    flash = gpu and importlib.util.find_spec("flash_attn") is not None
    setting = peers.trl_setting(cfg.data.packing, t.batch_size, t.grad_accum, flash, ours.pop("use_liger_kernel"))
    real_load, real_config, real_trainer = model.load_model, trl.SFTConfig, trl.SFTTrainer
    lora = cfg.method != "full"
    versions = {"trl": trl.__version__, "peft": peft.__version__ if lora else None, "setting": setting["words"]}

    class Peer(real_trainer):
        def __init__(self, *a, peft_config=None, **kw):
            super().__init__(*a, peft_config=peft_config if lora else None, **kw)
            versions["trained_params"] = sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    model.load_model = lambda name, **kw: real_load(name, **load)
    trl.SFTConfig = lambda **kw: real_config(**(kw | ours))
    trl.SFTTrainer = Peer
    return peers.one_trl(cfg, setting), versions


def one_trl_dpo(cfg, arm: str, liger: bool) -> tuple[dict, dict]:
    """dpo_vs_trl.one_trl's `arm` (its defaults, or its reference precomputed), given what trl_device says."""
    import peft
    import trl

    load, keys = trl_device(cfg, liger)
    run = dpo.one_trl(cfg, arm, load, keys)
    return run, {"trl": trl.__version__, "peft": peft.__version__, "setting": run["setting"]}


# --- the table ---------------------------------------------------------------------------------------------


def markdown(s: Suite, results: list[dict], serve: dict | None, tests: dict | None) -> str:
    d = s.device
    matmul = f"{'bf16' if d['kind'] == 'cuda' else 'fp32'} matmul {d['matmul_flops'] / 1e12:.1f} TFLOP/s measured"
    lines = [
        f"**gpu_suite{' --tiny' if s.tiny else ''}** on {d['name']} ({d['memory_bytes'] / MIB:,.0f} MiB, {matmul}), "
        f"torch {d['torch']}; {s.elapsed():.0f} s of a {s.budget:.0f} s budget; random weights of the reference "
        f"shapes{TINY_WORDS if s.tiny else ''} with the alias's tokenizer; data from {s.data}; liger-kernel's "
        f"kernels for {'both systems' if s.liger else 'neither system'}",
        "",
        "| workload | system | steps | tokens/s (steps 2..N) | peak memory | loss first → last | lorakit plan "
        "(error) | notes |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        steps = f"{r['steps']}" + (f" of {r['of_steps']} (time budget)" if r["steps"] < r["of_steps"] else "")
        lk = r["systems"]["lorakit"]
        lines.append(cells(r["title"], "lorakit", steps, lk, planned(lk), problem(lk) or padding(lk)))
        for system, trl in r["systems"].items():  # TRL's, once or (DPO) twice
            if system == "lorakit":
                continue
            name = " + ".join(x for x in (f"TRL {trl.get('trl', '')}".strip(),
                                          trl.get("peft") and f"PEFT {trl['peft']}") if x)  # fmt: skip
            name += f" ({trl.get('setting') or system})"  # DPO's two arms apart, measured or not
            note = problem(trl) or "; ".join(x for x in (padding(trl), versus(lk, trl)) if x)
            lines.append(cells("", name, steps, trl, "", note))
    if serve is not None:
        if problem(serve):
            note = problem(serve)
        else:
            rates = ", ".join(f"{m.replace('_', ' ')} {v:.2f}" for m, v in serve["requests_per_s"].items())
            note = f"requests/s: {rates}; same answers in the adapter modes: {'yes' if serve['same_answers'] else 'no'}"
        what = f"{serve['requests']} requests x {serve['max_tokens']} tokens, {serve['concurrency']} clients"
        title = f"serving the 1B, {serve['distinct_adapters']} adapters"
        lines.append(cells(title, "lorakit", what, serve, "", note))
    if tests is not None:
        note = tests.get("skipped") or problem(tests) or tests["summary"]
        lines.append(f"| pytest -m gpu | lorakit | | | | | | {escape(note)} |")
    return "\n".join(lines)


def padding(got: dict) -> str:
    """The share of the positions its micro-batches held that were padding (lorakit's: 0 where padding-free)."""
    return f"padding {got['padding_share']:.1%} of positions" if "padding_share" in got else ""


def problem(got: dict) -> str | None:
    """A run's error, or why it has no numbers: "not measured" is a run out of time, not a failure."""
    return got.get("error") or (got.get("not_measured") and f"not measured: {got['not_measured']}")


def cells(title: str, system: str, steps: str, got: dict, plan: str, note: str) -> str:
    losses = got.get("losses") or []
    loss = f"{losses[0]:.3f} → {losses[-1]:.3f}" if losses else ""
    speed_cell = f"{got['tokens_per_s']:,.0f}" if got.get("tokens_per_s") else ""
    peak = f"{got['peak_mib']:,} MiB ({got['peak_source']})" if got.get("peak_mib") else ""
    return f"| {title} | {system} | {steps} | {speed_cell} | {peak} | {loss} | {plan} | {escape(note)} |"


def planned(got: dict) -> str:
    """The plan's peak and speed, each with its error against the measured one."""
    p = got.get("plan")
    if not p:
        return ""
    return (f"{p['peak_mib']:,} MiB{error(p['peak_mib'], got.get('peak_mib'))}, "
            f"{p['tokens_per_s']:,.0f} tok/s{error(p['tokens_per_s'], got.get('tokens_per_s'))}")  # fmt: skip


def error(predicted: float, measured: float | None) -> str:
    return f" ({predicted / measured - 1:+.0%})" if measured else ""


def versus(lk: dict, trl: dict) -> str:
    if not (lk.get("tokens_per_s") and trl.get("tokens_per_s")):
        return ""
    note = f"lorakit/TRL: {lk['tokens_per_s'] / trl['tokens_per_s']:.2f}x speed"
    if lk.get("peak_mib") and trl.get("peak_mib"):
        note += f", {lk['peak_mib'] / trl['peak_mib']:.2f}x memory"
    if lk.get("losses") and trl.get("losses"):
        note += f"; losses differ by {peers.agreement(lk['losses'], trl['losses'])['max_rel_diff']:.1%} at most"
    return note


def escape(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


# --- the wheel bundle --------------------------------------------------------------------------------------


def install_bundle(wheels: Path, out: Path, started: float) -> None:
    """A virtual environment in OUT/env over this interpreter's packages, with this checkout (editable) and what
    its qlora, serve and bench extras need that this machine lacks, from the bundle alone; then the suite in it."""
    env = out / "env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", "--system-site-packages", str(env)], check=True)
    python = env / "bin" / "python"
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    # A venv made from a venv sees the base interpreter's packages, not this one's (torch may be in either).
    outer = [p for p in sys.path if p.endswith(("site-packages", "dist-packages")) and Path(p).is_dir()]
    Path(site, "gpu-suite-outer.pth").write_text("\n".join(outer) + "\n")
    # TRL's kernels, where they can run: liger-kernel's are triton's (which CUDA builds of torch bring).
    liger = any(wheels.glob("liger_kernel-*")) and importlib.util.find_spec("triton") is not None
    pip = [python, "-m", "pip", *install_args(wheels, liger)]
    log = out / "logs" / "install.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    print(f"installing from {wheels} into {env} (log: {log}): {' '.join(map(str, pip[1:]))}", file=sys.stderr)
    done = subprocess.run(pip, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log.write_text(done.stdout)
    if done.returncode != 0:
        print(pip_errors(done.stdout) + f"\nerror: the bundle {wheels} lacks that; see --make-bundle", file=sys.stderr)
        return
    print(done.stdout.splitlines()[-1], file=sys.stderr, flush=True)  # pip's "Successfully installed ..."
    os.environ["GPU_SUITE_STARTED"] = str(started)  # the budget counts the install too
    os.execv(python, [str(python), *sys.argv])  # the same options: there, --wheels only finds the tokenizer and data


def install_args(wheels: Path, liger: bool) -> list[str]:
    """pip's arguments that install this checkout (editable) with its qlora, serve and bench extras from the bundle
    alone. Eager upgrades: where the machine has an older copy of a bundled package (peft), the bundle's, the version
    lorakit is tested with, goes over it; the machine's own packages stay, the bundle having no other version."""
    return ["install", "--no-index", "--find-links", str(wheels), "--upgrade", "--upgrade-strategy", "eager",
            "-e", f"{ROOT}[qlora,serve,bench]", *(["liger-kernel"] if liger else [])]  # fmt: skip


def pip_errors(output: str) -> str:
    """pip's reasons in its output: its ERROR lines and a conflict's explanation."""
    keep = ("ERROR", "The conflict is caused by", "    ")
    return "\n".join(line for line in output.splitlines() if line.startswith(keep) and "Location" not in line)


def machine_env(folder: Path, python: str) -> Path:
    """A virtual environment of `python` holding GPU_MACHINE's packages as their metadata alone: what pip, installing
    on the GPU machine, finds installed there. Returns its interpreter."""
    subprocess.run([python, "-m", "venv", "--without-pip", str(folder)], check=True)
    env_python = folder / "bin" / "python"
    site = Path(subprocess.run([env_python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())  # fmt: skip
    for name, (version, requires) in GPU_MACHINE.items():
        info = site / f"{name.replace('-', '_')}-{version}.dist-info"
        info.mkdir()
        extras = sorted({e for r in requires for e in re.findall(r'extra == "(\\w+)"', r)})
        lines = ["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}",
                 *(f"Provides-Extra: {e}" for e in extras), *(f"Requires-Dist: {r}" for r in requires)]  # fmt: skip
        (info / "METADATA").write_text("\n".join(lines) + "\n")
        (info / "RECORD").write_text("")
    return env_python


def python312() -> str | None:
    """A CPython 3.12 on this machine (the GPU machine's: the bundle's wheels are for it), or None."""
    pyenv = Path(os.environ.get("PYENV_ROOT") or Path.home() / ".pyenv")
    candidates = [sys.executable, shutil.which("python3.12"), *sorted(pyenv.glob("versions/3.12*/bin/python3.12"))]
    for python in filter(None, candidates):
        done = subprocess.run([python, "-c", "import sys; print(sys.version_info[:2] == (3, 12))"],
                              capture_output=True, text=True)  # fmt: skip
        if done.stdout.strip() == "True":
            return str(python)
    return None


def check_bundle(wheels: Path, python: str) -> tuple[bool, str]:
    """Whether install_bundle's install resolves on the GPU machine: pip's dry run of it (liger-kernel included),
    offline, from `python` (a 3.12) in a machine_env. Returns (resolved, pip's errors or what it would install)."""
    with tempfile.TemporaryDirectory(prefix="gpu-machine-") as td:
        env = machine_env(Path(td) / "env", python)
        done = subprocess.run([sys.executable, "-m", "pip", "--python", str(env), *install_args(wheels, liger=True),
                               "--dry-run"], capture_output=True, text=True)  # fmt: skip
    output = done.stdout + done.stderr
    if done.returncode != 0:
        return False, pip_errors(output)
    return True, next((line for line in output.splitlines() if line.startswith("Would install")), "")


def bundle_specs() -> list[str]:
    """What bundle_wheels downloads, rouge-score last (built): BUNDLE at the versions installed here (the latest
    where not installed), or at BUNDLE's own pins."""

    def pinned(name: str) -> str:
        try:
            return name if "==" in name else f"{name}=={importlib.metadata.version(name)}"
        except importlib.metadata.PackageNotFoundError:
            return name

    return [pinned(name) for name in (*BUNDLE, "rouge-score")]


def bundle_wheels(folder: Path) -> None:
    """The wheels of bundle_specs for CPython 3.12 on x86-64 Linux; rouge-score's built here. Needs PyPI."""
    *wheels, rouge = bundle_specs()
    pip = [sys.executable, "-m", "pip"]
    platforms = [x for p in ("manylinux_2_28_x86_64", "manylinux_2_24_x86_64", "manylinux2014_x86_64")
                 for x in ("--platform", p)]  # fmt: skip
    subprocess.run([*pip, "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
                    "--implementation", "cp", *platforms, "-d", str(folder), *wheels], check=True)  # fmt: skip
    subprocess.run([*pip, "wheel", "-q", "--no-deps", "-w", str(folder), rouge], check=True)


def make_bundle(folder: Path) -> int:
    """--make-bundle: bundle_wheels, the alias's tokenizer and the data files; then check_bundle, where this machine
    has a Python 3.12 to check with."""
    from lorakit import model

    bundle_wheels(folder)
    model.load_tokenizer(ALIAS).save_pretrained(folder / "tokenizer")
    for name in BUNDLE_DATA:
        (folder / "data" / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(peers.DATA / name, folder / "data" / name)
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    print(f"{folder}: {size / 1e6:.1f} MB; on the GPU machine: python3 bench/gpu_suite.py --wheels {folder} --out OUT")
    python = python312()
    if python is None:
        print("note: not checked: no Python 3.12 here to run pip's dry run of the install as the GPU machine would")
        return 0
    resolved, said = check_bundle(folder, python)
    print(f"checked against the GPU machine's packages (GPU_MACHINE): {'it installs' if resolved else 'it does not'}"
          f"\n{said}")  # fmt: skip
    return 0 if resolved else 1


if __name__ == "__main__":
    sys.exit(main())
