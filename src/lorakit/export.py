"""`lorakit export`: a merged model as GGUF (llama.cpp, Ollama), or the vLLM command that serves adapters.

The GGUF is written with the `gguf` package's writer the way llama.cpp's converter lays it out
(tensor names, q/k rotary permutation, tokenizer metadata), then read back with transformers and
checked logit for logit (and token for token) against the source model before it is renamed into
place. The Ollama Modelfile beside it is derived from the model's own chat template.
"""

from __future__ import annotations

import json
import os
import shlex
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jinja2.exceptions import TemplateError

from lorakit.run_folder import adapter_source, check_base, find_adapter, locate, read_adapter
from lorakit.errors import LorakitError

SUPPORTED = ("llama",)  # llama-family layouts: Llama 1-3.0, SmolLM 1/2, TinyLlama
VLLM_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)
# Module names vLLM's LoRA layers wrap in llama-family models (it fuses q/k/v and gate/up itself).
VLLM_TARGETS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "qkv_proj",
                "gate_up_proj", "embed_tokens", "lm_head"}
GGUF_TOLERANCE = {"f32": 1e-4, "f16": 0.01}  # × max |logit|, as in merge.py
LAYER_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
               "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
ROUND_TRIP_TEXT = "The quick brown fox jumps over the lazy dog. SELECT name FROM t WHERE id = 1234;"


def rope_permute(t: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp interleaves the two rotary halves of q and k rows; transformers undoes it on load."""
    return t.reshape(heads, 2, t.shape[0] // heads // 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)


def check_supported(cfg: Any) -> None:
    """Refuse what this writer does not lay out, before spending time on it."""
    if cfg.model_type not in SUPPORTED:
        raise LorakitError(f"export --format gguf supports {', '.join(SUPPORTED)} models (e.g. SmolLM2, Llama), "
                           f"not '{cfg.model_type}'; convert the merged folder with llama.cpp's convert_hf_to_gguf.py")
    rope = getattr(cfg, "rope_parameters", None) or {}
    problems = [f"{k}=True" for k in ("attention_bias", "mlp_bias") if getattr(cfg, k, False)]
    if rope.get("rope_type", "default") != "default":  # llama3/yarn scaling needs extra GGUF keys and tensors
        problems.append(f"rope_type '{rope['rope_type']}'")
    if (getattr(cfg, "head_dim", None) or 0) not in (0, cfg.hidden_size // cfg.num_attention_heads):
        problems.append(f"head_dim {cfg.head_dim} != hidden_size / heads")
    if problems:
        raise LorakitError(f"export --format gguf writes plain llama layouts; this model has {', '.join(problems)}. "
                           "Convert the merged folder with llama.cpp's convert_hf_to_gguf.py")


def write_gguf(model: Any, tokenizer: Any, path: Path, outtype: str = "f32", pre: str | None = None) -> None:
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
        raise LorakitError("export --format gguf supports byte-level BPE tokenizers (GPT-2 style: SmolLM, Llama 3, "
                           "Qwen); this one is sentencepiece-like (Llama 2, Mistral): use llama.cpp's convert_hf_to_gguf.py")
    special = set(tok.all_special_tokens) | {t.content for t in tok.added_tokens_decoder.values() if t.special}
    added = {t.content for t in tok.added_tokens_decoder.values()}
    tokens, types = [], []
    for i in range(vocab_size):
        t = tok.convert_ids_to_tokens(i)
        # Rows past the tokenizer (vocab padded to a multiple of 64) get placeholder names, as in llama.cpp.
        tokens.append(t if t is not None else f"[PAD{i}]")
        kind = (gguf.TokenType.UNUSED if t is None else gguf.TokenType.CONTROL if t in special
                else gguf.TokenType.USER_DEFINED if t in added else gguf.TokenType.NORMAL)
        types.append(kind)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in backend["model"]["merges"]])
    for setter, value in ((w.add_bos_token_id, tok.bos_token_id), (w.add_eos_token_id, tok.eos_token_id),
                          (w.add_pad_token_id, tok.pad_token_id), (w.add_unk_token_id, tok.unk_token_id)):
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


def export_gguf(model_dir: str | Path, out: str | Path, outtype: str = "f16", pre: str | None = None) -> dict:
    """GGUF of a model folder plus an Ollama Modelfile; checks logits and tokens after reading it back."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir, out = Path(model_dir), Path(out)
    if not (model_dir / "config.json").is_file():
        raise LorakitError(f"{model_dir}: not a model folder (no config.json). Export a merged model: "
                           f"`lorakit merge ADAPTER {model_dir}` first, or pass a run/adapter folder (it is merged for you)")
    if outtype not in GGUF_TOLERANCE:
        raise LorakitError(f"--outtype {outtype}: use one of {', '.join(GGUF_TOLERANCE)}")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    check_supported(model.config)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    name = f"{model_dir.name}.{outtype}.gguf"
    text, warning = modelfile_text(name, tokenizer, model.generation_config)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{name}.tmp"
    try:
        write_gguf(model, tokenizer, tmp, outtype, pre)
        check = gguf_parity(model, tokenizer, tmp, outtype)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, out / name)
    (out / "Modelfile").write_text(text)
    return {"gguf": str(out / name), "modelfile": str(out / "Modelfile"), "modelfile_warning": warning, **check}


