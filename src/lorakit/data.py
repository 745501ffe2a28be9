"""From `data:` config to tokenized, masked train/eval sets, cached on disk.

read rows (sources.py) → convert to chats/text (formats.py) → split off eval → render + tokenize +
mask (render.py) with `datasets.map` → save under a key of (file contents, tokenizer, settings), so a
second run with the same inputs loads the result instead of tokenizing again. A preference objective (dpo,
orpo, kto) takes the same path with preference.py's reading and tokenizing of pairs (or labelled rows).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets

from lorakit import files, formats, model, render, sources
from lorakit import preference as preference_data
from lorakit.config import DataConfig, PreferenceConfig
from lorakit.errors import LorakitError

CACHE_VERSION = "1"  # bump when tokenization output changes, to invalidate old caches


@dataclass
class Prepared:
    """Tokenized sets with columns input_ids, labels, truncated, eos_added, where; for a preference objective the
    columns of preference.tokenize (chosen_/rejected_ input_ids and labels, prompt_len... or KTO's)."""

    train: datasets.Dataset
    eval: datasets.Dataset | None
    stats: dict[str, Any] = field(default_factory=dict)
    cache_hit: bool = False
    cache_path: Path | None = None


def prepare(
    cfg: DataConfig, tokenizer: Any, objective: str = "sft", preference: PreferenceConfig | None = None
) -> Prepared:
    """Load, convert, split, tokenize and mask the data set of one run (cached).

    objective: sft, or dpo/orpo (pairs) or kto (labelled rows), tokenized with `preference`'s max_prompt_length.
    """
    template_name = render.setup_template(tokenizer, cfg.chat_template)
    train_rows = sources.read(cfg.train, cfg.split, cfg.limit)
    eval_rows = sources.read(cfg.eval, cfg.split) if isinstance(cfg.eval, str) else None
    prompt_keeps = None if objective == "sft" else preference_data.max_prompt_length(preference, cfg.max_length)
    # Only what changes the tokens: dpo and orpo share a cache; sft's key is the one it had before objectives.
    pairs = None if objective == "sft" else {"pairs": preference_data.is_pairs(objective), "prompt": prompt_keeps}
    key = _cache_key(cfg, tokenizer, train_rows, eval_rows, pairs)
    folder = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else model.lorakit_home() / "tokenized"
    path = folder / key
    if (path / "stats.json").is_file():
        stats = json.loads((path / "stats.json").read_text())
        ev = datasets.load_from_disk(str(path / "eval")) if (path / "eval").is_dir() else None
        return Prepared(datasets.load_from_disk(str(path / "train")), ev, stats, True, path)
    if prompt_keeps is not None:
        train_ds, eval_ds, stats = _prepare_preference(
            train_rows, eval_rows, tokenizer, cfg, objective, prompt_keeps, template_name
        )
        _save(path, train_ds, eval_ds, stats)
        return Prepared(train_ds, eval_ds, stats, False, path)

    train = _convert(train_rows, cfg)
    ev = _convert(eval_rows, cfg) if eval_rows else None
    if isinstance(cfg.eval, float):
        train, ev = _split(train, cfg.eval, cfg.seed)
    train_ds = _tokenize(train, tokenizer, cfg)
    eval_ds = _tokenize(ev, tokenizer, cfg) if ev else None
    stats = summarize(train_ds, train.dropped, train.format, template_name, cfg)
    if eval_ds is not None:
        stats["eval_rows"] = len(eval_ds)
    _check_trainable(stats, cfg)
    _save(path, train_ds, eval_ds, stats)
    return Prepared(train_ds, eval_ds, stats, False, path)


def _prepare_preference(
    train_rows: sources.Rows,
    eval_rows: sources.Rows | None,
    tokenizer: Any,
    cfg: DataConfig,
    objective: str,
    prompt_keeps: int,
    template_name: str,
) -> tuple[datasets.Dataset, datasets.Dataset | None, dict[str, Any]]:
    train = _convert_preference(train_rows, cfg, objective)
    ev = _convert_preference(eval_rows, cfg, objective) if eval_rows else None
    if isinstance(cfg.eval, float):
        train, ev = _split(train, cfg.eval, cfg.seed)
    train_ds, cut = _tokenize_preference(train, tokenizer, cfg, prompt_keeps)
    eval_ds = _tokenize_preference(ev, tokenizer, cfg, prompt_keeps)[0] if ev else None
    stats = preference_data.summarize(
        train_ds, train.dropped + cut, train.format, template_name, cfg.max_length, prompt_keeps, objective
    )
    if eval_ds is not None:
        stats["eval_rows"] = len(eval_ds)
    if not len(train_ds):
        raise LorakitError(
            f"{cfg.train}: no {'pair' if preference_data.is_pairs(objective) else 'row'} is left to train on "
            f"({', '.join(f'{n} {why}' for why, n in stats['dropped'].items())}); raise data.max_length "
            f"({cfg.max_length}), or lower preference.max_prompt_length ({prompt_keeps})"
        )
    return train_ds, eval_ds, stats


def _tokenize_preference(
    conv: formats.Converted, tokenizer: Any, cfg: DataConfig, prompt_keeps: int
) -> tuple[datasets.Dataset, Counter]:
    return preference_data.tokenize(conv, tokenizer, cfg.max_length, prompt_keeps, _num_proc(cfg, len(conv.examples)))


def held_out_source(cfg: DataConfig, path: str | None = None) -> str | None:
    """The data `held_out` reads: `path`, else data.eval when it names data, else data.train when data.eval is a
    fraction of it; None when there is no held-out data."""
    if path is not None or isinstance(cfg.eval, str):
        return path or cfg.eval
    return cfg.train if cfg.eval is not None else None


def held_out(cfg: DataConfig, path: str | None = None, objective: str = "sft") -> formats.Converted:
    """Held-out examples as chats, for generation: `path`, else data.eval (a file, or the same
    seeded fraction of train that `prepare` holds out). Rows without an answer are kept.

    For a preference objective each pair is its prompt with the chosen answer as the reference (KTO: the rows
    labelled true; the others are counted in `dropped`)."""
    if objective != "sft":
        return _chats(_held_out_preference(cfg, path, objective))
    source = held_out_source(cfg, path)
    if source is None:
        raise LorakitError("no held-out data: set data.eval (a file or a fraction) or pass --data FILE")
    if path is None and not isinstance(cfg.eval, str):  # a seeded fraction of train
        return _split(_convert(sources.read(source, cfg.split, cfg.limit), cfg), cfg.eval, cfg.seed)[1]
    rows = sources.read(source, cfg.split)
    _fill_missing_answers(rows.records)
    return _convert(rows, cfg, keep_unanswered=True)


def held_out_preference(
    cfg: DataConfig,
    tokenizer: Any,
    objective: str,
    preference: PreferenceConfig | None,
    path: str | None = None,
    limit: int | None = None,
) -> datasets.Dataset:
    """Held-out pairs (or KTO rows) tokenized as `prepare` tokenizes them, from `path` or data.eval (a file or the
    seeded fraction of train), for their preference metrics (e.g. reward accuracy); with `limit`, only the first
    that many rows are tokenized."""
    render.setup_template(tokenizer, cfg.chat_template)
    conv = _held_out_preference(cfg, path, objective)
    if limit:
        conv = formats.Converted(conv.examples[:limit], conv.where[:limit], conv.format, conv.dropped)
    return _tokenize_preference(conv, tokenizer, cfg, preference_data.max_prompt_length(preference, cfg.max_length))[0]


def _held_out_preference(cfg: DataConfig, path: str | None, objective: str) -> formats.Converted:
    source = held_out_source(cfg, path)
    if source is None:
        raise LorakitError("no held-out data: set data.eval (a file or a fraction) or pass --data FILE")
    if path is None and not isinstance(cfg.eval, str):  # a seeded fraction of train
        rows = sources.read(source, cfg.split, cfg.limit)
        return _split(_convert_preference(rows, cfg, objective), cfg.eval, cfg.seed)[1]
    return _convert_preference(sources.read(source, cfg.split), cfg, objective)


def _chats(conv: formats.Converted) -> formats.Converted:
    out = formats.Converted([], [], conv.format, Counter(conv.dropped))
    for ex, where in zip(conv.examples, conv.where):
        if ex.get("label") is False:
            out.dropped["answer labelled false (not a reference)"] += 1
            continue
        out.examples.append({"messages": ex["prompt"] + ex.get("chosen", ex.get("completion")), "tools": ex["tools"]})
        out.where.append(where)
    return out


def _fill_missing_answers(records: list[dict]) -> None:
    # Prompt-only files (no reference answers) are valid for evaluation: give them empty answers so
    # that format detection and conversion treat them like any other row.
    for r in records:
        if "prompt" in r and "completion" not in r:
            r["completion"] = ""
        elif "instruction" in r and not {"output", "response"} & r.keys():
            r["output"] = ""
        elif (
            isinstance(r.get("messages"), list)
            and r["messages"]
            and isinstance(r["messages"][-1], dict)
            and r["messages"][-1].get("role") != "assistant"
        ):
            r["messages"] = [*r["messages"], {"role": "assistant", "content": ""}]


def _convert(rows: sources.Rows, cfg: DataConfig, keep_unanswered: bool = False) -> formats.Converted:
    try:
        conv = formats.convert(rows.records, rows.where, cfg.format, cfg.template, cfg.system_prompt, keep_unanswered)
        return _usable(conv, rows)
    except LorakitError as e:
        form = preference_data.detect(rows.records[0]) if rows.records else None
        if form is None:
            raise
        objective = "dpo or orpo" if form in preference_data.PAIR_FORMS else "kto"
        raise LorakitError(
            f"{e}\nThis data holds preference data: to train on it, set objective: {objective}."
        ) from None


def _convert_preference(rows: sources.Rows, cfg: DataConfig, objective: str) -> formats.Converted:
    return _usable(preference_data.convert(rows.records, rows.where, objective, cfg.format, cfg.system_prompt), rows)


def _usable(conv: formats.Converted, rows: sources.Rows) -> formats.Converted:
    if not conv.examples:
        reasons = ", ".join(f"{n} {why}" for why, n in conv.dropped.items())
        raise LorakitError(
            f"{rows.origin}: no usable rows left after filtering ({reasons}). Check that the "
            "answer column is filled, or pick another data.format / data.template."
        )
    return conv


def _split(conv: formats.Converted, fraction: float, seed: int) -> tuple[formats.Converted, formats.Converted]:
    n = len(conv.examples)
    n_eval = max(1, round(n * fraction))
    if n_eval >= n:
        raise LorakitError(f"data.eval={fraction} leaves no training rows out of {n}; use a smaller fraction")
    order = list(range(n))
    random.Random(seed).shuffle(order)

    def pick(idx: list[int]) -> formats.Converted:
        return formats.Converted([conv.examples[i] for i in idx], [conv.where[i] for i in idx], conv.format)

    train, ev = pick(sorted(order[n_eval:])), pick(sorted(order[:n_eval]))
    train.dropped = conv.dropped
    return train, ev


def _tokenize(conv: formats.Converted, tokenizer: Any, cfg: DataConfig) -> datasets.Dataset:
    end_ids = render.default_end_ids(tokenizer)

    def encode_batch(batch: dict[str, list]) -> dict[str, list]:
        out: dict[str, list] = {"input_ids": [], "labels": [], "truncated": [], "eos_added": []}
        for text, where in zip(batch["example"], batch["where"]):
            try:
                enc = render.encode(
                    tokenizer, json.loads(text), train_on=cfg.train_on, max_length=cfg.max_length, end_ids=end_ids
                )
            except LorakitError as e:
                raise LorakitError(f"{where}: {e}") from None
            out["input_ids"].append(enc.input_ids)
            out["labels"].append(enc.labels)
            out["truncated"].append(enc.truncated)
            out["eos_added"].append(enc.eos_added)
        return out

    raw = datasets.Dataset.from_dict(
        {"example": [json.dumps(e, ensure_ascii=False) for e in conv.examples], "where": conv.where}
    )
    return raw.map(
        encode_batch,
        batched=True,
        batch_size=256,
        num_proc=_num_proc(cfg, len(raw)),
        remove_columns=["example"],
        desc="Tokenizing",
        load_from_cache_file=False,
    )


def _num_proc(cfg: DataConfig, rows: int) -> int | None:
    # Extra processes pay off only on large sets: each one has to start and unpickle the tokenizer.
    return cfg.num_proc or (min(os.cpu_count() or 1, 8) if rows >= 20_000 else None)


def summarize(ds: datasets.Dataset, dropped: Counter, fmt: str, template: str, cfg: DataConfig) -> dict[str, Any]:
    """Counts that `data preview` prints and training logs: rows, tokens, trained share, truncation."""
    lengths = [len(x) for x in ds["input_ids"]]
    trained = sum(sum(1 for t in labels if t != render.IGNORE) for labels in ds["labels"])
    tokens = sum(lengths)
    no_target = sum(1 for labels in ds["labels"] if all(t == render.IGNORE for t in labels))
    return {
        "format": fmt,
        "chat_template": template,
        "train_on": cfg.train_on,
        "max_length": cfg.max_length,
        "rows": len(ds),
        "tokens": tokens,
        "trained_tokens": trained,
        "trained_share": trained / tokens if tokens else 0.0,
        "mean_length": tokens / len(ds) if len(ds) else 0.0,
        "max_seen_length": max(lengths, default=0),
        "truncated_rows": int(sum(ds["truncated"])),
        "rows_without_trained_token": no_target,
        "eos_added_turns": int(sum(ds["eos_added"])),
        "dropped": dict(dropped),
    }


def _check_trainable(stats: dict, cfg: DataConfig) -> None:
    if stats["trained_tokens"] == 0:
        raise LorakitError(
            f"{cfg.train}: no token would be trained ({stats['rows']} rows, train_on: "
            f"{cfg.train_on}). The answers may all be cut off by data.max_length="
            f"{cfg.max_length}; raise it, or use data.train_on: all."
        )


def _cache_key(
    cfg: DataConfig, tokenizer: Any, train: sources.Rows, ev: sources.Rows | None, preference: dict | None = None
) -> str:
    h = hashlib.sha256()
    settings = cfg.model_dump(mode="json", exclude={"train", "cache_dir", "num_proc"})
    parts = [CACHE_VERSION, settings, train.fingerprint, ev.fingerprint if ev else None]
    h.update(json.dumps([*parts, preference] if preference is not None else parts, sort_keys=True).encode())
    h.update(tokenizer_fingerprint(tokenizer).encode())
    return h.hexdigest()[:24]


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Vocabulary, merges, special tokens and chat template: anything that changes the token ids."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    parts = [
        type(tokenizer).__name__,
        backend.to_str() if backend else str(tokenizer.get_vocab()),
        str(tokenizer.chat_template),
        str(tokenizer.special_tokens_map),
        str(tokenizer.eos_token_id),
    ]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def _save(path: Path, train: datasets.Dataset, ev: datasets.Dataset | None, stats: dict) -> None:
    # Atomic: a run killed mid-write never leaves a cache that looks complete.
    datasets.disable_progress_bars()  # saving takes milliseconds; its bars would only add noise
    try:
        with files.atomic_dir(path) as tmp:
            train.save_to_disk(str(tmp / "train"))
            if ev is not None:
                ev.save_to_disk(str(tmp / "eval"))
            files.write_json(tmp / "stats.json", stats)
    finally:
        datasets.enable_progress_bars()
