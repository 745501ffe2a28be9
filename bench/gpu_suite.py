"""One command for one CUDA GPU, offline, in under 8 minutes: lorakit against TRL + PEFT, serving, `pytest -m gpu`.

    python bench/gpu_suite.py --out runs/gpu-suite                     # the GPU machine (make bench-gpu)
    python bench/gpu_suite.py --wheels bundle/ --out runs/gpu-suite    # one with torch but not the rest
    python bench/gpu_suite.py --tiny --out /tmp/suite                  # every row at toy size on the CPU (make test)
    python bench/gpu_suite.py --make-bundle bundle/                    # on a connected machine: what --wheels needs

Prints one markdown table and writes it, with every number and each process's log, to --out (gpu_suite.md,
gpu_suite.json, logs/). Each training row runs lorakit, then TRL's SFTTrainer + PEFT on the same tokenized rows in
the same order with the same hyperparameters (bench/train_vs_peers.py's one_lorakit and one_trl, given the GPU:
bf16 autocast, the run's optimizer and checkpointing, liger-kernel's kernels for TRL where installed), each system
in its own process, so that a peak is its own and a crash ends one row only:
  qlora-7b   configs/recipes/llama-2-7b-guanaco-qlora.yaml on a Llama-2-7B shape, guanaco-llama2-1k
  gemma-2b   configs/recipes/gemma-2-2b-custom.yaml with method lora (the recipe's is qlora) on a Gemma-2-2B
             shape, on guanaco chats (for the recipe's "your own chats")
  lora-1b    LoRA r16 all-linear on a Llama-3.2-1B shape in bf16, guanaco chats packed 8 x 2048, no checkpointing
  full-1b    the same rows, full fine-tuning (fp32 master weights, bf16 autocast), lr 2e-5
  serve      bench/serve_load.py --distinct-adapters 8 on the 1B
  pytest     pytest -m gpu, on the test files that carry the marker
The models are random weights of the bundled reference shapes (src/lorakit/reference_models) with the built-in
alias's tokenizer (vocabulary 49,152), made on the GPU in bf16: speed and memory depend on the shapes alone. They
and the runs (about 25 GB) go to a folder under --out that is deleted at the end.

Measured: tokens/s (all input tokens) over steps 2..N; the peak memory as nvidia-smi reports it (memory.used above
its level before the process, sampled every 100 ms), else torch.cuda.max_memory_reserved, and the peak RSS on a
CPU, each cell saying which; the first and last step's loss; and beside them `lorakit plan`'s prediction for the
run's config on this device at its measured matmul peak, with its error. A budget (--budget, 480 s) bounds the
whole suite: each process is stopped at its share of the time left, and a row short of time trains fewer steps
(at least 3), as its steps cell says. Exit status 1 when a lorakit row, serving or pytest failed (a failing TRL
row is only reported), 2 when nothing could run.

--tiny runs every row on the CPU at toy size (the same architectures at tests/tiny.py's hidden 64 and 2 layers,
fp32, 64 examples in rows of 128 tokens, AdamW, 3 steps), TRL's where TRL is importable, serving with 2 adapters
and 4 requests, and skips pytest -m gpu. It fails unless every lorakit row logged a finite loss at each step, a
positive speed and a plan prediction, and serving answered every request.

The wheel bundle. The GPU machine (/work/shared/GPU.md) has torch, transformers, accelerate, numpy, pandas,
pyarrow, matplotlib, sentencepiece, tokenizers, httpx, pytest, sacrebleu and triton, but not the rest of lorakit's
dependencies, nor the alias's tokenizer or ../shared/data. `--make-bundle DIR`, run with the project's .venv on a
machine that reaches PyPI, downloads BUNDLE's wheels at the versions installed here for CPython 3.12 on x86-64
Linux, builds rouge-score's (PyPI has only its sdist), and adds the alias's tokenizer and the two data files:
59.9 MB (2026-12-04: bitsandbytes 43.1, the other wheels 10.6, the tokenizer 3.5, the data 2.7). Copy DIR over.
`--wheels DIR` then makes a virtual environment in OUT/env over this interpreter's own packages, installs this
checkout (editable) with its qlora, serve and bench extras from DIR alone (`pip install --no-index --find-links
DIR`; pip names whatever is still missing), and runs the suite in it.
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
TINY_WORDS = " at toy size (hidden 64, 2 layers, fp32; 64 examples, rows of 128 tokens, batch 2, AdamW)"
MIN_STEPS = 3  # two timed steps
OPTIM = {"adamw": "adamw_torch", "adamw_8bit": "adamw_bnb_8bit", "paged_adamw_8bit": "paged_adamw_8bit"}
# What the GPU machine lacks (GPU.md), rouge-score's dependencies, gguf's requests (transformers 5 no longer brings
# it), and setuptools to install this checkout; rouge-score itself is built (PyPI has only its sdist).
BUNDLE = ("bitsandbytes", "datasets", "dill", "multiprocess", "pydantic", "pydantic-core", "annotated-types",
          "annotated-doc", "typing-inspection", "typing-extensions", "gguf", "fastapi", "starlette", "uvicorn",
          "opentelemetry-api", "peft", "trl", "liger-kernel", "absl-py", "nltk", "joblib", "cloudpickle", "defusedxml",
          "six", "requests", "urllib3", "charset-normalizer", "setuptools")  # fmt: skip
BUNDLE_DATA = ("guanaco/guanaco-llama2-1k-train.parquet", "guanaco/guanaco_1k_messages.jsonl")


@dataclass(frozen=True)
class Row:
    """One workload: its model, data file and config keys; what it is expected to cost on an H200."""

    name: str
    title: str
    shape: str  # a key of SHAPES
    data: str  # under --data
    recipe: str | None  # a recipe's keys; None: train_vs_peers' packed setting's
    keys: dict = field(default_factory=dict)  # set over them
    tiny: dict = field(default_factory=dict)  # and further, with --tiny
    cost: tuple[float, float] = (60.0, 2.0)  # seconds, lorakit and TRL together: per process pair, per step


# Costs: guesses from GPU.md's runs (a 7B made in 18 s, 1,006 and 2,200 tokens/s on the QLoRA recipe, 41,882 and
# 8,467 on the packed 1B), imports and loading; about 400 s in all at 8 steps, which leaves the budget a margin.
ROWS = (
    Row("qlora-7b", "Llama-2-7B, QLoRA recipe", "llama-2-7b", BUNDLE_DATA[0],
        "configs/recipes/llama-2-7b-guanaco-qlora.yaml", cost=(45, 2.5)),
    Row("gemma-2b", "Gemma-2-2B, its recipe as LoRA", "gemma-2-2b", BUNDLE_DATA[1],
        "configs/recipes/gemma-2-2b-custom.yaml", {"method": "lora"}, {"train": {"grad_accum": 2}}, cost=(40, 2.5)),
    Row("lora-1b", "Llama-3.2-1B, LoRA, packed 8 x 2048", "llama-3.2-1b", BUNDLE_DATA[1], None, PACKED_1B,
        cost=(30, 2.5)),
    Row("full-1b", "Llama-3.2-1B, full fine-tuning, packed 8 x 2048", "llama-3.2-1b", BUNDLE_DATA[1], None,
        {**PACKED_1B, "method": "full", "train": {**PACKED_1B["train"], "lr": 2e-5}}, cost=(40, 3.0)),
)  # fmt: skip
# bench/serve_load.py's options: GPU.md's run had 48 requests x 48 tokens, whose one-at-a-time server alone took 90 s.
SERVE = {"distinct_adapters": 8, "requests": 16, "concurrency": 16, "max_tokens": 32, "max_batch": 16}
SERVE_TINY = {"distinct_adapters": 2, "requests": 4, "concurrency": 2, "max_tokens": 8, "max_batch": 2}
COSTS = {"prepare": 40.0, "serve": 75.0, "pytest": 45.0}  # H200 seconds
TINY_COSTS = {"prepare": 0.0, "serve": 25.0, "pytest": 0.0, "row": (20.0, 1.0)}  # this project's 2-core CPU


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, help="folder for gpu_suite.md, gpu_suite.json and logs/ (required)")
    p.add_argument("--tiny", action="store_true", help="every row at toy size on the CPU, fp32, 3 steps")
    p.add_argument("--wheels", type=Path, metavar="DIR", help="install what this machine lacks from this bundle first")
    p.add_argument("--make-bundle", type=Path, metavar="DIR", help="write the bundle for --wheels (needs PyPI)")
    p.add_argument("--budget", type=float,
                   help="seconds for the whole suite (default 480; 900 with --tiny, where it is only a safety net "
                   "for make test on a busy machine)")  # fmt: skip
    p.add_argument("--steps", type=int, help="optimizer steps per run, at least 3 (default 8; 3 with --tiny)")
    p.add_argument("--rows", help=f"comma-separated, of {', '.join(r.name for r in ROWS)}, serve, pytest (default all)")
    p.add_argument("--data", type=Path, help=f"the data sets (default {peers.DATA}, else the bundle's)")
    p.add_argument("--no-liger", action="store_true", help="TRL without liger-kernel's kernels, even where installed")
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
    liger: bool  # TRL gets liger-kernel's kernels
    device: dict = field(default_factory=dict)  # name, torch, memory_bytes, matmul_flops
    models: dict = field(default_factory=dict)  # shape -> folder
    failures: list[str] = field(default_factory=list)  # lorakit's own: the exit status

    def elapsed(self) -> float:
        return time.time() - self.started

    def left(self) -> float:
        return self.budget - self.elapsed()

    def limit(self, cost: float, rest: float) -> float:
        """A process's time limit: its part of the time left, in proportion to its expected seconds against those
        of the work after it, which it may overrun by half (the later processes then get less)."""
        return max(1.0, min(self.left() - 2, 1.5 * self.left() * cost / max(cost + rest, 1e-9)))


def suite(args: argparse.Namespace, started: float) -> int:
    names = args.rows.split(",") if args.rows else [*(r.name for r in ROWS), "serve", "pytest"]
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
        liger = not (args.tiny or args.no_liger) and importlib.util.find_spec("liger_kernel") is not None
        s = Suite(args.out.resolve(), Path(td), args.tiny, data.resolve(), started,
                  args.budget or (900.0 if args.tiny else 480.0), args.steps or (3 if args.tiny else 8), tokenizer,
                  liger)  # fmt: skip
        costs = TINY_COSTS if s.tiny else COSTS
        later = {n: costs[n] for n in ("serve", "pytest") if n in names}  # the work after the training rows
        shapes = sorted({r.shape for r in rows} | ({"llama-3.2-1b"} if "serve" in names else set()))
        if not make_models(s, shapes, sum(row_cost(s, r, s.steps) for r in rows) + sum(later.values())):
            return 2
        results = [train_row(s, row, rows[i + 1 :], sum(later.values())) for i, row in enumerate(rows)]
        serve = serve_row(s, later.get("pytest", 0)) if "serve" in later else None
        tests = pytest_row(s) if "pytest" in later else None
    table = markdown(s, results, serve, tests)
    print(table)
    (s.out / "gpu_suite.md").write_text(table + "\n")
    summary = {"device": s.device, "tiny": s.tiny, "budget_s": s.budget, "wall_s": round(s.elapsed(), 1),
               "data": str(s.data), "rows": results, "serve": serve, "pytest": tests,
               "failures": s.failures}  # fmt: skip
    (s.out / "gpu_suite.json").write_text(json.dumps(summary, indent=1))
    for failure in s.failures:
        print(f"FAILED {failure}", file=sys.stderr)
    return 1 if s.failures else 0


def row_cost(s: Suite, row: Row, steps: int) -> float:
    """Expected seconds of a row's two processes at `steps` steps."""
    fixed, per_step = TINY_COSTS["row"] if s.tiny else row.cost
    return fixed + per_step * steps


