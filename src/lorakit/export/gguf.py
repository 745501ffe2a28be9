"""GGUF (llama.cpp, Ollama): a merged model converted by llama.cpp's own converter, proven in llama.cpp.

llama.cpp's convert_hf_to_gguf.py (from the llama-cpp-python release lorakit pins: llamacpp.py) writes
the file, so every architecture llama.cpp supports converts (Llama incl. 3.x rope scaling, Gemma 1-3,
Qwen2, Bloom, ...); q4_k_m comes from llama.cpp's quantizer. The file is then loaded by llama.cpp and
proven against the merged model (proof.py) before it is renamed into place. Beside it: the Ollama
Modelfile (ollama.py, its TEMPLATE rendered and compared with the chat template) and a model card.
"""

from __future__ import annotations

import difflib
import json
import time
from pathlib import Path
from typing import Any

import torch

from lorakit import card, files, parity
from lorakit.adapter import base_of
from lorakit.errors import LorakitError
from lorakit.export import llamacpp, ollama, proof
from lorakit.model import pick_device
from lorakit.run_folder import EXPORT_MARKER, check_finished, locate

OUTTYPES = ("f32", "f16", "bf16", "q8_0", "q4_k_m")
# The pre-tokenizer names llama.cpp accepts (its src/llama-vocab.cpp, as vendored by llama-cpp-python 0.3.36);
# any other name makes llama.cpp refuse to load the file.
# fmt: off
LLAMA_CPP_PRE_TOKENIZERS = frozenset({
    "a.x-4.0", "afmoe", "bailingmoe", "bailingmoe2", "bloom", "chameleon", "chatglm-bpe", "codeshell", "cohere2moe",
    "command-r", "dbrx", "deepseek-coder", "deepseek-llm", "deepseek-r1-qwen", "deepseek-v3", "default", "exaone",
    "exaone-moe", "exaone4", "f2llmv2", "falcon", "falcon-h1", "falcon3", "gemma4", "gigachat", "glm4", "glm5",
    "gpt-2", "gpt-4o", "gpt3-finnish", "granite-docling", "granite-embed-multi-311m", "granite-embed-multi-97m",
    "grok-2", "hunyuan", "hunyuan-dense", "hy_v4", "jais", "jais-2", "jina-de", "jina-es", "jina-v1-en",
    "jina-v2-code", "jina-v2-de", "jina-v2-es", "jina-v5-nano", "joyai-llm", "kanana2", "kimi-k2", "kormo",
    "laguna", "lfm2", "llada-moe", "llama-bpe", "llama-v3", "llama3", "llama4", "megrez", "mellum", "mellum2",
    "midm-2.0", "minerva-7b", "minicpm5", "minimax-m2", "modern-bert", "mpt", "olmo", "phi-2", "pixtral",
    "poro-chat", "qwen2", "qwen35", "refact", "roberta-bpe", "sarvam-moe", "seed-coder", "smaug-bpe", "smollm",
    "solar-open", "spark2_5", "stablelm2", "starcoder", "superbpe", "talkie", "tekken", "tiny_aya", "trillion",
    "ufakzeka", "viking", "whitespace", "youtu",
})
# fmt: on


