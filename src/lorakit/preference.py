"""Preference data (objective dpo, orpo or kto): the forms users bring, converted to one internal form, tokenized.

Every row becomes one of two forms (chats in formats.py's message form):
- a pair (dpo, orpo): `{"prompt": [messages], "chosen": [assistant messages], "rejected": [assistant messages],
  "tools": list | None}`, the prompt ending with the user's (or a tool's) turn that both answers reply to;
- a KTO row: `{"prompt": [messages], "completion": [assistant messages], "label": bool, "tools": list | None}`.

Tokenized (with the run's chat template), a pair is two sequences, prompt + chosen answer and prompt + rejected
answer, whose labels train the answer's tokens and its end-of-turn token only (render.IGNORE on the prompt).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from typing import Any

import datasets

from lorakit import formats, render
from lorakit.config import PreferenceConfig
from lorakit.errors import LorakitError

PAIR_FORMS = ("prompt", "implicit", "sharegpt", "alpaca")  # how the pair forms are named in stats and messages
KTO_FORMS = ("prompt_completion", "messages")
PAIR_COLUMNS = ("chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels")
KTO_COLUMNS = ("input_ids", "labels", "label")
ACCEPTED = (
    "pairs: prompt/chosen/rejected (TRL, strings or lists of messages), chosen/rejected whole chats sharing "
    "their prompt (Anthropic HH, also its '\\n\\nHuman: ... \\n\\nAssistant: ...' text), ShareGPT conversations "
    "plus chosen/rejected messages, or Alpaca instruction(/input) plus chosen/rejected; KTO: prompt/completion/label "
    "or messages/label"
)


def detect(columns: set[str] | Any) -> str | None:
    """The preference form of a row with these columns: one of PAIR_FORMS or KTO_FORMS, or None."""
    if {"chosen", "rejected"} <= set(columns):
        if "conversations" in columns:
            return "sharegpt"
        if "instruction" in columns:
            return "alpaca"
        return "prompt" if "prompt" in columns else "implicit"
    if "label" in columns:
        if {"prompt", "completion"} <= set(columns):
            return "prompt_completion"
        if "messages" in columns:
            return "messages"
    return None


def is_pairs(objective: str) -> bool:
    """Whether the objective trains on pairs (dpo, orpo) rather than labelled rows (kto)."""
    return objective != "kto"


def max_prompt_length(preference: PreferenceConfig | None, max_length: int) -> int:
    """The tokens a prompt keeps at least when prompt + answer exceed max_length: preference.max_prompt_length,
    default half of data.max_length."""
    chosen = preference.max_prompt_length if preference is not None else None
    return min(chosen if chosen is not None else max_length // 2, max_length - 1)  # the answers need a token


# ---- reading: any form to the internal one ----
def convert(
    records: list[dict], where: list[str], objective: str, fmt: str = "auto", system_prompt: str | None = None
) -> formats.Converted:
    """Convert all rows to pairs (dpo, orpo) or KTO rows; a malformed row raises LorakitError naming it, a row with
    an empty answer is dropped and counted."""
    if not records:
        raise LorakitError(f"no rows to read in {where[0] if where else 'the data source'}: the data set is empty")
    form = detect(records[0])
    _check_form(form, set(records[0]), where[0], objective, fmt)
    convert_row = CONVERTERS[form]
    out = formats.Converted([], [], f"{'preference' if form in PAIR_FORMS else 'kto'} ({form})")
    for rec, loc in zip(records, where):
        try:
            ex = convert_row(rec, loc)
        except formats.Skip as reason:
            out.dropped[str(reason)] += 1
            continue
        if system_prompt and ex["prompt"][0]["role"] != "system":
            ex["prompt"].insert(0, {"role": "system", "content": system_prompt})
        out.examples.append(ex)
        out.where.append(loc)
    return out


def _check_form(form: str | None, columns: set[str], first: str, objective: str, fmt: str) -> None:
    if form is None:
        raise LorakitError(
            f"{first}: cannot tell the preference data format from the columns {sorted(columns)} (objective "
            f"{objective}, data.format {fmt}). Accepted: {ACCEPTED}."
        )
    if is_pairs(objective) and form in KTO_FORMS:
        raise LorakitError(
            f"{first}: this data holds answers labelled good or bad (a 'label' column: KTO data), not pairs; "
            f"objective {objective} compares a chosen and a rejected answer to each prompt. Set objective: kto, or "
            "give pairs (e.g. prompt/chosen/rejected)."
        )
    if not is_pairs(objective) and form in PAIR_FORMS:
        raise LorakitError(
            f"{first}: this data holds pairs (chosen/rejected columns), not answers labelled good or bad; use "
            "objective: dpo or orpo for pairs, or give KTO rows (prompt/completion/label or messages/label) to "
            "objective kto."
        )


def _pair(prompt: list[dict], chosen: list[dict], rejected: list[dict], tools: Any, loc: str, key: str) -> dict:
    _check_prompt(prompt, loc, key)
    if not _answered(chosen) or not _answered(rejected):
        raise formats.Skip("empty chosen or rejected answer")
    if chosen == rejected:
        raise _same(loc)
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "tools": tools}


def _same(loc: str) -> LorakitError:
    return LorakitError(
        f"{loc}: 'chosen' and 'rejected' are the same answer, so the pair prefers nothing; a pair needs two "
        "different answers to its prompt. Fix or remove the row."
    )


def _kto(prompt: list[dict], completion: list[dict], rec: dict, loc: str, key: str) -> dict:
    _check_prompt(prompt, loc, key)
    label = rec.get("label")
    if isinstance(label, str) and label.strip().lower() in ("true", "false"):
        label = label.strip().lower() == "true"  # CSV and TSV values are text
    if not isinstance(label, bool):
        raise LorakitError(
            f"{loc}: field 'label' must be true (a desirable answer) or false (an undesirable one), got "
            f"{json.dumps(label, default=str)[:60]}. Fix or remove the row."
        )
    if not _answered(completion):
        raise formats.Skip("empty answer")
    return {
        "prompt": prompt,
        "completion": completion,
        "label": label,
        "tools": formats.tools_of(rec.get("tools"), loc),
    }


def _answered(answer: list[dict]) -> bool:
    return bool(answer) and all(m["content"].strip() for m in answer)


def _check_prompt(prompt: list[dict], loc: str, key: str) -> None:
    if not any(m["role"] != "system" and m["content"].strip() for m in prompt):
        raise LorakitError(
            f"{loc}: no prompt: '{key}' is missing or empty, and every row needs the prompt its answers reply "
            "to. Fix or remove the row."
        )
    if prompt[-1]["role"] not in ("user", "tool"):
        raise LorakitError(
            f"{loc}: the prompt ('{key}') ends with a {prompt[-1]['role']} turn; it must end with the user's (or a "
            "tool's) turn that the answers reply to. Fix or remove the row."
        )


def _answer(rec: dict, key: str, loc: str) -> list[dict]:
    """The answer in `rec[key]` as assistant messages: a string, one message ({role, content} or ShareGPT's
    {from, value}) or a list of them."""
    value = rec.get(key)
    if value is None:
        raise LorakitError(f"{loc}: missing field '{key}'; the row has {sorted(rec)}. Fix or remove the row.")
    if isinstance(value, str):
        return [{"role": "assistant", "content": value}]
    items = value if isinstance(value, list) else [value]
    out = []
    for i, m in enumerate(items):
        name = f"{key}[{i}]" if isinstance(value, list) else key
        msg = formats.sharegpt_turn(m, loc, name) if isinstance(m, dict) and "from" in m else None
        msg = msg or formats.openai_message(m, loc, name)
        if msg["role"] != "assistant":
            raise LorakitError(
                f"{loc}: {name} is a {msg['role']} turn, but '{key}' holds the answer (assistant turns) only; "
                "put the conversation before the answer in the prompt"
            )
        out.append(msg)
    return out


def _messages(value: Any, loc: str, key: str) -> list[dict]:
    """A prompt or chat given as a list of {role, content} messages."""
    if not isinstance(value, list):
        raise LorakitError(f"{loc}: field '{key}' must be a string or a list of messages, got {type(value).__name__}")
    return [formats.openai_message(m, loc, f"{key}[{i}]") for i, m in enumerate(value)]


def _from_prompt(rec: dict, loc: str) -> dict:
    if _whole(rec.get("chosen")) and _whole(rec.get("rejected")):
        # Whole chats beside a prompt column that repeats their start (TRL's maybe_extract_prompt): the chats rule.
        return _from_implicit(rec, loc)
    prompt = rec.get("prompt")
    if isinstance(prompt, str):
        messages = [{"role": "user", "content": prompt}]
        if isinstance(rec.get("system"), str) and rec["system"].strip():
            messages.insert(0, {"role": "system", "content": rec["system"]})
    else:
        messages = _messages(prompt or [], loc, "prompt")
    tools = formats.tools_of(rec.get("tools"), loc)
    return _pair(messages, _answer(rec, "chosen", loc), _answer(rec, "rejected", loc), tools, loc, "prompt")


def _whole(value: Any) -> bool:
    """Whether an answer column holds a whole chat (it opens with a system or user turn), not just the answer."""
    first = value[0] if isinstance(value, list) and value else None
    return isinstance(first, dict) and first.get("role") in ("system", "user")


def _from_implicit(rec: dict, loc: str) -> dict:
    chosen, rejected = _whole_chat(rec, "chosen", loc), _whole_chat(rec, "rejected", loc)
    if chosen == rejected:
        raise _same(loc)
    n = next(i for i in range(len(chosen) + 1) if i == len(chosen) or i == len(rejected) or chosen[i] != rejected[i])
    if n == 0:
        raise LorakitError(
            f"{loc}: no prompt: 'chosen' and 'rejected' share no turn (their first turns differ), and the row has "
            "no 'prompt' column. Give chats that repeat the prompt, or a 'prompt' column."
        )
    for key, chat in (("chosen", chosen), ("rejected", rejected)):
        other = next((m["role"] for m in chat[n:] if m["role"] != "assistant"), None)
        if other is not None:
            raise LorakitError(
                f"{loc}: 'chosen' and 'rejected' differ from turn {n} on, and '{key}' goes on with a {other} turn "
                "after that; they may differ only in their final answer (the turns before it are the prompt)"
            )
    return _pair(chosen[:n], chosen[n:], rejected[n:], formats.tools_of(rec.get("tools"), loc), loc, "chosen")


def _whole_chat(rec: dict, key: str, loc: str) -> list[dict]:
    value = rec.get(key)
    if isinstance(value, str):
        chat = formats.parse_transcript(value, hh=True)
        if chat is None:
            raise LorakitError(
                f"{loc}: no prompt: the row has no 'prompt' column and '{key}' is text that is not a "
                "'\\n\\nHuman: ... \\n\\nAssistant: ...' transcript. Give a 'prompt' column, or chats (lists of "
                "messages) as chosen and rejected."
            )
        return chat
    if value is None:
        raise LorakitError(f"{loc}: missing field '{key}'; the row has {sorted(rec)}. Fix or remove the row.")
    return _messages(value, loc, key)


def _from_sharegpt(rec: dict, loc: str) -> dict:
    # formats reads the conversation (system turn, role names, tools) as it does for sft.
    conv = {k: v for k, v in rec.items() if k not in ("chosen", "rejected")}
    chat = formats.convert([conv], [loc], "sharegpt", keep_unanswered=True).examples[0]
    return _pair(
        chat["messages"],
        _answer(rec, "chosen", loc),
        _answer(rec, "rejected", loc),
        chat["tools"],
        loc,
        "conversations",
    )


def _from_alpaca(rec: dict, loc: str) -> dict:
    # formats builds the prompt (system, instruction and input) as it does for sft; the answer is a stand-in.
    chat = formats.convert([{**rec, "output": "-"}], [loc], "alpaca").examples[0]
    prompt = chat["messages"][:-1]
    return _pair(prompt, _answer(rec, "chosen", loc), _answer(rec, "rejected", loc), None, loc, "instruction")


def _from_kto_prompt_completion(rec: dict, loc: str) -> dict:
    prompt = rec.get("prompt")
    messages = (
        [{"role": "user", "content": prompt}] if isinstance(prompt, str) else _messages(prompt or [], loc, "prompt")
    )
    return _kto(messages, _answer(rec, "completion", loc), rec, loc, "prompt")


def _from_kto_messages(rec: dict, loc: str) -> dict:
    chat = formats.convert([rec], [loc], "messages", keep_unanswered=True).examples[0]["messages"]
    if chat and chat[-1]["role"] != "assistant":
        raise LorakitError(
            f"{loc}: 'messages' must end with the assistant's answer that 'label' judges; it ends with a "
            f"{chat[-1]['role']} turn. Fix or remove the row."
        )
    return _kto(chat[:-1], chat[-1:], rec, loc, "messages")


CONVERTERS: dict[str, Callable[[dict, str], dict]] = {
    "prompt": _from_prompt,
    "implicit": _from_implicit,
    "sharegpt": _from_sharegpt,
    "alpaca": _from_alpaca,
    "prompt_completion": _from_kto_prompt_completion,
    "messages": _from_kto_messages,
}


# ---- tokenizing: sequences, masks, truncation ----
def tokenize(
    conv: formats.Converted, tokenizer: Any, max_length: int, prompt_keeps: int, num_proc: int | None
) -> tuple[datasets.Dataset, Counter]:
    """Pairs to columns chosen_input_ids, chosen_labels, rejected_input_ids, rejected_labels, prompt_len,
    truncated, eos_added, where (KTO rows: input_ids, labels, label, ...); with the pairs dropped, by reason.

    Each sequence is prompt + answer, at most `max_length` tokens; labels are unshifted (labels[i] is the target of
    position i) and IGNORE on the prompt. `prompt_len` is the length of the prompt both sequences of a pair share.
    """
    pairs = bool(conv.examples) and "chosen" in conv.examples[0]
    end_ids = render.default_end_ids(tokenizer)
    columns = [*(PAIR_COLUMNS if pairs else KTO_COLUMNS), "prompt_len", "truncated", "eos_added", "dropped"]

    def encode_batch(batch: dict[str, list]) -> dict[str, list]:
        out: dict[str, list] = {c: [] for c in columns}
        for text, where in zip(batch["example"], batch["where"]):
            try:
                row = encode(tokenizer, json.loads(text), max_length, prompt_keeps, end_ids)
            except LorakitError as e:
                raise LorakitError(f"{where}: {e}") from None
            for c in columns:
                out[c].append(row[c])
        return out

    raw = datasets.Dataset.from_dict(
        {"example": [json.dumps(e, ensure_ascii=False) for e in conv.examples], "where": conv.where}
    )
    ds = raw.map(
        encode_batch,
        batched=True,
        batch_size=256,
        num_proc=num_proc,
        remove_columns=["example"],
        desc="Tokenizing",
        load_from_cache_file=False,
    )
    dropped = Counter(reason for reason in ds["dropped"] if reason)
    if dropped:
        keep = [i for i, reason in enumerate(ds["dropped"]) if not reason]
        ds = ds.select(keep)
    return ds.remove_columns("dropped"), dropped


def encode(tokenizer: Any, row: dict, max_length: int, prompt_keeps: int, end_ids: set[int]) -> dict[str, Any]:
    """One pair or KTO row as token columns (see `tokenize`), and `dropped`: why it cannot be trained, or ""."""
    keys = ("chosen", "rejected") if "chosen" in row else ("completion",)
    prompt_ids = render.prompt_ids(tokenizer, row["prompt"], row.get("tools"))
    encoded = [_answer_ids(tokenizer, row["prompt"], row[k], row.get("tools"), end_ids) for k in keys]
    # Where the answers start: the prompt's own ids, as far as both full chats begin with them (a token may merge
    # across the boundary, as in TRL); the prompt's tokens are never trained (render: only the answer turns are).
    shared = min(_common(prompt_ids, enc.input_ids) for enc in encoded)
    prompt = encoded[0].input_ids[:shared]
    answers = [(enc.input_ids[shared:], enc.labels[shared:]) for enc in encoded]
    # Truncation keeps the prompt's end (what the answer replies to): answers are cut at their end to what leaves
    # the prompt at least `prompt_keeps` tokens (or all of a shorter one), then the prompt loses its start.
    room = max_length - min(len(prompt), prompt_keeps)
    cut = any(len(ids) > room for ids, _ in answers)
    answers = [(ids[:room], labels[:room]) for ids, labels in answers]
    keep = max_length - max(len(ids) for ids, _ in answers)
    cut = cut or len(prompt) > keep
    prompt = prompt[len(prompt) - keep :] if len(prompt) > keep else prompt
    out: dict[str, Any] = {
        "prompt_len": len(prompt),
        "truncated": cut,
        "eos_added": sum(enc.eos_added for enc in encoded),
        "dropped": _unusable(answers),
    }
    for key, (ids, labels) in zip(keys, answers):
        name = "" if key == "completion" else f"{key}_"
        out[f"{name}input_ids"] = prompt + ids
        out[f"{name}labels"] = [render.IGNORE] * len(prompt) + labels
    if "label" in row:
        out["label"] = row["label"]
    return out


def _answer_ids(tokenizer: Any, prompt: list[dict], answer: list[dict], tools: Any, end_ids: set[int]) -> Any:
    enc = render.encode(
        tokenizer, {"messages": prompt + answer, "tools": tools}, end_ids=end_ids, answer_turns=len(answer)
    )
    # The template's separator after the answer's end token is never trained: leave it out of the sequence.
    trained = [i for i, label in enumerate(enc.labels) if label != render.IGNORE]
    end = trained[-1] + 1 if trained else len(enc.input_ids)
    enc.input_ids, enc.labels = enc.input_ids[:end], enc.labels[:end]
    return enc


def _common(a: list[int], b: list[int]) -> int:
    if a == b[: len(a)]:  # the usual case, at C speed
        return len(a)
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _unusable(answers: list[tuple[list[int], list[int]]]) -> str:
    if any(all(label == render.IGNORE for label in labels) for _, labels in answers):
        return "answer cut off by data.max_length"
    if len(answers) == 2 and answers[0] == answers[1]:
        return "chosen and rejected identical within data.max_length"
    return ""


def summarize(
    ds: datasets.Dataset,
    dropped: Counter,
    fmt: str,
    template: str,
    max_length: int,
    prompt_keeps: int,
    objective: str,
) -> dict[str, Any]:
    """What `data preview` prints and training logs: rows (pairs), tokens of every sequence, truncation, drops."""
    sides = ("chosen_", "rejected_") if is_pairs(objective) else ("",)
    lengths = [len(x) for s in sides for x in ds[f"{s}input_ids"]]
    trained = sum(sum(1 for t in labels if t != render.IGNORE) for s in sides for labels in ds[f"{s}labels"])
    tokens = sum(lengths)
    stats: dict[str, Any] = {
        "objective": objective,
        "format": fmt,
        "chat_template": template,
        "train_on": "completions",
        "max_length": max_length,
        "max_prompt_length": prompt_keeps,
        "rows": len(ds),
        "sequences": len(lengths),
        "tokens": tokens,
        "trained_tokens": trained,
        "trained_share": trained / tokens if tokens else 0.0,
        "mean_length": tokens / len(lengths) if lengths else 0.0,
        "max_seen_length": max(lengths, default=0),
        "truncated_rows": int(sum(ds["truncated"])),
        "rows_without_trained_token": 0,  # such rows are dropped (see dropped)
        "eos_added_turns": int(sum(ds["eos_added"])),
        "dropped": dict(dropped),
    }
    if not is_pairs(objective):
        stats["desirable"] = int(sum(ds["label"]))
        stats["undesirable"] = len(ds) - stats["desirable"]
    return stats