def make_models(s: Suite, shapes: list[str], rest: float) -> bool:
    """The models (in a process of their own on a GPU: the suite's process never holds GPU memory) and the
    device's memory and matmul peak, into s.device and s.models."""
    spec = {"tiny": s.tiny, "shapes": shapes, "folder": str(s.work / "models"), "tokenizer": s.tokenizer}
    if s.tiny:  # on the CPU: a process less (about 7 s on two cores)
        made = prepare(spec)
    else:
        path = s.work / "prepare.json"
        path.write_text(json.dumps(spec))
        cost = COSTS["prepare"]
        rc, out, _ = spawn([sys.executable, __file__, "--_prepare", str(path)], s, "prepare", s.limit(cost, rest))
        if rc != 0:
            print(f"error: making the models failed: {last_error(s, 'prepare', rc)}", file=sys.stderr)
            return False
        made = json.loads(out.strip().splitlines()[-1])
    s.device, s.models = made["device"], made["models"]
    return True


def prepare(spec: dict) -> dict:
    """Random weights of the reference shapes with the alias's tokenizer, saved; and this device, measured."""
    import platform

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from lorakit import model, plan

    device = "cpu" if spec["tiny"] else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit(f"no CUDA GPU here (torch {torch.__version__}); --tiny runs the suite on the CPU")
    path = spec["tokenizer"]
    tok = model.with_pad(AutoTokenizer.from_pretrained(path)) if path else model.load_tokenizer(ALIAS)
    models = {}
    for shape in spec["shapes"]:
        raw = {k: v for k, v in plan._reference(SHAPES[shape]).items() if k not in ("_name_or_path", "torch_dtype")}
        kind = raw.pop("model_type")
        raw |= {"vocab_size": len(tok), "pad_token_id": tok.pad_token_id, "bos_token_id": tok.bos_token_id,
                "eos_token_id": tok.eos_token_id}  # fmt: skip
        if spec["tiny"]:
            raw |= TINY_SIZES | ({"query_pre_attn_scalar": 16} if kind == "gemma2" else {})
        folder = Path(spec["folder"]) / shape
        with torch.device(device):  # random weights made where they run: a 7B in seconds on a GPU
            net = AutoModelForCausalLM.from_config(AutoConfig.for_model(kind, **raw),
                                                   dtype=torch.float32 if spec["tiny"] else torch.bfloat16)  # fmt: skip
        net.save_pretrained(folder)
        tok.save_pretrained(folder)
        models[shape] = str(folder)
        del net
    memory, flops = plan.this_device(device, seconds=0.5)
    name = torch.cuda.get_device_name(0) if device == "cuda" else f"CPU ({platform.machine()})"
    return {"models": models, "device": {"kind": device, "name": name, "torch": torch.__version__,
                                         "memory_bytes": memory, "matmul_flops": flops}}  # fmt: skip


