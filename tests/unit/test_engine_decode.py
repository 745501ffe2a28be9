"""The engine's text, decoded a few tokens at a time, against the whole decode; and each row's own stop ids.

Random ids go through a byte-level BPE (GPT-2/SmolLM style) and a SentencePiece Llama tokenizer (a dummy
prefix space that its decode strips again, byte fallback): multi-byte characters split over byte tokens, lone
bytes (broken UTF-8), special tokens that the decode skips, stop strings across token edges. The reference
decodes the whole answer at every step, as the engine did before.
"""

from __future__ import annotations

import functools
import io
import json
import queue
import random

import pytest
import sentencepiece as spm
import torch
from transformers import AutoTokenizer

from lorakit.serve.engine import Engine, Job, Text
from tiny import CORPUS, tiny_model, tiny_tokenizer

# Words the ids are made of: ASCII, accents, 3- and 4-byte characters (split over byte tokens), blanks.
WORDS = ["the", " quick", " fox", "Grüße", " €5", " 日本語", " 🙂", " naïve", "\n", "  ", " .", "def", " ü", "?"]


def llama_tokenizer(folder):
    """Llama's tokenizer class on a SentencePiece model trained here, with Llama's settings."""
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS.splitlines() * 4), model_writer=buf, vocab_size=400, model_type="bpe",
        byte_fallback=True, add_dummy_prefix=True, split_digits=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        minloglevel=2,
    )  # fmt: skip
    (folder / "tokenizer.model").write_bytes(buf.getvalue())
    config = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    tok = AutoTokenizer.from_pretrained(folder)
    assert tok.decode(tok("the", add_special_tokens=False)["input_ids"]) == "the", "the leading space is stripped"
    return tok


@pytest.fixture(scope="module", params=["byte-level-bpe", "sentencepiece-llama"])
def engine(request, tmp_path_factory):
    """An idle engine (a tiny model that never runs here) on each tokenizer: its `_advance` is what is tested."""
    tok = tiny_tokenizer() if request.param == "byte-level-bpe" else llama_tokenizer(tmp_path_factory.mktemp("sp"))
    net = tiny_model("llama", tok)
    engine = Engine(lambda: net, tok, [tok.eos_token_id])
    yield engine
    engine.close()


def random_ids(tok, rng: random.Random, n: int) -> list[int]:
    """n ids: encoded words, special tokens (skipped by the decode), and any id of the vocabulary (lone bytes)."""
    ids: list[int] = []
    while len(ids) < n:
        r = rng.random()
        if r < 0.65:
            ids += tok(rng.choice(WORDS), add_special_tokens=False)["input_ids"]
        elif r < 0.8:
            ids.append(rng.choice(tok.all_special_ids))
        else:
            ids.append(rng.randrange(len(tok)))
    return ids[:n]  # may end inside a character


def whole(tok, ids: list[int]) -> str:
    return tok.decode(ids, skip_special_tokens=True)


def settled(engine, ids: list[int]) -> str:
    """The whole decode up to the last id after which later ids cannot change it, less an unfinished character."""
    end = len(ids)
    while end and ids[end - 1] in engine.open_ids:
        end -= 1
    return whole(engine.tokenizer, ids[:end]).rstrip("\ufffd")


def test_a_run_of_byte_fallback_tokens_is_held_back_until_it_ends(engine):
    tok = engine.tokenizer
    if not engine.open_ids:  # byte-level BPE: its text only grows
        assert "\ufffd" not in whole(tok, tok(" 日本語", add_special_tokens=False)["input_ids"])
        return
    assert len(engine.open_ids - set(tok.all_special_ids)) == 256, "the byte tokens, and the special ids"
    nihon, broken = tok.convert_tokens_to_ids(["<0xE6>", "<0x97>", "<0xA5>"]), tok.convert_tokens_to_ids("<0xE6>")
    assert whole(tok, nihon) == "日" and whole(tok, [*nihon, broken]) == "\ufffd" * 4, "decoded all or nothing"
    text = Text()
    for token in [*tok("the", add_special_tokens=False)["input_ids"], *nihon]:
        text.add(token, engine.decode, engine.open_ids)
    assert (text.text, text.half) == ("the", "日"), "a later byte could still turn it into U+FFFD"
    text.add(tok.convert_tokens_to_ids("▁the"), engine.decode, engine.open_ids)
    assert (text.text, text.half) == ("the日 the", "")


def test_text_is_the_whole_decode_after_every_token(engine):
    tok, rng = engine.tokenizer, random.Random(0)
    for _ in range(150):
        ids, text = random_ids(tok, rng, rng.randrange(1, 40)), Text()
        for n in range(1, len(ids) + 1):
            before = text.text
            text.add(ids[n - 1], engine.decode, engine.open_ids)
            full = whole(tok, ids[:n])
            assert text.text + text.half == full, (ids[:n], text)
            assert text.text == settled(engine, ids[:n]) and text.text.startswith(before)


def test_each_step_decodes_a_few_tokens_not_the_whole_answer(engine):
    tok, rng, sizes = engine.tokenizer, random.Random(1), []

    def decode(ids: list[int]) -> str:
        sizes.append(len(ids))
        return engine.decode(ids)

    ids = []
    while len(ids) < 400:  # valid text only: the longest wait for settled text is a word of byte tokens
        ids += tok(rng.choice(WORDS), add_special_tokens=False)["input_ids"]
    text = Text()
    for token in ids:
        text.add(token, decode, engine.open_ids)
    assert text.text + text.half == whole(tok, ids) and len(sizes) <= 2 * len(ids)
    assert max(sizes) <= 12, max(sizes)  # " 日本語" is 9 byte-fallback tokens in the SentencePiece vocabulary


