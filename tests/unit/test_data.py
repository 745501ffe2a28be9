"""prepare(): split, summary, cache hits and invalidation, and refusals of unusable data."""

import json

import pytest

from lorakit import data, render
from lorakit.config import DataConfig
from lorakit.errors import LorakitError
from tiny import tiny_tokenizer


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def qa_rows(n):
    return [{"prompt": f"What is {i} plus {i}?", "completion": f"It is {2 * i}."} for i in range(n)]


def test_eval_fraction_split_is_disjoint_and_seeded(tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", qa_rows(40))
    cfg = DataConfig(train=str(f), eval=0.25, cache_dir=str(tmp_path / "cache"))
    p = data.prepare(cfg, tiny_tokenizer())
    assert (len(p.train), len(p.eval)) == (30, 10)
    assert not set(p.train["where"]) & set(p.eval["where"])
    again = data.prepare(cfg.model_copy(update={"cache_dir": str(tmp_path / "other")}), tiny_tokenizer())
    assert again.eval["where"] == p.eval["where"]
    other_seed = data.prepare(cfg.model_copy(update={"seed": 1}), tiny_tokenizer())
    assert other_seed.eval["where"] != p.eval["where"]


def test_eval_file(tmp_path):
    cfg = DataConfig(
        train=str(write_jsonl(tmp_path / "t.jsonl", qa_rows(5))),
        eval=str(write_jsonl(tmp_path / "e.jsonl", qa_rows(3))),
        cache_dir=str(tmp_path / "c"),
    )
    p = data.prepare(cfg, tiny_tokenizer())
    assert len(p.eval) == 3 and p.stats["eval_rows"] == 3


def test_second_run_loads_from_cache_without_tokenizing(tmp_path, monkeypatch):
    f = write_jsonl(tmp_path / "d.jsonl", qa_rows(20))
    cfg = DataConfig(train=str(f), cache_dir=str(tmp_path / "cache"))
    first = data.prepare(cfg, tiny_tokenizer())
    assert not first.cache_hit

    def boom(*a, **k):
        raise AssertionError("tokenized again")

    monkeypatch.setattr(render, "encode", boom)
    second = data.prepare(cfg, tiny_tokenizer())
    assert second.cache_hit and second.train["input_ids"] == first.train["input_ids"]
    assert second.stats == first.stats
    monkeypatch.undo()
    # Any change to contents, settings or tokenizer is a miss.
    write_jsonl(f, qa_rows(21))
    assert not data.prepare(cfg, tiny_tokenizer()).cache_hit
    assert not data.prepare(cfg.model_copy(update={"max_length": 64}), tiny_tokenizer()).cache_hit
    assert not data.prepare(cfg, tiny_tokenizer("llama2")).cache_hit
    assert len(list((tmp_path / "cache").iterdir())) == 4, "one entry per distinct input, no temp leftovers"


def test_summary_counts(tmp_path):
    rows = qa_rows(10) + [{"prompt": "empty", "completion": " "}, {"prompt": "long", "completion": "word " * 80}]
    cfg = DataConfig(train=str(write_jsonl(tmp_path / "d.jsonl", rows)), max_length=64, cache_dir=str(tmp_path / "c"))
    p = data.prepare(cfg, tiny_tokenizer())
    s = p.stats
    assert s["rows"] == 11 and s["dropped"] == {"no assistant answer": 1}
    assert s["truncated_rows"] == 1 and s["max_seen_length"] == 64
    assert s["tokens"] == sum(len(x) for x in p.train["input_ids"])
    assert s["trained_tokens"] == sum(t != render.IGNORE for x in p.train["labels"] for t in x)
    assert 0 < s["trained_share"] < 1


def test_empty_after_filtering(tmp_path):
    cfg = DataConfig(
        train=str(write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "completion": ""}] * 3)),
        cache_dir=str(tmp_path / "c"),
    )
    with pytest.raises(LorakitError, match=r"no usable rows left after filtering \(3 no assistant answer\)"):
        data.prepare(cfg, tiny_tokenizer())


def test_no_trained_token_at_all(tmp_path):
    rows = [{"prompt": "a long question " * 20, "completion": "yes"}] * 3
    cfg = DataConfig(train=str(write_jsonl(tmp_path / "d.jsonl", rows)), max_length=16, cache_dir=str(tmp_path / "c"))
    with pytest.raises(LorakitError, match=r"no token would be trained.*max_length=16"):
        data.prepare(cfg, tiny_tokenizer())


def test_row_error_names_the_file_and_line(tmp_path):
    rows = [
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
        {
            "messages": [
                {"role": "user", "content": "a"},
                {"role": "user", "content": "b"},
                {"role": "assistant", "content": "c"},
            ]
        },
    ]
    cfg = DataConfig(train=str(write_jsonl(tmp_path / "d.jsonl", rows)), cache_dir=str(tmp_path / "c"))
    with pytest.raises(LorakitError, match=r"d\.jsonl:2: the chat template refused"):
        data.prepare(cfg, tiny_tokenizer("llama2"))
