"""GGUF (llama.cpp, Ollama): a merged model written as one .gguf file, proven by reading it back.

The file is written with the `gguf` package's writer the way llama.cpp's converter lays it out (tensor
names, q/k rotary permutation, tokenizer metadata), then read back with transformers and checked token
for token and logit for logit against the source model before it is renamed into place. The Ollama
Modelfile (ollama.py) is written beside it.
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lorakit import files, parity
from lorakit.errors import LorakitError
from lorakit.export import ollama
from lorakit.model import pick_device
from lorakit.render import special_ids
from lorakit.run_folder import locate

SUPPORTED = ("llama",)  # llama-family layouts: Llama 1-3.0, SmolLM 1/2, TinyLlama
OUTTYPES = {"f32": "fp32", "f16": "fp16"}  # --outtype -> the dtype whose parity tolerance applies
LAYER_NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}
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
ROUND_TRIP_TEXT = "The quick brown fox jumps over the lazy dog. SELECT name FROM t WHERE id = 1234;"


def export(
    source: str,
    out: str | Path,
    outtype: str = "f16",
    pre: str | None = None,
    base: str | None = None,
    force: bool = False,
    device: str = "auto",
) -> dict:
    """`export --format gguf`: SOURCE is a model folder, or a run/adapter folder merged (fp32) into OUT/merged first.

    device: where the merge and the read-back check compute ("auto": the GPU when there is one).
    """
    from lorakit import merge, model

    out = Path(out)
    merged = None
    found = locate(source)
    if found is not None and found.kind == "adapter":
        model_dir = out / "merged"
        # fp32: the GGUF's own --outtype decides the precision; rounding twice would only add error.
        merged = merge.merge(source, model_dir, base=base, dtype="fp32", force=force, device=device)
    elif found is not None:  # a model folder, or a full fine-tune's run folder
        model_dir = found.path
    else:
        where = model.resolve(source)
        if where.kind not in ("alias", "folder"):
            raise LorakitError(
                f"{source}: export a model folder, a run folder or an adapter folder "
                "(a GGUF or hub model needs no lorakit export)"
            )
        model_dir = Path(where.path)
    return {**export_model(model_dir, out, outtype=outtype, pre=pre, device=device), "merged": merged}


def export_model(
    model_dir: str | Path, out: str | Path, outtype: str = "f16", pre: str | None = None, device: str = "auto"
) -> dict:
    """GGUF of a model folder plus an Ollama Modelfile; checks logits and tokens after reading it back."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir, out = Path(model_dir), Path(out)
    if not (model_dir / "config.json").is_file():
        raise LorakitError(
            f"{model_dir}: not a model folder (no config.json). Export a merged model: "
            f"`lorakit merge ADAPTER {model_dir}` first, or pass a run/adapter folder (it is merged for you)"
        )
    if outtype not in OUTTYPES:
        raise LorakitError(f"--outtype {outtype}: use one of {', '.join(OUTTYPES)}")
    if pre is not None and pre not in LLAMA_CPP_PRE_TOKENIZERS:
        close = difflib.get_close_matches(pre, LLAMA_CPP_PRE_TOKENIZERS, n=3)
        raise LorakitError(
            f"--pre {pre!r} is not a pre-tokenizer llama.cpp knows, so it would refuse the file"
            + (f"; did you mean {', '.join(close)}?" if close else "")
            + " Leave --pre out to have it guessed from the tokenizer."
        )
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    check_supported(model.config)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    name = f"{model_dir.name}.{outtype}.gguf"
    text, warning = ollama.modelfile(name, tokenizer, model.generation_config)
    with files.atomic_file(out / name) as tmp:  # kept only if it passes the round trip
        write(model, tokenizer, tmp, outtype, pre)
        check = round_trip(model, tokenizer, tmp, outtype, device)
    files.write_text(out / "Modelfile", text)
    return {"gguf": str(out / name), "modelfile": str(out / "Modelfile"), "modelfile_warning": warning, **check}