def train_row(s: Suite, row: Row, rows_after: list[Row], later: float) -> dict:
    """lorakit, then TRL, on one workload, at the most steps at which it and the rows after it fit the time left;
    the plan's prediction for lorakit's config."""
    steps = s.steps
    while steps > MIN_STEPS and sum(row_cost(s, r, steps) for r in [row, *rows_after]) + later > s.left():
        steps -= 1
    out = {"row": row.name, "title": row.title, "steps": steps, "of_steps": s.steps, "systems": {}}
    half, after = row_cost(s, row, steps) / 2, sum(row_cost(s, r, steps) for r in rows_after) + later
    for system in ("lorakit", "trl"):
        if system == "trl" and importlib.util.find_spec("trl") is None:
            out["systems"]["trl"] = {"error": "TRL not installed (pip install -e '.[bench]')"}
            continue
        limit = s.limit(half, after + (half if system == "lorakit" else 0))
        got = run_child(s, f"{row.name}-{system}", system, run_body(s, row, system, steps), limit)
        if system == "lorakit":
            problem = got.get("error") or check(got, steps)
            if problem:
                got["error"] = problem
                s.failures.append(f"{row.name} lorakit: {problem}")
        out["systems"][system] = got
    return out


def run_body(s: Suite, row: Row, system: str, steps: int) -> dict:
    """The run config of `system` on `row`: the recipe's (or train_vs_peers' packed setting's) keys, the row's, and
    this suite's: its model, data file, steps, folders, no eval and no checkpoints."""
    from lorakit import config

    base = (config.load(ROOT / row.recipe).model_dump(mode="json") if row.recipe
            else peers.run_config("packed", steps, s.work))  # fmt: skip
    keys = config.merged(config.merged(row.keys, TINY_ROWS), row.tiny) if s.tiny else row.keys
    ours = {"model": s.models[row.shape], "output_dir": str(s.work / f"{row.name}-{system}"),
            "data": {"train": str(s.data / row.data), "eval": None, "cache_dir": str(s.work / "tokenized")},
            "train": {"max_steps": steps, "save_every": None, "eval_every": None, "log_every": 1}}  # fmt: skip
    return config.merged(config.merged(base, keys), ours)


