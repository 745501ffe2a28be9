"""`lorakit export`: a merged model as GGUF (llama.cpp, Ollama), or the vLLM command that serves adapters.

The GGUF is written with the `gguf` package's writer the way llama.cpp's converter lays it out
(tensor names, q/k rotary permutation, tokenizer metadata), then read back with transformers and
checked logit for logit against the source model before it is renamed into place.
"""

from __future__ import annotations

import json
import os
import shlex
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lorakit.errors import LorakitError

SUPPORTED = ("llama",)  # llama-family layouts: Llama, SmolLM, Mistral-without-sliding-window
VLLM_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)
VLLM_TARGETS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "qkv_proj",
                "gate_up_proj", "embed_tokens", "lm_head"}
GGUF_TOLERANCE = {"f32": 1e-4, "f16": 0.01}  # × max |logit|, as in merge.py
LAYER_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
               "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def rope_permute(t: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp interleaves the two rotary halves of q and k rows; transformers undoes it on load."""
    return t.reshape(heads, 2, t.shape[0] // heads // 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)


def write_gguf(model: Any, tokenizer: Any, path: Path, outtype: str = "f32", pre: str = "default") -> None:
    """Write a llama-family HF model and its BPE tokenizer as one GGUF file."""
    import gguf

    cfg = model.config
    if cfg.model_type not in SUPPORTED:
        raise LorakitError(f"export --format gguf supports {', '.join(SUPPORTED)} models, not "
                           f"'{cfg.model_type}'; use llama.cpp's convert_hf_to_gguf.py on the merged folder")
    w = gguf.GGUFWriter(str(path), "llama")
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_rope_dimension_count(head_dim)
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(gguf.LlamaFileType.ALL_F32 if outtype == "f32" else gguf.LlamaFileType.MOSTLY_F16)
    _write_tokenizer(w, tokenizer, cfg.vocab_size, pre)
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
    backend = json.loads(tok.backend_tokenizer.to_str())
    if backend["model"]["type"] != "BPE":
        raise LorakitError("export --format gguf supports byte-level BPE tokenizers (GPT-2 style) only")
    tokens = [tok.convert_ids_to_tokens(i) or f"[PAD{i}]" for i in range(vocab_size)]
    special = set(tok.all_special_tokens) | {t.content for t in tok.added_tokens_decoder.values() if t.special}
    merges = [m if isinstance(m, str) else " ".join(m) for m in backend["model"]["merges"]]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types([3 if t in special else 1 for t in tokens])  # 3 = control, 1 = normal
    w.add_token_merges(merges)
    for setter, value in ((w.add_bos_token_id, tok.bos_token_id), (w.add_eos_token_id, tok.eos_token_id),
                          (w.add_pad_token_id, tok.pad_token_id), (w.add_unk_token_id, tok.unk_token_id)):
        if value is not None:
            setter(value)
    w.add_add_bos_token(bool(getattr(tok, "add_bos_token", False)))
    if tok.chat_template:
        w.add_chat_template(tok.chat_template)


def export_gguf(model_dir: str | Path, out: str | Path, outtype: str = "f32", pre: str | None = None) -> dict:
    """GGUF of a merged model folder plus an Ollama Modelfile; checks logits after reading it back."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir, out = Path(model_dir), Path(out)
    if not (model_dir / "config.json").is_file():
        raise LorakitError(f"{model_dir}: not a model folder (no config.json). Export a merged model: "
                           f"`lorakit merge ADAPTER {model_dir}` first, or pass a run/adapter folder (it is merged for you)")
    if outtype not in GGUF_TOLERANCE:
        raise LorakitError(f"--outtype {outtype}: use one of {', '.join(GGUF_TOLERANCE)}")
    out.mkdir(parents=True, exist_ok=True)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    name = f"{model_dir.name}.{outtype}.gguf"
    tmp = out / f".{name}.tmp"
    write_gguf(model, tokenizer, tmp, outtype, pre or _guess_pre(model))
    try:
        check = gguf_parity(model, tokenizer, tmp, outtype)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, out / name)
    (out / "Modelfile").write_text(modelfile(name, tokenizer, model.generation_config))
    return {"gguf": str(out / name), "modelfile": str(out / "Modelfile"), **check}


def _guess_pre(model: Any) -> str:
    # llama.cpp picks its pre-tokenizer regex by name; SmolLM2 has its own entry.
    name = str(getattr(model.config, "_name_or_path", "")).lower()
    return "smollm" if "smollm" in name else "default"


def gguf_parity(model: Any, tokenizer: Any, path: Path, outtype: str) -> dict:
    """Load the GGUF with transformers (dequantized) and compare logits with the source model."""
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([tokenizer("The quick brown fox jumps over the lazy dog. SELECT name FROM t;",
                                  add_special_tokens=False)["input_ids"]])
    back = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    with torch.no_grad():
        want, got = model(input_ids=ids).logits, back(input_ids=ids).logits
    diff = (want - got).abs().max().item()
    tol = GGUF_TOLERANCE[outtype] * max(want.abs().max().item(), 1.0)
    if diff > tol:
        raise LorakitError(f"GGUF round trip FAILED: max |logit diff| {diff:.4g} > tolerance {tol:.4g}; nothing written")
    return {"max_abs_logit_diff": diff, "tolerance": tol, "positions": int(ids.numel())}


def _resolve(base: str) -> Any:
    from lorakit import model

    try:
        return model.resolve(base)
    except LorakitError:
        return None


def modelfile(gguf_name: str, tokenizer: Any, generation_config: Any) -> str:
    """An Ollama Modelfile whose TEMPLATE and stops match the chat template the model was trained with."""
    template = tokenizer.chat_template or ""
    if "<|im_start|>" not in template:
        raise LorakitError("Modelfile: only ChatML chat templates are translated to Ollama's TEMPLATE so far; "
                           "write the TEMPLATE by hand for this template")
    eos = generation_config.eos_token_id
    stops = {tokenizer.convert_ids_to_tokens(i) for i in (eos if isinstance(eos, list) else [eos]) if i is not None}
    stops |= {"<|im_end|>", "<|im_start|>"}
    go_template = ('{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}'
                   '{{ if .Prompt }}<|im_start|>user\n{{ .Prompt }}<|im_end|>\n{{ end }}'
                   '<|im_start|>assistant\n{{ .Response }}<|im_end|>\n')
    lines = [f"FROM ./{gguf_name}", f'TEMPLATE """{go_template}"""']
    lines += [f'PARAMETER stop "{s}"' for s in sorted(stops)]
    return "\n".join(lines) + "\n"


def vllm_command(base: str, adapters: dict[str, Path], port: int = 8000) -> str:
    """The `vllm serve` line for a base and its adapters; refuses shapes vLLM's LoRA kernels reject."""
    ranks, problems = [], []
    for name, path in adapters.items():
        meta = json.loads((Path(path) / "adapter_config.json").read_text())
        r = int(meta["r"])
        ranks.append(r)
        if r not in VLLM_RANKS:
            problems.append(f"{name}: rank {r} is not one vLLM accepts ({', '.join(map(str, VLLM_RANKS))})")
        targets = meta.get("target_modules") or []
        targets = [targets] if isinstance(targets, str) else targets
        # peft may store full module paths (model.layers.0.self_attn.q_proj); vLLM matches the last part.
        bad = sorted({t.split(".")[-1] for t in targets} - VLLM_TARGETS) if "all-linear" not in targets else []
        if bad:
            problems.append(f"{name}: target modules {bad} are not supported by vLLM LoRA")
        if meta.get("use_dora"):
            problems.append(f"{name}: DoRA adapters are not supported by vLLM; merge it (lorakit merge) instead")
    if problems:
        raise LorakitError("vLLM cannot serve these adapters as they are:\n  " + "\n  ".join(problems))
    resolved = _resolve(base)
    if resolved is not None and resolved.kind in ("alias", "folder"):
        base = str(Path(resolved.path).resolve())  # vLLM knows hub ids and folders, not lorakit's aliases
    modules = " ".join(f"{shlex.quote(n)}={shlex.quote(str(Path(p).resolve()))}" for n, p in adapters.items())
    return (f"vllm serve {shlex.quote(base)} --enable-lora --lora-modules {modules} "
            f"--max-lora-rank {max(ranks)} --max-loras {len(adapters)} --port {port}")
