"""Turn raw rows of any common data set shape into one internal form.

Every row becomes either a chat, `{"messages": [{"role", "content"}...], "tools": [...] | None}`,
or raw text for continued pre-training, `{"text": "..."}`. Rendering and masking (render.py) only
ever see that form, so each new data shape costs one converter here and nothing elsewhere.
"""

from __future__ import annotations

import json
import re
import string
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from lorakit.config import FORMATS, TemplateConfig
from lorakit.errors import LorakitError

# ShareGPT speaker names seen in the wild, mapped to OpenAI roles.
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bard": "assistant",
    "bing": "assistant",
    "model": "assistant",
    "function_call": "assistant",
    "observation": "tool",
    "tool": "tool",
    "function": "tool",
}
OPENAI_ROLES = ("system", "user", "assistant", "tool")


@dataclass
class Converted:
    """Examples in internal form, with where each came from and why others were left out."""

    examples: list[dict[str, Any]]
    where: list[str]
    format: str
    dropped: Counter = field(default_factory=Counter)


class Skip(Exception):
    """A row that is valid but has nothing to train on (e.g. an empty answer): counted, not fatal."""


def detect(columns: set[str]) -> str | None:
    """Guess the format from a row's column names."""
    if "messages" in columns:
        return "messages"
    if "conversations" in columns:
        return "sharegpt"
    if "instruction" in columns and ({"output", "response"} & columns):
        return "alpaca"
    if {"prompt", "completion"} <= columns:
        return "prompt_completion"
    if "text" in columns:
        return "text"
    return None


# Chat transcripts stored as one text column (guanaco and friends): parsed back into turns so that
# only the answers are trained, instead of the whole text as in continued pre-training.
_HUMAN_ASSISTANT = re.compile(r"###\s*(Human|Assistant)\s*:\s*")
_LLAMA2_TURN = re.compile(
    r"\s*(?:<s>)?\s*\[INST\]\s*(?:<<SYS>>\s*(.*?)\s*<</SYS>>\s*)?(.*?)\s*\[/INST\]\s*(.*?)\s*(?:</s>|(?=<s>)|(?=\[INST\])|$)",
    re.S,
)
# mlx-lm's WikiSQL text: a preamble (table, columns), then lines that open with "Q:" and "A:". Parsed only when
# data.format is chat_text: `auto` keeps such rows plain text, as mlx-lm trains them.
_QA_LINE = re.compile(r"^(Q|A):[ \t]*", re.M)
# Anthropic HH's transcripts: "\n\nHuman: …\n\nAssistant: …". Parsed only when asked (preference pairs in HH's text
# form): `auto` has always kept other text of this shape plain.
_HH_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):[ \t]?")


def parse_transcript(text: str, qa: bool = False, hh: bool = False) -> list[dict] | None:
    """Messages from a `### Human: … ### Assistant: …` or Llama-2 `<s>[INST] … [/INST] … </s>` text; with `qa`,
    also from a `Q: … A: …` one (its preamble opens the first question); with `hh`, also from Anthropic HH's
    `\n\nHuman: … \n\nAssistant: …`."""
    if hh and _HH_TURN.match(text.lstrip("\n")):
        parts = _HH_TURN.split(text.lstrip("\n"))[1:]
        roles = {"Human": "user", "Assistant": "assistant"}
        return [{"role": roles[who], "content": said.strip()} for who, said in zip(parts[::2], parts[1::2])]
    if _HUMAN_ASSISTANT.match(text.lstrip()):
        parts = _HUMAN_ASSISTANT.split(text.strip())[1:]
        roles = {"Human": "user", "Assistant": "assistant"}
        return [{"role": roles[who], "content": said.strip()} for who, said in zip(parts[::2], parts[1::2])]
    if text.lstrip().startswith(("<s>[INST]", "[INST]")):
        messages, pos = [], 0
        for m in _LLAMA2_TURN.finditer(text):
            if m.start() != pos:
                return None
            pos = m.end()
            if m.group(1):
                messages.append({"role": "system", "content": m.group(1)})
            messages += [{"role": "user", "content": m.group(2)}, {"role": "assistant", "content": m.group(3)}]
        return messages if pos == len(text) and messages else None
    return _parse_qa(text) if qa else None