def export(
    source: str,
    out: str | Path,
    outtype: str = "f16",
    pre: str | None = None,
    base: str | None = None,
    force: bool = False,
    device: str = "auto",
    check: bool = True,
    overwrite: bool = False,
) -> dict:
    """`export --format gguf`: SOURCE is a model folder, or a run/adapter folder merged (fp32) into OUT/merged first.

    OUT must be new or empty, or with `overwrite` an earlier export (`claim`); only its own files are replaced.
    device: where the merge computes ("auto": the GPU when there is one); llama.cpp's proof runs on the CPU.
    """
    from lorakit import merge

    llamacpp.version()  # a missing llama.cpp is said before any work, the merge included
    check_options(outtype, pre)
    out = Path(out)
    found = locate(source)
    if found is None:
        check_finished(source)
        model_dir = plain_model(source)
    elif found.kind == "model":  # a model folder, or a full fine-tune's run folder
        model_dir = found.path
    else:
        model_dir = out / "merged"
        if model_dir.resolve() in (found.path.resolve(), *found.path.resolve().parents):
            raise LorakitError(f"{source} lies in {model_dir}, which the merge replaces; move it out of {out} first")
    run_cfg = found.run_config() if found is not None else None
    claim(out, overwrite)
    mark(out, source, outtype)
    merged = None
    if found is not None and found.kind == "adapter":
        # fp32: the GGUF's own --outtype decides the precision; rounding twice would only add error.
        merged = merge.merge(source, model_dir, base=base, dtype="fp32", force=force, device=device, replace=True)
    chats, chats_from = parity.prompts(run_cfg)
    result = export_model(model_dir, out, outtype=outtype, pre=pre, check=check, chats=chats, device=device)
    if found is not None and found.kind == "adapter":
        base_name = base_of(found, base)
    elif run_cfg is not None:  # a full fine-tune's run
        base_name = run_cfg.model
    else:
        base_name = card.recorded_base(model_dir) or str(source)
    checked = proof.table(result) if result["ok"] is not None else "Not checked (--no-check)."
    extra = (
        f"## GGUF check in llama.cpp\n\n`{Path(result['gguf']).name}` ({result['bytes'] / 2**20:.1f} MiB), "
        f"checked on {chats_from} prompts; top-1 agreement {result.get('agreement', 0):.1%}:\n\n{checked}\n"
    )
    card.write(out, "gguf", base_name, found.run if found is not None else None, extra)
    mark(out, source, outtype, gguf=Path(result["gguf"]).name, checked=result["ok"] is not None)
    return {**result, "merged": merged, "prompts": chats_from}


def plain_model(source: str) -> Path:
    """The folder of a model named by path or alias (no adapter to merge)."""
    from lorakit import model

    where = model.resolve(source)
    if where.kind not in ("alias", "folder"):
        raise LorakitError(
            f"{source}: export a model folder, a run folder or an adapter folder "
            "(a GGUF or hub model needs no lorakit export)"
        )
    return Path(where.path)


def claim(out: Path, overwrite: bool, writes: str = "its GGUF, Modelfile, README.md and loss.png") -> None:
    """Take OUT for this export before any work: a new or empty folder, or with `overwrite` an earlier export.

    An export writes README.md, Modelfile and loss.png (vllm: serve.sh), names a user's project folder may hold too;
    so a folder holding anything is refused, and --overwrite accepts only one holding EXPORT_MARKER (train's rule,
    `files.why_not_deletable`). Even then only the files export writes are replaced; nothing is deleted.
    """
    if out.exists() and not out.is_dir():
        raise LorakitError(f"{out} is a file; give a folder (new or empty) as OUT")
    # A folder holding only the marker is one an export claimed and then failed in (a merge's parity, say).
    if out.is_dir() and any(p.name != EXPORT_MARKER for p in out.iterdir()):
        if not overwrite:
            earlier = " (an earlier lorakit export)" if (out / EXPORT_MARKER).is_file() else ""
            raise LorakitError(
                f"{out} is not empty{earlier}: export writes {writes} into a new or empty folder. Choose another "
                "OUT, or pass --overwrite to replace the files of an earlier export"
            )
        if why := files.why_not_deletable(out, EXPORT_MARKER):
            raise LorakitError(
                f"--overwrite: {out} {why}; lorakit only replaces the files of its own exports (a folder holding "
                f"{EXPORT_MARKER}). Choose a new or empty OUT"
            )


def mark(out: Path, source: str, outtype: str | None, **result: Any) -> None:
    """Write EXPORT_MARKER: what was exported into OUT, and the mark that lets --overwrite write there again."""
    where = str(Path(source).resolve()) if Path(source).exists() else source  # a folder, or the alias
    files.write_json(out / EXPORT_MARKER, {"source": where, "outtype": outtype, **result})


def check_options(outtype: str, pre: str | None) -> None:
    """Refuse an --outtype or --pre llama.cpp would not take, before any work."""
    if outtype not in OUTTYPES:
        raise LorakitError(f"--outtype {outtype}: use one of {', '.join(OUTTYPES)}")
    if pre is not None and pre not in LLAMA_CPP_PRE_TOKENIZERS:
        close = difflib.get_close_matches(pre, LLAMA_CPP_PRE_TOKENIZERS, n=3)
        raise LorakitError(
            f"--pre {pre!r} is not a pre-tokenizer llama.cpp knows, so it would refuse the file"
            + (f"; did you mean {', '.join(close)}?" if close else "")
            + " Leave --pre out to have it guessed from the tokenizer."
        )