def predict(cfg, device: dict) -> dict:
    """`lorakit plan` for a run config on this device (its memory and the matmul peak measured before the runs)."""
    from lorakit import plan

    here = plan.Device(device["kind"], device["memory_bytes"], device["matmul_flops"])
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
    cost = (TINY_COSTS if s.tiny else COSTS)["serve"]
    rc, out, peak = spawn(cmd, s, "serve", s.limit(cost, rest))
    got: dict = dict(size)
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
    rc, out, _ = spawn(cmd, s, "pytest", s.limit(COSTS["pytest"], 0))
    summary = re.findall(r"^=* ?(\d+ (?:passed|failed|skipped|errors?|deselected).*?) ?=*$", out, re.MULTILINE)
    got = {"files": [str(Path(f).relative_to(ROOT)) for f in files], "summary": summary[-1] if summary else "",
           "returncode": rc}  # fmt: skip
    if rc != 0:
        got["error"] = got["summary"] or last_error(s, "pytest", rc)
        s.failures.append(f"pytest -m gpu: {got['error']}")
    return got


# --- processes ---------------------------------------------------------------------------------------------


def run_child(s: Suite, name: str, system: str, body: dict, limit: float) -> dict:
    """One system's run in its own process: its numbers, peak memory and versions, or its error."""
    spec = s.work / f"{name}.json"
    spec.write_text(json.dumps({"config": body, "device": s.device, "liger": s.liger}))
    rc, out, peak = spawn([sys.executable, __file__, "--_run", system, str(spec)], s, name, limit)
    if rc != 0:
        return {"error": last_error(s, name, rc)}
    try:
        got = json.loads(out.strip().splitlines()[-1])
    except (IndexError, ValueError):
        return {"error": f"no result on its last line of output (logs/{name}.log)"}
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
        return "stopped at its share of the time budget"
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
                                                               run["step_end_s"])}  # fmt: skip
        try:
            got["plan"] = predict(cfg, spec["device"])
        except Exception as e:  # noqa: BLE001 - whatever breaks the prediction, the run's numbers still count
            got["plan_error"] = f"{type(e).__name__}: {e}"
    else:
        run, versions = one_trl(cfg, spec["liger"])
        got = {"losses": run["losses"], "tokens_per_s": speed(run["step_tokens"], run["step_end_s"]), **versions}
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


