"""Tiny real-architecture models and tokenizers, built locally in well under a second.

Tests never touch the network: the tokenizer is a byte-level BPE trained here on a few paragraphs,
and the models are the real `transformers` classes (Llama, Qwen2, Gemma 2/3, Bloom) with random
weights and toy sizes, so code paths (attention masks, GQA, tied embeddings, chat templates) are
the ones real checkpoints take.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<s>", "</s>", "<pad>"]
VOCAB_SIZE = 640
ARCHS = ("llama", "qwen2", "gemma", "gemma2", "gemma3", "bloom")

CORPUS = """\
The quick brown fox jumps over the lazy dog. A small model learns to answer questions about
the weather, cooking, travel and programming. It is a sunny day in the city, and the people walk
to the market to buy bread, cheese, apples and fresh vegetables for dinner.
Fine-tuning adapts a pretrained language model to a new task with a small amount of data. Low-rank
adapters add two thin matrices next to each linear layer and train only those, which saves memory.
The assistant should be helpful, honest and polite. When the user asks a question, the assistant
gives a short and clear answer, then stops.
Write a function that returns the sum of two numbers. def add(a, b): return a + b. SELECT name,
age FROM users WHERE age > 30 ORDER BY name; print("hello world") for i in range(10): x = i * 2
What is the capital of France? The capital of France is Paris. How many days are in a week? There
are seven days in a week: Monday, Tuesday, Wednesday, Thursday, Friday, Saturday and Sunday.
Translate to German: good morning, thank you, please. Guten Morgen, danke, bitte. Grüße aus Berlin!
Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000 3.14 42. Punctuation: , . ; : ! ? ' " ( ) [ ] { } - _ / \\
Rewrite the sentence in a polite way. You are wrong and this is stupid. I think there may be a
mistake here; could we look at it again? Summarize the text in one sentence. Explain like I am five.
"""

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Meta's Llama-2-chat template (as shipped in meta-llama/Llama-2-7b-chat-hf), system folded into turn 1.
LLAMA2 = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}"
    "{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + content.strip() + ' ' + eos_token }}{% endif %}"
    "{% endfor %}"
)

TEMPLATES = {"chatml": (CHATML, "<|im_end|>"), "llama2": (LLAMA2, "</s>"), None: (None, "<|im_end|>")}


@functools.lru_cache(maxsize=1)
def _trained_bpe() -> str:
    """Train the byte-level BPE once per process; returned as JSON so every caller gets a fresh copy."""
    tok = Tokenizer(models.BPE())
    # Byte-level pre-tokenization + the full 256-byte initial alphabet: any unicode text encodes,
    # nothing maps to <unk>, and offsets map back onto the original characters.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS.splitlines() * 4, trainer)
    return tok.to_str()


def tiny_tokenizer(chat_template: str | None = "chatml", eos: str | None = None) -> PreTrainedTokenizerFast:
    """A fresh byte-level BPE tokenizer (~640 tokens) with the six special tokens of SPECIAL_TOKENS.

    chat_template: "chatml" (SmolLM2/Qwen style, eos `<|im_end|>`), "llama2" (`<s>[INST] ... [/INST]
    answer </s>`, eos `</s>`) or None (no template at all, eos `<|im_end|>`).
    eos: overrides the template's end token. bos is `<s>` but never added automatically.
    """
    if chat_template not in TEMPLATES:
        raise ValueError(f"unknown tiny chat template {chat_template!r}; use one of {list(TEMPLATES)}")
    template, default_eos = TEMPLATES[chat_template]
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_trained_bpe()),
        bos_token="<s>",
        eos_token=eos or default_eos,
        pad_token="<pad>",
        unk_token=None,
        add_bos_token=False,
        additional_special_tokens=[t for t in SPECIAL_TOKENS if t not in ("<s>", "<pad>", eos or default_eos)],
        model_max_length=4096,
    )
    if template is not None:
        tok.chat_template = template
    return tok


def _config(arch: str, tokenizer: PreTrainedTokenizerFast):
    ids = {
        # Wider than the 0.02 default: with a frozen random head of std 0.02 the logits can barely move,
        # so LoRA (which leaves the head alone) could not show learning in a dozen steps.
        "initializer_range": 0.2,
        "vocab_size": len(tokenizer),
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    if arch == "bloom":
        # Bloom has no GQA and names its sizes differently (n_embed/n_head/n_layer).
        return AutoConfig.for_model("bloom", hidden_size=64, n_head=4, n_layer=2, **ids)
    sizes = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        **ids,
    )
    if arch == "gemma":
        return AutoConfig.for_model("gemma", head_dim=16, **sizes)
    if arch in ("gemma2", "gemma3"):
        # Gemma sets head_dim explicitly; a sliding window smaller than test sequences exercises
        # the local-attention layers too.
        sizes.update(head_dim=16, query_pre_attn_scalar=16, sliding_window=16)
        return AutoConfig.for_model("gemma3_text" if arch == "gemma3" else "gemma2", **sizes)
    if arch in ("llama", "qwen2"):
        return AutoConfig.for_model(arch, tie_word_embeddings=arch == "qwen2", **sizes)
    raise ValueError(f"unknown tiny arch {arch!r}; use one of {ARCHS}")


def tiny_model(arch: str, tokenizer: PreTrainedTokenizerFast, seed: int = 0) -> PreTrainedModel:
    """A randomly initialised CausalLM of the real `arch` class: hidden 64, 2 layers, 4 heads, fp32.

    arch: llama, qwen2, gemma, gemma2, gemma3 (text-only Gemma3ForCausalLM) or bloom. The vocab matches
    `tokenizer` and the pad/bos/eos ids come from it. Same seed, same weights.
    """
    config = _config(arch, tokenizer)
    # Gemma 2 has no SDPA path in transformers 5.x (its logit soft-capping needs eager attention).
    attn = "sdpa" if MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]._supports_sdpa else "eager"
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=torch.float32)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def save_tiny(path: str | Path, arch: str = "llama", chat_template: str | None = "chatml") -> Path:
    """Save a tiny model + tokenizer that `from_pretrained(path)` loads offline; returns the folder."""
    path = Path(path)
    tok = tiny_tokenizer(chat_template)
    tiny_model(arch, tok).save_pretrained(path)
    tok.save_pretrained(path)
    return path


# Gemma's layout: <start_of_turn>/<end_of_turn> at ids 106/107, as llama.cpp's converter assumes for Gemma.
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\\n' + message['content'] + '<end_of_turn>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)


def save_tiny_sentencepiece(path: str | Path, arch: str = "gemma2") -> Path:
    """A tiny Gemma-style model with a sentencepiece tokenizer.model (llama.cpp reads Gemma 1/2 vocabularies
    from it), trained here: byte fallback, Gemma's special ids, its chat template, eos <end_of_turn>."""
    import io
    import json

    import sentencepiece as spm
    from transformers import AutoTokenizer

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS.splitlines() * 4), model_writer=buf, vocab_size=500, model_type="bpe",
        byte_fallback=True, user_defined_symbols=[f"<unused{i}>" for i in range(102)] + ["<start_of_turn>",
        "<end_of_turn>"], pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>",
        bos_piece="<bos>", unk_piece="<unk>", add_dummy_prefix=False, remove_extra_whitespaces=False,
        normalization_rule_name="identity", split_digits=True, minloglevel=2,
    )  # fmt: skip
    (path / "tokenizer.model").write_bytes(buf.getvalue())
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "GemmaTokenizer", "bos_token": "<bos>", "eos_token": "<end_of_turn>", "pad_token": "<pad>",
        "unk_token": "<unk>", "add_bos_token": False, "chat_template": GEMMA_TEMPLATE,
        # Saved as special added tokens, as in Gemma's own tokenizer_config: llama.cpp's converter marks them
        # CONTROL from there, so llama.cpp matches them whole in a prompt.
        "additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"],
    }))  # fmt: skip
    tok = AutoTokenizer.from_pretrained(path)
    assert tok.convert_tokens_to_ids("<end_of_turn>") == 107, "Gemma's end-of-turn id"
    tiny_model(arch, tok).save_pretrained(path)
    tok.save_pretrained(path)
    return path