def _parse_qa(text: str) -> list[dict] | None:
    preamble, *parts = _QA_LINE.split(text.strip())
    labels, said = parts[::2], [s.strip() for s in parts[1::2]]
    if not labels or labels != ["Q", "A"] * (len(labels) // 2) or not all(said):
        return None
    said[0] = f"{preamble.strip()}\n{said[0]}".strip()
    return [{"role": "user" if label == "Q" else "assistant", "content": s} for label, s in zip(labels, said)]


def convert(
    records: list[dict],
    where: list[str],
    fmt: str = "auto",
    template: TemplateConfig | None = None,
    system_prompt: str | None = None,
    keep_unanswered: bool = False,
) -> Converted:
    """Convert all rows; malformed rows raise LorakitError naming the row, empty ones are dropped.

    keep_unanswered: keep chats whose assistant answer is empty (evaluation of prompts without
    references); training drops them, since they have nothing to learn from.
    """
    if not records:
        raise LorakitError(f"no rows to read in {where[0] if where else 'the data source'}: the data set is empty")
    if fmt == "auto":
        fmt = "template" if template else _detect_all(records, where)
    if fmt == "template" and template is None:
        raise LorakitError(
            "data.format is 'template' but data.template is missing; add e.g.\n"
            "  template: {prompt: 'Rewrite politely: {toxic}', completion: '{neutral1}'}"
        )
    convert_row = _converter(fmt, template, set(records[0]), where[0])
    out = Converted([], [], fmt)
    for rec, loc in zip(records, where):
        try:
            ex = convert_row(rec, loc)
        except Skip as reason:
            out.dropped[str(reason)] += 1
            continue
        if (
            not keep_unanswered
            and "messages" in ex
            and not any(m["role"] == "assistant" and m["content"].strip() for m in ex["messages"])
        ):
            out.dropped["no assistant answer"] += 1
            continue
        if system_prompt and "messages" in ex and ex["messages"][0]["role"] != "system":
            ex["messages"].insert(0, {"role": "system", "content": system_prompt})
        out.examples.append(ex)
        out.where.append(loc)
    return out


def _detect_all(records: list[dict], where: list[str]) -> str:
    columns = set(records[0])
    fmt = detect(columns)
    if fmt == "text" and isinstance(records[0].get("text"), str) and parse_transcript(records[0]["text"]):
        fmt = "chat_text"
    if fmt is None:
        raise LorakitError(
            f"{where[0]}: cannot tell the data format from the columns {sorted(columns)}. Accepted: "
            "messages (OpenAI chat), conversations (ShareGPT), instruction+output|response (Alpaca), "
            "prompt+completion, text, or set data.format: template with data.template mapping your "
            "columns, e.g. {prompt: '...{question}...', completion: '{answer}'}."
        )
    return fmt


def _converter(fmt: str, template: TemplateConfig | None, columns: set[str], first: str) -> Callable:
    if fmt == "template":
        assert template is not None
        _check_template(template, columns, first)
        return lambda rec, loc: _from_template(rec, loc, template)
    table = {
        "messages": _from_messages,
        "sharegpt": _from_sharegpt,
        "alpaca": _from_alpaca,
        "prompt_completion": _from_prompt_completion,
        "text": _from_text,
        "chat_text": _from_chat_text,
    }
    if fmt not in table:
        raise LorakitError(f"data.format '{fmt}' is unknown; use one of {', '.join(FORMATS)}")
    return table[fmt]


def _field(rec: dict, key: str, loc: str, kind: type | tuple = str, fmt: str = "") -> Any:
    if key not in rec or rec[key] is None:
        raise LorakitError(
            f"{loc}: missing field '{key}'{f' (format {fmt})' if fmt else ''}; the row has "
            f"{sorted(rec)}. Fix or remove the row."
        )
    value = rec[key]
    if not isinstance(value, kind):
        want = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise LorakitError(f"{loc}: field '{key}' must be {want}, got {type(value).__name__}: {str(value)[:60]!r}")
    return value


def _chat(messages: list[dict], tools: Any = None) -> dict:
    # An assistant turn before any user turn answers nothing (ShareGPT fragments start so); drop it.
    first = next((i for i, m in enumerate(messages) if m["role"] != "system"), len(messages))
    while first < len(messages) and messages[first]["role"] == "assistant":
        del messages[first]
    return {"messages": messages, "tools": tools}


def _from_messages(rec: dict, loc: str) -> dict:
    raw = _field(rec, "messages", loc, list, "messages")
    messages = [openai_message(m, loc, f"messages[{i}]") for i, m in enumerate(raw)]
    return _chat(messages, tools_of(rec.get("tools"), loc))


def openai_message(m: Any, loc: str, key: str) -> dict:
    """One `{role, content}` message (OpenAI form) as `{"role", "content"}`; `key` names it in errors."""
    if not isinstance(m, dict) or "role" not in m or "content" not in m:
        raise LorakitError(f"{loc}: {key} must be an object with 'role' and 'content', got {str(m)[:80]!r}")
    if m["role"] not in OPENAI_ROLES:
        raise LorakitError(f"{loc}: {key}.role '{m['role']}' is not one of {', '.join(OPENAI_ROLES)}")
    content = m["content"]
    if content is None and m.get("tool_calls"):
        content = "\n".join(_tool_call_text(c.get("function", c)) for c in m["tool_calls"])
    if not isinstance(content, str):
        raise LorakitError(f"{loc}: {key}.content must be a string, got {type(content).__name__}")
    return {"role": m["role"], "content": content}


def _from_sharegpt(rec: dict, loc: str) -> dict:
    raw = _field(rec, "conversations", loc, list, "sharegpt")
    messages = []
    if isinstance(rec.get("system"), str) and rec["system"].strip():
        messages.append({"role": "system", "content": rec["system"]})
    messages += [sharegpt_turn(turn, loc, f"conversations[{i}]") for i, turn in enumerate(raw)]
    return _chat(messages, tools_of(rec.get("tools"), loc))


def sharegpt_turn(turn: Any, loc: str, key: str) -> dict:
    """One ShareGPT `{from, value}` turn as `{"role", "content"}`; `key` names it in errors."""
    if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
        raise LorakitError(f"{loc}: {key} must be an object with 'from' and 'value', got {str(turn)[:80]!r}")
    role = SHAREGPT_ROLES.get(str(turn["from"]).lower())
    if role is None:
        raise LorakitError(
            f"{loc}: {key}.from '{turn['from']}' is unknown; expected one of {', '.join(sorted(SHAREGPT_ROLES))}"
        )
    if not isinstance(turn["value"], str):
        raise LorakitError(f"{loc}: {key}.value must be a string")
    content = turn["value"]
    if turn["from"] == "function_call":
        # Tool calls are trained as assistant text in the Hermes/Qwen convention, so that the model
        # learns one unambiguous call syntax that a server can parse back.
        content = _tool_call_text(content)
    return {"role": role, "content": content}


def _tool_call_text(call: Any) -> str:
    if isinstance(call, str):
        try:
            call = json.loads(call)
        except json.JSONDecodeError:
            return f"<tool_call>\n{call}\n</tool_call>"
    return f"<tool_call>\n{json.dumps(call, ensure_ascii=False)}\n</tool_call>"


def tools_of(raw: Any, loc: str) -> list | None:
    """A row's `tools` field (a list, or its JSON text) as a list of tool definitions; None when it has none."""
    if raw in (None, "", []):
        return None
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as e:
            raise LorakitError(f"{loc}: field 'tools' is not valid JSON ({e.msg})") from None
    if not isinstance(raw, list):
        raise LorakitError(f"{loc}: field 'tools' must be a list of tool definitions")
    return raw


def _from_alpaca(rec: dict, loc: str) -> dict:
    instruction = _field(rec, "instruction", loc, str, "alpaca")
    answer_key = "response" if "response" in rec and "output" not in rec else "output"
    if rec.get(answer_key) is None:
        raise LorakitError(
            f"{loc}: missing field 'output' (or 'response') (format alpaca); the row has "
            f"{sorted(rec)}. Fix or remove the row."
        )
    answer = _field(rec, answer_key, loc, str, "alpaca")
    extra = rec.get("input") or ""
    if not isinstance(extra, str):
        raise LorakitError(f"{loc}: field 'input' must be a string")
    user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    messages = [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    if isinstance(rec.get("system"), str) and rec["system"].strip():
        messages.insert(0, {"role": "system", "content": rec["system"]})
    return _chat(messages)


def _from_prompt_completion(rec: dict, loc: str) -> dict:
    prompt = _field(rec, "prompt", loc, (str, list), "prompt_completion")
    completion = _field(rec, "completion", loc, (str, list), "prompt_completion")
    # TRL's conversational variant: prompt and completion are lists of messages.
    prompt_msgs = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
    completion_msgs = completion if isinstance(completion, list) else [{"role": "assistant", "content": completion}]
    return _from_messages({"messages": prompt_msgs + completion_msgs}, loc)


def _from_text(rec: dict, loc: str) -> dict:
    text = _field(rec, "text", loc, str, "text")
    if not text.strip():
        raise Skip("empty text")
    return {"text": text}


def _from_chat_text(rec: dict, loc: str) -> dict:
    messages = parse_transcript(_field(rec, "text", loc, str, "chat_text"), qa=True)
    if not messages:
        raise Skip("text is not a Human/Assistant, [INST] or Q/A transcript")
    return _chat(messages)


def _template_fields(fmt: str) -> set[str]:
    return {name.split(".")[0].split("[")[0] for _, name, _, _ in string.Formatter().parse(fmt) if name}


def _check_template(t: TemplateConfig, columns: set[str], first: str) -> None:
    for key in ("system", "prompt", "completion"):
        fmt = getattr(t, key)
        if fmt is None:
            continue
        try:
            names = _template_fields(fmt)
        except ValueError as e:
            raise LorakitError(
                f"data.template.{key}: bad format string {fmt!r} ({e}); write columns as "
                "{column} and literal braces as {{ }}"
            ) from None
        missing = names - columns
        if missing:
            raise LorakitError(
                f"data.template.{key} names column(s) {sorted(missing)} that the data does not "
                f"have ({first}); columns found: {sorted(columns)}"
            )


def _from_template(rec: dict, loc: str, t: TemplateConfig) -> dict:
    def fill(key: str) -> str:
        try:
            return getattr(t, key).format_map({k: "" if v is None else v for k, v in rec.items()})
        except KeyError as e:
            raise LorakitError(
                f"{loc}: data.template.{key} names column {e} that this row lacks; the row has {sorted(rec)}"
            ) from None
        except (ValueError, TypeError, IndexError, AttributeError) as e:  # e.g. {n:d} on a CSV's text value
            raise LorakitError(
                f"{loc}: data.template.{key} {getattr(t, key)!r} cannot be filled from this row "
                f"({e}). CSV/TSV values are text: use plain {{column}} fields"
            ) from None

    completion = fill("completion")
    if not completion.strip():
        raise Skip("empty completion")
    messages = [{"role": "user", "content": fill("prompt")}, {"role": "assistant", "content": completion}]
    if t.system:
        messages.insert(0, {"role": "system", "content": fill("system")})
    return _chat(messages)