def one_trl(cfg, liger: bool) -> tuple[dict, dict]:
    """train_vs_peers.one_trl as it is, given this run's device, precision, optimizer, checkpointing and method.

    one_trl is the CPU comparison's (fp32, no checkpointing, AdamW, LoRA); its seams, replaced here in this
    process that runs it once: the model loads as lorakit's does (on a GPU bf16, 4-bit for qlora, fp32 master
    weights for full), SFTConfig takes bf16 autocast, the run's optimizer and checkpointing, and liger-kernel's
    kernels when `liger`; the trainer drops the LoRA config for full fine-tuning and syncs CUDA before its step clock.
    """
    import peft
    import torch
    import trl
    from transformers import TrainerCallback

    from lorakit import model

    gpu, t = torch.cuda.is_available(), cfg.train
    dtype = torch.bfloat16 if gpu and cfg.method != "full" else torch.float32
    load = {"dtype": dtype, "device": "cuda" if gpu else "cpu"}
    if cfg.method == "qlora":
        load |= {"quantization": "4bit", "compute_dtype": torch.bfloat16 if gpu else torch.float32}
    optim = "adamw_torch_fused" if gpu and t.optimizer == "adamw" else OPTIM[t.optimizer]  # lorakit's fused on GPUs
    ours = {"use_cpu": not gpu, "bf16": gpu, "gradient_checkpointing": t.gradient_checkpointing, "optim": optim,
            "use_liger_kernel": gpu and liger}  # fmt: skip
    real_load, real_config, real_trainer = model.load_model, trl.SFTConfig, trl.SFTTrainer

    class Sync(TrainerCallback):  # first of the callbacks: one_trl's clock then reads a finished step
        def on_step_end(self, *a, **k):
            if gpu:
                torch.cuda.synchronize()

    lora = cfg.method != "full"
    versions = {"trl": trl.__version__, "peft": peft.__version__ if lora else None, "liger": gpu and liger}

    class Peer(real_trainer):
        def __init__(self, *a, peft_config=None, **kw):
            super().__init__(*a, peft_config=peft_config if lora else None, **kw)
            self.callback_handler.callbacks.insert(0, Sync())
            versions["trained_params"] = sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    model.load_model = lambda name, **kw: real_load(name, **load)
    trl.SFTConfig = lambda **kw: real_config(**(kw | ours))
    trl.SFTTrainer = Peer
    return peers.one_trl(cfg), versions


# --- the table ---------------------------------------------------------------------------------------------


