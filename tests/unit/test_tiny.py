"""The tiny test models and tokenizers behave like real ones."""

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tiny import ARCHS, tiny_model, tiny_tokenizer

TEXT = "Grüße, 你好 🙂 The quick brown fox"


@pytest.mark.parametrize("arch", ARCHS)
def test_forward_with_labels_gives_finite_loss(arch, tok):
    model = tiny_model(arch, tok)
    ids = torch.tensor([tok(TEXT)["input_ids"]])
    loss = model(input_ids=ids, labels=ids).loss
    assert math.isfinite(loss.item())
    # Random weights over a ~640-token vocab: the loss sits near ln(vocab), a little above it with the
    # wide initializer_range of tiny models (peakier random logits).
    assert abs(loss.item() - math.log(len(tok))) < 3.0
    assert model.config.eos_token_id == tok.eos_token_id
    assert model.config.pad_token_id == tok.pad_token_id


def test_same_seed_same_weights(tok):
    a, b = tiny_model("llama", tok, seed=1), tiny_model("llama", tok, seed=1)
    assert torch.equal(a.model.embed_tokens.weight, b.model.embed_tokens.weight)


def test_unicode_round_trip_and_offsets(tok):
    enc = tok(TEXT, return_offsets_mapping=True)
    assert tok.decode(enc["input_ids"]) == TEXT
    assert tok.unk_token_id not in enc["input_ids"]
    covered = set()
    for start, end in enc["offset_mapping"]:
        covered.update(range(start, end))
    assert covered == set(range(len(TEXT)))


def test_special_tokens(tok):
    assert (tok.eos_token, tok.bos_token, tok.pad_token) == ("<|im_end|>", "<s>", "<pad>")
    assert not tok.add_bos_token
    ids = tok("<|im_start|>user\nhi<|im_end|>")["input_ids"]
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>") and ids[-1] == tok.eos_token_id


def test_chat_templates():
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    chatml = tiny_tokenizer("chatml")
    assert chatml.apply_chat_template(chat, tokenize=False) == (
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyo<|im_end|>\n"
    )
    prompt = chatml.apply_chat_template(chat[:1], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n")
    llama2 = tiny_tokenizer("llama2")
    assert llama2.eos_token == "</s>"
    assert llama2.apply_chat_template(chat, tokenize=False) == "<s>[INST] hi [/INST] yo </s>"
    assert tiny_tokenizer(None).chat_template is None


def test_each_call_is_a_fresh_copy():
    a = tiny_tokenizer()
    a.chat_template = None
    a.add_special_tokens({"additional_special_tokens": ["<extra>"]})
    b = tiny_tokenizer()
    assert b.chat_template is not None and "<extra>" not in b.get_vocab()


def test_saved_folder_loads_offline(tiny_llama_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    assert model.config.model_type == "llama"
    assert tokenizer.chat_template is not None and tokenizer.eos_token == "<|im_end|>"