def rope_permute(t: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp interleaves the two rotary halves of q and k rows; transformers undoes it on load."""
    return t.reshape(heads, 2, t.shape[0] // heads // 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)


def check_supported(cfg: Any) -> None:
    """Refuse what this writer does not lay out, before spending time on it."""
    if cfg.model_type not in SUPPORTED:
        raise LorakitError(
            f"export --format gguf supports {', '.join(SUPPORTED)} models (e.g. SmolLM2, Llama), "
            f"not '{cfg.model_type}'; convert the merged folder with llama.cpp's convert_hf_to_gguf.py"
        )
    rope = getattr(cfg, "rope_parameters", None) or {}
    problems = [f"{k}=True" for k in ("attention_bias", "mlp_bias") if getattr(cfg, k, False)]
    if rope.get("rope_type", "default") != "default":  # llama3/yarn scaling needs extra GGUF keys and tensors
        problems.append(f"rope_type '{rope['rope_type']}'")
    if (getattr(cfg, "head_dim", None) or 0) not in (0, cfg.hidden_size // cfg.num_attention_heads):
        problems.append(f"head_dim {cfg.head_dim} != hidden_size / heads")
    if problems:
        raise LorakitError(
            f"export --format gguf writes plain llama layouts; this model has {', '.join(problems)}. "
            "Convert the merged folder with llama.cpp's convert_hf_to_gguf.py"
        )


def write(model: Any, tokenizer: Any, path: Path, outtype: str = "f32", pre: str | None = None) -> None:
    """Write a llama-family HF model and its byte-level BPE tokenizer as one GGUF file."""
    import gguf

    cfg = model.config
    check_supported(cfg)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name(Path(str(getattr(cfg, "_name_or_path", "") or path.stem)).name)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(gguf.LlamaFileType.ALL_F32 if outtype == "f32" else gguf.LlamaFileType.MOSTLY_F16)
    _write_tokenizer(w, tokenizer, cfg.vocab_size, pre or guess_pre(tokenizer, cfg))
    dtype = np.float32 if outtype == "f32" else np.float16
    for name, tensor in _tensors(model):
        # Norm weights stay f32 as llama.cpp expects; matrices take the output type.
        w.add_tensor(name, tensor.detach().float().numpy().astype(np.float32 if tensor.ndim == 1 else dtype))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _tensors(model: Any) -> list[tuple[str, torch.Tensor]]:
    cfg = model.config
    inner = model.model
    out = [("token_embd.weight", inner.embed_tokens.weight), ("output_norm.weight", inner.norm.weight)]
    if not cfg.tie_word_embeddings:  # tied models reuse token_embd, as llama.cpp does
        out.append(("output.weight", model.lm_head.weight))
    for i, layer in enumerate(inner.layers):
        for hf, gg in LAYER_NAMES.items():
            t = layer.get_submodule(hf).weight
            if hf.endswith("q_proj"):
                t = rope_permute(t, cfg.num_attention_heads)
            elif hf.endswith("k_proj"):
                t = rope_permute(t, cfg.num_key_value_heads)
            out.append((f"blk.{i}.{gg}.weight", t))
    return out


def _write_tokenizer(w: Any, tok: Any, vocab_size: int, pre: str) -> None:
    import gguf

    backend = json.loads(tok.backend_tokenizer.to_str())
    if backend["model"]["type"] != "BPE" or "ByteLevel" not in json.dumps(backend.get("pre_tokenizer")):
        raise LorakitError(
            "export --format gguf supports byte-level BPE tokenizers (GPT-2 style: SmolLM, Llama 3, "
            "Qwen); this one is sentencepiece-like (Llama 2, Mistral): use llama.cpp's convert_hf_to_gguf.py"
        )
    special = {tok.convert_ids_to_tokens(i) for i in special_ids(tok)}
    added = {t.content for t in tok.added_tokens_decoder.values()}
    tokens, types = [], []
    for i in range(vocab_size):
        t = tok.convert_ids_to_tokens(i)
        # Rows past the tokenizer (vocab padded to a multiple of 64) get placeholder names, as in llama.cpp.
        tokens.append(t if t is not None else f"[PAD{i}]")
        kind = (
            gguf.TokenType.UNUSED
            if t is None
            else gguf.TokenType.CONTROL
            if t in special
            else gguf.TokenType.USER_DEFINED
            if t in added
            else gguf.TokenType.NORMAL
        )
        types.append(kind)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in backend["model"]["merges"]])
    for setter, value in (
        (w.add_bos_token_id, tok.bos_token_id),
        (w.add_eos_token_id, tok.eos_token_id),
        (w.add_pad_token_id, tok.pad_token_id),
        (w.add_unk_token_id, tok.unk_token_id),
    ):
        if value is not None:
            setter(value)
    w.add_add_bos_token(bool(getattr(tok, "add_bos_token", False)))
    if tok.chat_template:
        w.add_chat_template(tok.chat_template)


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


def round_trip(model: Any, tokenizer: Any, path: Path, outtype: str, device: str = "auto") -> dict:
    """Load the GGUF with transformers (dequantized) and compare its tokenizer and logits with the source."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    chat = [{"role": "user", "content": "How many employees work in Lisbon? Answer in SQL."}]
    texts = [ROUND_TRIP_TEXT] + (
        [tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)]
        if tokenizer.chat_template
        else []
    )
    back_tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    for t in texts:
        want_ids, got_ids = (k(t, add_special_tokens=False)["input_ids"] for k in (tokenizer, back_tok))
        if want_ids != got_ids:
            raise LorakitError(
                f"GGUF round trip FAILED: the file's tokenizer splits {t[:60]!r} differently "
                f"({got_ids[:12]}... vs {want_ids[:12]}...); nothing written. Try another --pre"
            )
    ids = torch.tensor([tokenizer(texts[-1], add_special_tokens=False)["input_ids"]])
    back = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    device = pick_device(device)  # both models compute there; transformers reads a GGUF on the CPU
    model, back = model.to(device), back.to(device).eval()
    report = parity.compare(
        parity.logits(back, [ids]), parity.logits(model, [ids]), parity.TOLERANCE[OUTTYPES[outtype]]
    )
    parity.require(report, "GGUF round trip FAILED", "Nothing was written.")
    return {**report, "outtype": outtype}