def gguf_parity(model: Any, tokenizer: Any, path: Path, outtype: str) -> dict:
    """Load the GGUF with transformers (dequantized) and compare its tokenizer and logits with the source."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    chat = [{"role": "user", "content": "How many employees work in Lisbon? Answer in SQL."}]
    texts = [ROUND_TRIP_TEXT] + ([tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)]
                                 if tokenizer.chat_template else [])
    back_tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    for t in texts:
        want_ids, got_ids = (k(t, add_special_tokens=False)["input_ids"] for k in (tokenizer, back_tok))
        if want_ids != got_ids:
            raise LorakitError(f"GGUF round trip FAILED: the file's tokenizer splits {t[:60]!r} differently "
                               f"({got_ids[:12]}... vs {want_ids[:12]}...); nothing written. Try another --pre")
    ids = torch.tensor([tokenizer(texts[-1], add_special_tokens=False)["input_ids"]])
    back = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    with torch.no_grad():
        want, got = model(input_ids=ids).logits, back(input_ids=ids).logits
    diff = (want - got).abs().max().item()
    tol = GGUF_TOLERANCE[outtype] * max(want.abs().max().item(), 1.0)
    if diff > tol:
        raise LorakitError(f"GGUF round trip FAILED: max |logit diff| {diff:.4g} > tolerance {tol:.4g}; nothing written")
    return {"max_abs_logit_diff": diff, "tolerance": tol, "relative_tolerance": GGUF_TOLERANCE[outtype],
            "positions": int(ids.numel()), "outtype": outtype}


def chat_pieces(tokenizer: Any) -> dict[str, str]:
    """The text a chat template puts around each turn, found by rendering chats of marker strings.

    Keys: head (text before everything, e.g. BOS), sys_pre/sys_post, user_pre/user_post, gen (the
    generation prompt, which opens the assistant turn), asst_post (closes it) and default_system
    (what the template inserts when a chat has no system turn; SmolLM2 does). Raises LorakitError
    for a template that is not one block per turn (Llama 2 folds the system turn into the first user turn).
    """
    S, U, A = ({"role": r, "content": f"LKMARK{r.upper()}"} for r in ("system", "user", "assistant"))

    def render(chat: list[dict], gen: bool = False) -> str:
        return tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=gen)

    unsupported = LorakitError("Modelfile: this chat template is not one block per turn, so it cannot be "
                               "written as an Ollama TEMPLATE automatically; write TEMPLATE by hand")
    try:
        s, su, sua, gen, u = render([S]), render([S, U]), render([S, U, A]), render([S, U], True), render([U])
    except (TemplateError, ValueError):  # no template, or one that refuses these chats
        raise unsupported from None
    head = tokenizer.bos_token if tokenizer.bos_token and "bos_token" in (tokenizer.chat_template or "") \
        and s.startswith(tokenizer.bos_token) else ""
    blocks = (s[len(head):], su[len(s):], sua[len(su):])
    if not (su.startswith(s) and sua.startswith(su) and gen.startswith(su) and u.startswith(head)
            and u.endswith(blocks[1]) and len(u) >= len(head) + len(blocks[1])
            and all(b.count(m["content"]) == 1 for b, m in zip(blocks, (S, U, A)))):
        raise unsupported
    (sys_pre, sys_post), (user_pre, user_post), (asst_pre, asst_post) = (
        b.split(m["content"]) for b, m in zip(blocks, (S, U, A)))
    p = {"head": head, "sys_pre": sys_pre, "sys_post": sys_post, "user_pre": user_pre, "user_post": user_post,
         "gen": gen[len(su):], "asst_post": asst_post, "default_system": ""}
    extra = u[len(head):len(u) - len(blocks[1])]  # the system turn the template adds on its own
    if extra:
        if not (extra.startswith(sys_pre) and extra.endswith(sys_post)):
            raise unsupported
        p["default_system"] = extra[len(sys_pre):len(extra) - len(sys_post)]
    # The Ollama template below opens the assistant turn right after each user turn: that must be
    # the generation prompt, and the pieces must rebuild the template's own rendering of a 2-turn chat.
    two_turns = [S, U, A, {"role": "user", "content": "LKMARKUSER2"}]
    rebuilt = (head + sys_pre + S["content"] + sys_post + user_pre + U["content"] + user_post + p["gen"]
               + A["content"] + asst_post + user_pre + "LKMARKUSER2" + user_post + p["gen"])
    if asst_pre != p["gen"] or render(two_turns, True) != rebuilt:
        raise unsupported
    return p


def modelfile_text(gguf_name: str, tokenizer: Any, generation_config: Any) -> tuple[str, str | None]:
    """An Ollama Modelfile whose TEMPLATE, default SYSTEM and stops reproduce the model's chat template.

    Returns (text, warning). A template that cannot be translated gets no TEMPLATE (Ollama then
    falls back to the chat template stored in the GGUF) and a warning saying so.
    """
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    eos = generation_config.eos_token_id
    ids = list(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    lines, warning = [f"FROM ./{gguf_name}"], None
    try:
        p = chat_pieces(tokenizer)
        if any("{{" in v or '"""' in v for v in p.values()):
            raise LorakitError("the chat template contains '{{' or '\"\"\"', which a TEMPLATE cannot hold literally")
    except LorakitError as e:
        warning = f"{e}. The Modelfile has no TEMPLATE: Ollama uses the chat template stored in the GGUF"
        lines.append(f"# {warning}")
    else:
        lines.append(f'TEMPLATE """{p["head"]}{{{{ if .System }}}}{p["sys_pre"]}{{{{ .System }}}}{p["sys_post"]}'
                     f'{{{{ end }}}}{{{{ range .Messages }}}}{{{{ if eq .Role "user" }}}}{p["user_pre"]}{{{{ .Content }}}}'
                     f'{p["user_post"]}{p["gen"]}{{{{ else if eq .Role "assistant" }}}}{{{{ .Content }}}}'
                     f'{p["asst_post"]}{{{{ end }}}}{{{{ end }}}}"""')
        if p["default_system"]:
            lines.append(f'SYSTEM """{p["default_system"]}"""')
        # Also stop at the token closing a turn and at one opening a new user turn.
        for piece in (p["asst_post"], p["user_pre"]):
            ids += [i for i in tokenizer(piece, add_special_tokens=False)["input_ids"] if i in special][:1]
    stops = [tokenizer.convert_ids_to_tokens(i) for i in dict.fromkeys(ids)]
    lines += [f'PARAMETER stop "{s}"' for s in stops if s]
    return "\n".join(lines) + "\n", warning