def export_model(
    model_dir: str | Path,
    out: str | Path,
    outtype: str = "f16",
    pre: str | None = None,
    check: bool = True,
    chats: list[list[dict]] | None = None,
    device: str = "auto",
) -> dict:
    """GGUF of a model folder plus an Ollama Modelfile; kept only if llama.cpp proves it (unless not `check`).

    device: where the model's own (fp32) answers are computed for the proof; llama.cpp runs on the CPU.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    model_dir, out = Path(model_dir), Path(out)
    if not (model_dir / "config.json").is_file():
        raise LorakitError(
            f"{model_dir}: not a model folder (no config.json). Export a merged model: "
            f"`lorakit merge ADAPTER {model_dir}` first, or pass a run/adapter folder (it is merged for you)"
        )
    check_options(outtype, pre)
    llamacpp.version()  # a missing llama.cpp is said before any work
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    cfg = AutoConfig.from_pretrained(model_dir)
    try:
        generation = GenerationConfig.from_pretrained(model_dir)
    except OSError:
        generation = GenerationConfig.from_model_config(cfg)
    name = f"{model_dir.name}.{outtype}.gguf"
    text, warning = ollama.modelfile(name, tokenizer, generation)
    started = time.perf_counter()
    with files.atomic_file(out / name) as tmp:  # kept only if it passes the proof
        fallback = guess_pre(tokenizer, cfg)
        if outtype in llamacpp.CONVERTER_TYPES:
            log = llamacpp.convert(model_dir, tmp, outtype, pre, fallback)
        else:  # quantized by llama.cpp from an f32 file: one rounding only
            wide = tmp.with_name(tmp.name + ".f32")
            try:
                log = llamacpp.convert(model_dir, wide, "f32", pre, fallback)
                llamacpp.quantize(wide, tmp, outtype)
            finally:
                wide.unlink(missing_ok=True)
        export_s = time.perf_counter() - started
        result: dict[str, Any] = {"ok": None, "rows": [], "problems": []}
        if check:
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(pick_device(device)).eval()
            result = proof.prove(tmp, model, tokenizer, outtype, chats or parity.BUILT_IN)
            proof.require(result, out / name)
        size = tmp.stat().st_size
    files.write_text(out / "Modelfile", text)
    return {
        "gguf": str(out / name),
        "outtype": outtype,
        "bytes": size,
        "export_s": round(export_s, 2),
        "check_s": round(time.perf_counter() - started - export_s, 2),
        "pre_tokenizer": "guessed by lorakit" if "lorakit: pre-tokenizer" in log else "llama.cpp's",
        "modelfile": str(out / "Modelfile"),
        "modelfile_warning": warning,
        **result,
    }


def guess_pre(tokenizer: Any, cfg: Any) -> str:
    """llama.cpp picks the regex that splits text before BPE by this name; name the one the tokenizer uses."""
    pre = json.loads(tokenizer.backend_tokenizer.to_str()).get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers") or [pre]
    names = f"{tokenizer.name_or_path} {getattr(cfg, '_name_or_path', '')} {getattr(cfg, '_model_name_or_path', '')}"
    # SmolLM splits digits one by one. A copy converted from GGUF by transformers lost that split,
    # but keeps the model's name (its merges never join digits, so the ids agree either way).
    if "smollm" in names.lower() or any(p.get("type") == "Digits" and p.get("individual_digits") for p in parts):
        return "smollm"
    split = next((p["pattern"].get("Regex") for p in parts if p.get("type") == "Split"), None)
    try:  # the split regexes transformers maps GGUF pre-tokenizer names to (llama-bpe, qwen2, ...)
        from transformers.integrations.gguf.gguf_tokenizer_mapping import (
            GGUF_PRE_TOKENIZER_SPLITS,
        )
    except ImportError:
        GGUF_PRE_TOKENIZER_SPLITS = {}
    known = next((name for name, regex in GGUF_PRE_TOKENIZER_SPLITS.items() if regex == split), None)
    if known:
        return known
    return "gpt-2" if [p.get("type") for p in parts] == ["ByteLevel"] else "default"