def markdown(s: Suite, results: list[dict], serve: dict | None, tests: dict | None) -> str:
    d = s.device
    matmul = f"{'bf16' if d['kind'] == 'cuda' else 'fp32'} matmul {d['matmul_flops'] / 1e12:.1f} TFLOP/s measured"
    lines = [
        f"**gpu_suite{' --tiny' if s.tiny else ''}** on {d['name']} ({d['memory_bytes'] / MIB:,.0f} MiB, {matmul}), "
        f"torch {d['torch']}; {s.elapsed():.0f} s of a {s.budget:.0f} s budget; random weights of the reference "
        f"shapes{TINY_WORDS if s.tiny else ''} with the alias's tokenizer; data from {s.data}",
        "",
        "| workload | system | steps | tokens/s (steps 2..N) | peak memory | loss first → last | lorakit plan "
        "(error) | notes |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        steps = f"{r['steps']}" + (f" of {r['of_steps']} (time budget)" if r["steps"] < r["of_steps"] else "")
        lk, trl = r["systems"]["lorakit"], r["systems"]["trl"]
        lines.append(cells(r["title"], "lorakit", steps, lk, planned(lk), lk.get("error", "")))
        name = " + ".join(x for x in (f"TRL {trl.get('trl', '')}".strip(), trl.get("peft") and f"PEFT {trl['peft']}",
                                      trl.get("liger") and "liger") if x)  # fmt: skip
        lines.append(cells("", name, steps, trl, "", trl.get("error") or versus(lk, trl)))
    if serve is not None:
        if "error" in serve:
            note = serve["error"]
        else:
            rates = ", ".join(f"{m.replace('_', ' ')} {v:.2f}" for m, v in serve["requests_per_s"].items())
            note = f"requests/s: {rates}; same answers in the adapter modes: {'yes' if serve['same_answers'] else 'no'}"
        what = f"{serve['requests']} requests x {serve['max_tokens']} tokens, {serve['concurrency']} clients"
        title = f"serving the 1B, {serve['distinct_adapters']} adapters"
        lines.append(cells(title, "lorakit", what, serve, "", note))
    if tests is not None:
        note = tests.get("skipped") or tests.get("error") or tests["summary"]
        lines.append(f"| pytest -m gpu | lorakit | | | | | | {escape(note)} |")
    return "\n".join(lines)


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
    pip = [python, "-m", "pip", "install", "--no-index", "--find-links", str(wheels),
           "-e", f"{ROOT}[qlora,serve,bench]", *(["liger-kernel"] if liger else [])]  # fmt: skip
    log = out / "logs" / "install.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    print(f"installing from {wheels} into {env} (log: {log}): {' '.join(map(str, pip[1:]))}", file=sys.stderr)
    done = subprocess.run(pip, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log.write_text(done.stdout)
    if done.returncode != 0:
        lines = [line for line in done.stdout.splitlines() if line.startswith("ERROR")]
        print("\n".join(lines) + f"\nerror: the bundle {wheels} lacks that; see --make-bundle", file=sys.stderr)
        return
    print(done.stdout.splitlines()[-1], file=sys.stderr, flush=True)  # pip's "Successfully installed ..."
    os.environ["GPU_SUITE_STARTED"] = str(started)  # the budget counts the install too
    os.execv(python, [str(python), *sys.argv])  # the same options: there, --wheels only finds the tokenizer and data


def make_bundle(folder: Path) -> int:
    """--make-bundle: the wheels of BUNDLE at the versions installed here (the latest where not installed), for
    Python 3.12 on x86-64 Linux; rouge-score's built here; the alias's tokenizer and the data files."""
    from lorakit import model

    def pinned(name: str) -> str:
        try:
            return f"{name}=={importlib.metadata.version(name)}"
        except importlib.metadata.PackageNotFoundError:
            return name

    pip = [sys.executable, "-m", "pip"]
    platforms = [x for p in ("manylinux_2_28_x86_64", "manylinux_2_24_x86_64", "manylinux2014_x86_64")
                 for x in ("--platform", p)]  # fmt: skip
    subprocess.run([*pip, "download", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
                    "--implementation", "cp", *platforms, "-d", str(folder), *map(pinned, BUNDLE)],
                   check=True)  # fmt: skip
    subprocess.run([*pip, "wheel", "--no-deps", "-w", str(folder), pinned("rouge-score")], check=True)
    model.load_tokenizer(ALIAS).save_pretrained(folder / "tokenizer")
    for name in BUNDLE_DATA:
        (folder / "data" / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(peers.DATA / name, folder / "data" / name)
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    print(f"{folder}: {size / 1e6:.1f} MB; on the GPU machine: python3 bench/gpu_suite.py --wheels {folder} --out OUT")
    return 0


if __name__ == "__main__":
    sys.exit(main())