def vllm_command(base: str, adapters: dict[str, Path], port: int = 8000, force: bool = False) -> str:
    """The `vllm serve` line for a base and its adapters; refuses shapes vLLM's LoRA kernels reject."""
    from lorakit import model

    ranks, problems = [], []
    for name, path in adapters.items():
        meta = read_adapter(path)
        ranks_here = sorted({int(meta.r), *map(int, (meta.rank_pattern or {}).values())})
        ranks += ranks_here
        odd = [r for r in ranks_here if r not in VLLM_RANKS]
        if odd:
            problems.append(f"{name}: rank {', '.join(map(str, odd))} is not one vLLM accepts "
                            f"({', '.join(map(str, VLLM_RANKS))}); retrain with adapter.r=8/16/32/..., or merge it "
                            "(lorakit merge) and serve the merged model")
        targets = meta.target_modules or []
        targets = [targets] if isinstance(targets, str) else targets
        # peft may store full module paths (model.layers.0.self_attn.q_proj); vLLM matches the last part.
        bad = sorted({t.split(".")[-1] for t in targets} - VLLM_TARGETS) if "all-linear" not in targets else []
        if bad:
            problems.append(f"{name}: target modules {bad} are not ones vLLM's LoRA layers wrap "
                            f"({', '.join(sorted(VLLM_TARGETS))})")
        if meta.use_dora:
            problems.append(f"{name}: DoRA adapters are not supported by vLLM; merge it (lorakit merge) instead")
        if meta.modules_to_save:
            problems.append(f"{name}: fully trained modules ({meta.modules_to_save}, modules_to_save) are not "
                            "loaded by vLLM; merge it (lorakit merge) instead")
        if meta.bias != "none" or getattr(meta, "lora_bias", False):
            problems.append(f"{name}: trained biases are not supported by vLLM LoRA; merge it instead")
        try:
            check_base(meta, base, force=force, where=path)
        except LorakitError as e:
            problems.append(f"{name}: {e}")
    if problems:
        raise LorakitError("vLLM cannot serve these adapters as they are:\n  " + "\n  ".join(problems))
    try:
        resolved = model.resolve(base)
    except LorakitError:
        resolved = None
    if resolved is not None and resolved.kind in ("alias", "folder"):
        base = str(Path(resolved.path).resolve())  # vLLM knows hub ids and folders, not lorakit's aliases
    modules = " ".join(f"{shlex.quote(n)}={shlex.quote(str(Path(p).resolve()))}" for n, p in adapters.items())
    return (f"vllm serve {shlex.quote(base)} --enable-lora --lora-modules {modules} "
            f"--max-lora-rank {max(ranks)} --max-loras {len(adapters)} --port {port}")


