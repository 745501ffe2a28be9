"""generate(): batched, left-padded, order-preserving chat completion on tiny local models."""

import pytest
import torch
from peft import LoraConfig, get_peft_model

from lorakit.generate import _decode, _left_pad, generate
from lorakit.model import with_pad
from tiny import tiny_model, tiny_tokenizer

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Be short."}, {"role": "user", "content": "Hi"}],
    [{"role": "user", "content": "Write a function that returns the sum of two numbers, then explain it."}],
    [{"role": "user", "content": "How many days are in a week?"}],
    [{"role": "user", "content": "SELECT name FROM users"}],
]


@pytest.fixture(scope="module")
def llama(tok):
    return tiny_model("llama", tok)


def test_batched_greedy_equals_one_by_one(llama, tok):
    batched = generate(llama, tok, CHATS, max_new_tokens=12, batch_size=3)
    single = [generate(llama, tok, [chat], max_new_tokens=12, batch_size=1)[0] for chat in CHATS]
    assert batched == single
    assert all(batched)  # random weights rarely pick EOS first; empty texts would make the test vacuous


def test_greedy_is_deterministic_and_sampling_follows_the_seed(llama, tok):
    assert generate(llama, tok, CHATS[:2], max_new_tokens=8) == generate(llama, tok, CHATS[:2], max_new_tokens=8)
    a = generate(llama, tok, CHATS[:2], max_new_tokens=8, temperature=1.0, seed=7)
    b = generate(llama, tok, CHATS[:2], max_new_tokens=8, temperature=1.0, seed=7)
    assert a == b


def test_stop_strings_cut_the_text(llama, tok):
    full = generate(llama, tok, CHATS[:1], max_new_tokens=12)[0]
    stop = full[3:5]
    cut = generate(llama, tok, CHATS[:1], max_new_tokens=12, stop=["never appears", stop])[0]
    assert cut == full[: full.find(stop)]


def test_decode_ends_at_any_eos_id_and_drops_padding(tok):
    hello = tok("hello world", add_special_tokens=False).input_ids
    eot = tok.convert_tokens_to_ids("<|endoftext|>")
    assert _decode(tok, hello + [eot] + hello, [tok.eos_token_id, eot], None) == "hello world"
    padded = hello + [tok.eos_token_id] + [tok.pad_token_id] * 3
    assert _decode(tok, padded, [tok.eos_token_id], None) == "hello world"


def test_generation_config_eos_ids_stop_generation(tok):
    model = tiny_model("llama", tok)
    free = generate(model, tok, CHATS[:1], max_new_tokens=6)[0]
    first_id = tok(free, add_special_tokens=False).input_ids[0]
    # Declare the first token greedy decoding picks as an extra end-of-turn id: the text is then empty.
    model.generation_config.eos_token_id = [tok.eos_token_id, first_id]
    assert generate(model, tok, CHATS[:1], max_new_tokens=6) == [""]


def test_padding_is_on_the_left():
    ids, mask = _left_pad([[5, 6, 7], [8]], pad_id=0, device="cpu")
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_works_with_a_peft_model_and_restores_training_mode(tok):
    base = tiny_model("llama", tok)
    expected = generate(base, tok, CHATS[:3], max_new_tokens=8)
    # A fresh LoRA has B = 0, so it must generate exactly what its base does.
    peft_model = get_peft_model(base, LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.5))
    peft_model.train()
    assert generate(peft_model, tok, CHATS[:3], max_new_tokens=8, batch_size=2) == expected
    assert peft_model.training


def test_other_chat_template_and_missing_pad(tok):
    llama2_tok = tiny_tokenizer("llama2")
    llama2_tok.pad_token = None
    model = tiny_model("llama", llama2_tok)
    chats = [[{"role": "user", "content": "Hi"}], [{"role": "user", "content": "What is the capital of France?"}]]
    with pytest.raises(ValueError, match=r"no pad token: load it with lorakit.model.load_tokenizer"):
        generate(model, llama2_tok, chats, max_new_tokens=6)
    llama2_tok = with_pad(llama2_tok)  # what model.load_tokenizer does: pads with EOS
    assert llama2_tok.pad_token == llama2_tok.eos_token
    batched = generate(model, llama2_tok, chats, max_new_tokens=6, batch_size=2)
    assert batched == [generate(model, llama2_tok, [c], max_new_tokens=6)[0] for c in chats]


def test_a_batch_that_does_not_fit_is_made_smaller(llama, tok, monkeypatch):
    """Out of GPU memory at batch 4: the same answers come back from smaller batches."""
    expected = generate(llama, tok, CHATS, max_new_tokens=6, batch_size=1)
    real, sizes = llama.generate, []

    def small_memory(*, input_ids, **kw):
        sizes.append(input_ids.shape[0])
        if input_ids.shape[0] > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(input_ids=input_ids, **kw)

    monkeypatch.setattr(llama, "generate", small_memory)
    assert generate(llama, tok, CHATS, max_new_tokens=6, batch_size=4) == expected
    assert sizes[0] == 4 and sizes[-1] <= 2 and len(sizes) > 3, sizes