def expected(engine, ids: list[int], stop: list[str], max_tokens: int, stop_ids: set[int]):
    """The engine's stream computed from the whole decode at each step: (text shown after each token, final
    text, finish reason); final and reason are None if the ids run out first."""

    def first_stop(text: str) -> int:
        return min((i for i in (text.find(s) for s in stop) if i >= 0), default=-1)

    def last(text: str, reason: str):  # what was held back is final, cut at a stop string it completes
        return (text[: first_stop(text)], "stop") if first_stop(text) >= 0 else (text, reason)

    shown, sent = [], ""
    for n, token in enumerate(ids, 1):
        if token in stop_ids:
            return shown, *last(whole(engine.tokenizer, ids[: n - 1]), "stop")
        text = settled(engine, ids[:n])  # what later ids could change waits
        if first_stop(text) >= 0:
            return shown, text[: first_stop(text)], "stop"
        if n >= max_tokens:
            return shown, *last(whole(engine.tokenizer, ids[:n]), "length")
        held = max((k for s in stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        sent = max(sent, text[: len(text) - held], key=len)  # so does a possible start of a stop string
        shown.append(sent)
    return shown, None, None


def record(deltas: list[str], ends: list[str], delta: str, done: bool, reason: str | None) -> None:
    deltas.append(delta)
    if done:
        ends.append(reason)


def test_streamed_text_is_the_whole_decode_cut_at_the_first_stop(engine):
    tok, rng = engine.tokenizer, random.Random(2)
    reasons = {"stop": 0, "length": 0, None: 0}
    for _ in range(300):
        ids = random_ids(tok, rng, rng.randrange(1, 30))
        full = whole(tok, ids).replace("\ufffd", "")  # stop strings are text: no broken bytes in them
        stop = []
        for _ in range(rng.randrange(0, 3)):  # pieces of the answer (across token edges), or words
            at, size = rng.randrange(max(1, len(full))), rng.randrange(1, 6)
            stop.append(full[at : at + size] if full and rng.random() < 0.8 else rng.choice(WORDS))
        stop = [s for s in stop if s]
        stop_ids = {rng.choice(tok.all_special_ids)}  # a row's own end ids; the other special ids are skipped
        max_tokens = len(ids) + 1 if rng.random() < 0.3 else rng.randrange(1, len(ids) + 1)
        deltas, ends = [], []
        emit = functools.partial(record, deltas, ends)
        job = Job([0], None, max_tokens, stop=stop, stop_ids=frozenset(stop_ids), emit=emit)
        text, shown, fed = Text(), [], 0
        for token in ids:
            fed += 1
            if not engine._advance(job, text, token):
                break
            shown.append("".join(deltas))
        want_shown, want_text, want_reason = expected(engine, ids, stop, max_tokens, stop_ids)
        assert shown == want_shown, (ids, stop)
        assert "".join(deltas) == job.text == (want_text if want_reason else want_shown[-1])
        assert job.finish_reason == want_reason and ends == ([want_reason] if want_reason else [])
        assert job.completion_tokens == fed, "every generated token counts, a stop id too (OpenAI's usage, vLLM's)"
        reasons[want_reason] += 1
    assert min(reasons.values()) >= 20, reasons  # every way of ending was tried


def greedy(net, prompt: list[int], n: int) -> list[int]:
    """n greedy tokens, each from a whole forward pass of prompt + answer so far (no cache, no engine)."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(net(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt) :]


def test_each_row_ends_at_its_own_stop_ids_while_its_batch_mates_go_on():
    tok = tiny_tokenizer()
    net = tiny_model("llama", tok).eval()
    prompt = tok("the quick brown fox", add_special_tokens=False)["input_ids"]
    answer = greedy(net, prompt, 12)
    first = {}  # each token's first place in the answer
    for i, t in enumerate(answer):
        first.setdefault(t, i)
    assert len(first) >= 3, "the tiny model's answer has at least 3 distinct tokens"
    t, u = sorted(first, key=first.get)[1:3]  # first[t] < first[u]

    ended: queue.Queue = queue.Queue()
    engine = Engine(lambda: net, tok, [t], max_batch=3, window_s=600.0)  # starts once the 3 rows are queued
    rows = [{"stop_ids": None}, {"stop_ids": frozenset({u})}, {"stop_ids": frozenset(), "keep_logits": True}]
    jobs = [Job(prompt, None, 12, emit=lambda d, done, why: done and ended.put(why), **row) for row in rows]
    for job in jobs:
        engine.submit(job)
    for _ in jobs:
        ended.get(timeout=60)
    engine.close()
    assert engine.batches == 1 and engine.joined == 0, "the three rows decoded together from the start"
    engine_eos, own, none = jobs
    # usage counts the stop token too (OpenAI's rule, and vLLM's): the answer's tokens up to it, plus it.
    assert engine_eos.finish_reason == "stop" and engine_eos.completion_tokens == first[t] + 1, "the engine's eos_ids"
    assert engine_eos.text == whole(tok, answer[: first[t]])
    assert own.finish_reason == "stop" and own.completion_tokens == first[u] + 1, "its own ids, not the engine's"
    assert own.text == whole(tok, answer[: first[u]])
    assert none.finish_reason == "length" and none.completion_tokens == 12 and none.text == whole(tok, answer)
    assert none.logits.shape == (len(tok),) and int(none.logits.argmax()) == answer[0], "the first pick's logits"
    assert engine_eos.logits is None and own.logits is None, "kept only when asked"