def vllm_for(source: str, adapters: dict[str, str], base: str | None = None,
             force: bool = False) -> tuple[str, list[str]]:
    """`export --format vllm`: SOURCE is a run/adapter folder (served under its folder's name) or the base.

    Returns the command line and warnings (QLoRA adapters, which vLLM would run on the unquantized base).
    """
    found = {n: Path(p) for n, p in adapters.items()}
    if find_adapter(source) is not None:
        own = adapter_source(source)
        run_cfg = own.run_config()
        base = base or (run_cfg.model if run_cfg else read_adapter(own.path).base_model_name_or_path)
        found = {own.name: Path(source), **found}
    else:
        base = base or source
    if not found:
        raise LorakitError("export --format vllm: no adapter to serve; give a run/adapter folder as SOURCE "
                           "or --adapter NAME=PATH")
    if not base:
        raise LorakitError(f"{source}: the adapter does not name its base model; pass --base MODEL")
    dirs, warnings = {}, []
    for name, path in found.items():
        own = adapter_source(path)
        dirs[name], run_cfg = own.path, own.run_config()
        if run_cfg is not None and run_cfg.method == "qlora":
            # Measured on SmolLM2: the QLoRA adapter on the unquantized base moves logits by up to 20
            # (of 39) against the 4-bit model it was trained on; top-1 tokens agree only 64% of the time.
            warnings.append(f"{name} was trained with QLoRA on the 4-bit base, and vLLM would run it on the "
                            f"unquantized base, where it answers differently. Serve `lorakit merge {path} OUT` "
                            "(merged into the dequantized base) instead, or add --quantization bitsandbytes.")
    return vllm_command(base, dirs, force=force), warnings


def gguf_for(source: str, out: str | Path, outtype: str = "f16", pre: str | None = None, base: str | None = None,
         force: bool = False) -> dict:
    """`export --format gguf`: SOURCE is a model folder, or a run/adapter folder merged (fp32) into OUT/merged first."""
    from lorakit import merge, model

    out = Path(out)
    merged = None
    found = locate(source)
    if found is not None and found.kind == "adapter":
        model_dir = out / "merged"
        # fp32: the GGUF's own --outtype decides the precision; rounding twice would only add error.
        merged = merge.merge(source, model_dir, base=base, dtype="fp32", force=force)
    elif found is not None:  # a model folder, or a full fine-tune's run folder
        model_dir = found.path
    else:
        where = model.resolve(source)
        if where.kind not in ("alias", "folder"):
            raise LorakitError(f"{source}: export a model folder, a run folder or an adapter folder "
                               "(a GGUF or hub model needs no lorakit export)")
        model_dir = Path(where.path)
    return {**export_gguf(model_dir, out, outtype=outtype, pre=pre), "merged": merged}
