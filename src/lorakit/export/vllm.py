"""vLLM: the `vllm serve` command line for a base model and its LoRA adapters, once vLLM is known to accept them.

`lorakit export --format vllm` prints it and `lorakit serve --engine vllm` runs it; both build it here, as
an argv list.
"""

from __future__ import annotations

import shlex
from pathlib import Path

from lorakit.adapter import base_of, check_base, read_adapter, trained_with
from lorakit.errors import LorakitError
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
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}  # lorakit's names -> vLLM's --dtype


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


def command(
    base: str,
    adapters: dict[str, Path],
    *,
    port: int = 8000,
    host: str | None = None,
    served_name: str | None = None,
    max_seqs: int | None = None,
    max_model_len: int | None = None,
    dtype: str = "auto",
    max_adapters: int | None = None,
    quantization: str | None = None,
    force: bool = False,
) -> list[str]:
    """`vllm serve BASE [--enable-lora --lora-modules NAME=PATH ...] ...` as argv.

    max_adapters: adapters held in memory (--max-cpu-loras); at most that many are batched at once.
    quantization "4bit" runs the base through bitsandbytes, as lorakit's own server does.
    """
    ranks = check(base, adapters, force)
    cmd = ["vllm", "serve", _model_arg(base)]
    if adapters:
        at_once = min(len(adapters), max_adapters or len(adapters))
        cmd += [
            "--enable-lora",
            "--lora-modules",
            *(f"{n}={Path(p).resolve()}" for n, p in adapters.items()),
            "--max-lora-rank",
            str(max_lora_rank(ranks)),
            "--max-loras",
            str(at_once),
        ]
        if max_adapters:
            cmd += ["--max-cpu-loras", str(max_adapters)]
    cmd += ["--port", str(port)]
    for flag, value in (
        ("--host", host),
        ("--served-model-name", served_name),
        ("--max-num-seqs", max_seqs),
        ("--max-model-len", max_model_len),
    ):
        if value:
            cmd += [flag, str(value)]
    if dtype != "auto":
        cmd += ["--dtype", DTYPES[dtype]]
    if quantization == "4bit":
        cmd += ["--quantization", "bitsandbytes"]
    return cmd


def max_lora_rank(ranks: list[int]) -> int:
    """vLLM's --max-lora-rank for adapters of these ranks: the smallest value it takes that covers them all (a larger
    one reserves more GPU memory for every LoRA slot). The ranks passed `check`: none is above RANKS[-1]."""
    return next(allowed for allowed in RANKS if allowed >= max(ranks))


def _model_arg(base: str) -> str:
    """vLLM knows hub ids and folders, not lorakit's alias: a local model becomes its folder."""
    from lorakit import model

    try:
        resolved = model.resolve(base)
    except LorakitError:
        return base
    return str(Path(resolved.path).resolve()) if resolved.kind in ("alias", "folder") else base


def for_source(
    source: str, adapters: dict[str, str], base: str | None = None, force: bool = False
) -> tuple[list[str], list[str]]:
    """`export --format vllm`: SOURCE is a run/adapter folder (served under its folder's name) or the base.

    Returns the command line and warnings (QLoRA adapters, which vLLM would run on the unquantized base).
    """
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
    dirs, warnings = {}, []
    for name, path in found.items():
        dirs[name] = adapter_source(path).path
        if trained_with(dirs[name]) == "qlora":
            # Measured on SmolLM2: the QLoRA adapter on the unquantized base moves logits by up to 20
            # (of 39) against the 4-bit model it was trained on; top-1 tokens agree only 64% of the time.
            merge = shlex.join(["lorakit", "merge", str(path), "OUT"])
            warnings.append(
                f"{name} was trained with QLoRA on the 4-bit base, and vLLM would run it on the "
                f"unquantized base, where it answers differently. Serve `{merge}` "
                "(merged into the dequantized base) instead, or add --quantization bitsandbytes."
            )
    return command(base, dirs, force=force), warnings + template_warnings(base, dirs)


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
