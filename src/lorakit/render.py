"""Render chats with a chat template and tokenize them into `input_ids` and `labels`.

Which tokens are trained is decided from character offsets: each assistant turn's span in the rendered
text is found by rendering the chat up to that turn (with and without it), and every token whose
offsets overlap a span is trained. This never searches decoded text for markers, so it is right for
any tokenizer, including ones whose tokens straddle the turn boundary.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from jinja2.exceptions import TemplateError

from lorakit.errors import LorakitError

IGNORE = -100  # PyTorch's cross_entropy ignore_index: positions that do not contribute to the loss

# Fallback templates, for tokenizers without one (base models) or when forced with data.chat_template.
# Each ends every assistant turn with the EOS token, so the trained model learns to stop.
FALLBACK_TEMPLATES = {
    "chatml": (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] }}"
        "{% if m['role'] == 'assistant' and eos_token != '<|im_end|>' %}{{ '<|im_end|>' + eos_token + '\n' }}"
        "{% else %}{{ '<|im_end|>\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    "alpaca": (
        "{% for m in messages %}"
        "{% if m['role'] == 'system' %}{{ m['content'] + '\n\n' }}"
        "{% elif m['role'] == 'assistant' %}{{ '### Response:\n' + m['content'] + eos_token + '\n\n' }}"
        "{% else %}{{ '### Instruction:\n' + m['content'] + '\n\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '### Response:\n' }}{% endif %}"
    ),
    "llama2": (
        "{% if messages and messages[0]['role'] == 'system' %}"
        "{% set sys = '<<SYS>>\n' + messages[0]['content'] + '\n<</SYS>>\n\n' %}{% set rest = messages[1:] %}"
        "{% else %}{% set sys = '' %}{% set rest = messages %}{% endif %}"
        "{% for m in rest %}{% if m['role'] == 'assistant' %}{{ ' ' + m['content'].strip() + ' ' + eos_token }}"
        "{% else %}{{ bos_token + '[INST] ' + (sys if loop.first else '') + m['content'].strip() + ' [/INST]' }}"
        "{% endif %}{% endfor %}"
    ),
    "zephyr": (
        "{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] }}"
        "{% if m['role'] == 'assistant' %}{{ eos_token }}{% else %}{{ '</s>' if eos_token != '</s>' else eos_token }}"
        "{% endif %}{{ '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
    ),
}


@dataclass
class Encoded:
    """One tokenized example. `labels[i]` is the target of position i before the usual shift-by-one."""

    input_ids: list[int]
    labels: list[int]
    truncated: bool = False
    eos_added: int = 0


def setup_template(tokenizer: Any, name: str = "auto") -> str:
    """Make sure the tokenizer has a chat template; returns the name of the one in use."""
    if name == "auto":
        if getattr(tokenizer, "chat_template", None):
            return "tokenizer"
        name = "chatml"
    if name not in FALLBACK_TEMPLATES:
        raise LorakitError(
            f"data.chat_template '{name}' is unknown; use 'auto' or one of {', '.join(FALLBACK_TEMPLATES)}"
        )
    tokenizer.chat_template = FALLBACK_TEMPLATES[name]
    return name


def encode(
    tokenizer: Any,
    example: dict,
    *,
    train_on: str = "completions",
    max_length: int | None = None,
    end_ids: set[int] | None = None,
    answer_turns: int | None = None,
) -> Encoded:
    """Tokenize one example (chat or text) and build its labels.

    `end_ids` are the tokens accepted as the end of an assistant turn (EOS and the template's turn
    terminator). When a turn's last trained token is none of them, EOS is inserted after it: without
    it the fine-tuned model never learns to stop. `answer_turns`: train only the chat's last N assistant
    turns (a preference answer; the prompt's earlier answers are context), default all of them.
    """
    if "text" in example:
        enc = _encode_text(tokenizer, example["text"])
    else:
        enc = _encode_chat(
            tokenizer,
            example["messages"],
            example.get("tools"),
            train_on,
            end_ids if end_ids is not None else default_end_ids(tokenizer),
            answer_turns,
        )
    if max_length and len(enc.input_ids) > max_length:
        enc.input_ids, enc.labels, enc.truncated = enc.input_ids[:max_length], enc.labels[:max_length], True
    return enc


def special_ids(tokenizer: Any) -> set[int]:
    """Ids of the special tokens: the named ones (EOS, BOS, pad…) and every added token marked special."""
    return set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}


def default_end_ids(tokenizer: Any) -> set[int]:
    """EOS plus every special token: chat templates end turns with one (`<|im_end|>`, `<end_of_turn>`...)."""
    ids = special_ids(tokenizer)
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    # Padding and BOS never end an answer; counting them would hide a template that drops EOS.
    ids -= {tokenizer.bos_token_id, tokenizer.unk_token_id}
    if tokenizer.pad_token_id != tokenizer.eos_token_id:
        ids.discard(tokenizer.pad_token_id)
    return ids


def template_name(tokenizer: Any, base_template: str | None = None) -> str | None:
    """What a tokenizer's chat template is, in a word: a fallback's name, "base" (the base model's own),
    "custom" (another template the tokenizer carries), or None (none: it cannot render chats)."""
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        return None
    named = next((name for name, text in FALLBACK_TEMPLATES.items() if text == template), None)
    return named or ("base" if template == base_template else "custom")


def prompt_ids(tokenizer: Any, messages: list[dict], tools: list | None = None) -> list[int]:
    """A chat as the ids the model reads before answering: rendered up to the generation prompt, as in training.

    Every stage that answers chats (generate and eval, serve, merge's parity check, the GGUF proof) takes its
    prompts from here, so the server's greedy answers equal `generate`'s by construction.
    """
    text = render(tokenizer, messages, tools, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]  # the template holds any BOS


def end_of_turn_id(tokenizer: Any) -> int | None:
    """The special token the chat template closes an assistant turn with (`<|im_end|>`, `<|eot_id|>`).

    It is what a fine-tuned model learned to emit when done (lorakit trains on it), and it is not always
    the tokenizer's EOS (a base model's EOS is often `<|endoftext|>`).
    """
    answer = "lorakit-end-of-turn-probe"
    try:
        text = render(tokenizer, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": answer}])
    except (TemplateError, ValueError):  # no template, or one that refuses this chat
        return None
    after = tokenizer(text[text.rfind(answer) + len(answer) :], add_special_tokens=False)["input_ids"]
    return next((i for i in after if i in special_ids(tokenizer)), None)


def stop_ids(tokenizer: Any, generation_config: Any = None) -> list[int]:
    """The ids that end an answer: the template's end of turn, the tokenizer's EOS and the model's own EOS ids.

    Chat models often end a turn with a token other than the tokenizer's EOS (Llama 3's <|eot_id|>); the
    generation config lists those. One list for generate, serve, merge's saved config and the GGUF proof.
    """
    eos = getattr(generation_config, "eos_token_id", None)
    ids = [end_of_turn_id(tokenizer), tokenizer.eos_token_id, *(eos if isinstance(eos, list) else [eos])]
    return list(dict.fromkeys(i for i in ids if i is not None))


def split(messages: list[dict]) -> tuple[list[dict], str | None]:
    """A held-out chat as (prompt, reference): the turns before its last assistant turn, and that turn's text.

    A chat with no assistant turn is all prompt, with no reference.
    """
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None:
        return list(messages), None
    return messages[:last], messages[last]["content"] or None


def _encode_text(tokenizer: Any, text: str) -> Encoded:
    ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    if tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
        ids.append(tokenizer.eos_token_id)  # documents end with EOS, as in pre-training
    return Encoded(ids, list(ids))


def render(tokenizer: Any, messages: list[dict], tools: list | None = None, add_generation_prompt: bool = False) -> str:
    """The chat as text, exactly as the model sees it; tools go to the template or the system turn."""
    if tools and "tools" not in (tokenizer.chat_template or ""):
        # This template cannot show tools: describe them in the system turn instead (Hermes style).
        text = (
            "You can call these tools:\n<tools>\n"
            + "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
            + '\n</tools>\nTo call one, answer with <tool_call>{"name": ..., "arguments": ...}</tool_call>.'
        )
        if messages and messages[0]["role"] == "system":
            messages = [{"role": "system", "content": messages[0]["content"] + "\n\n" + text}, *messages[1:]]
        else:
            messages = [{"role": "system", "content": text}, *messages]
        tools = None
    if not messages and not add_generation_prompt:
        return ""
    return tokenizer.apply_chat_template(
        messages, tools=tools, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def assistant_spans(
    tokenizer: Any, messages: list[dict], tools: list | None, last: int | None = None
) -> tuple[str, list[tuple[int, int]]]:
    """Rendered text and the [start, end) character span of every assistant turn (content + end token); with
    `last`, of the last `last` assistant turns only (each span costs two renders of the chat up to it)."""
    full = render(tokenizer, messages, tools)
    spans = []
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    for i in turns[len(turns) - last :] if last is not None else turns:
        before = render(tokenizer, messages[:i], tools, add_generation_prompt=True) if i else ""
        through = render(tokenizer, messages[: i + 1], tools)
        if not (full.startswith(through) and through.startswith(before)):
            raise LorakitError(
                "the chat template renders a conversation differently from its own beginning, so the "
                "assistant turns cannot be located (templates that rewrite earlier turns, such as ones "
                "that drop past reasoning, do this). Set data.chat_template to chatml or another fallback."
            )
        # Trailing newlines after the end token belong to the template's separator, not the answer.
        spans.append((len(before), len(through.rstrip())))
    return full, spans


def _encode_chat(
    tokenizer: Any,
    messages: list[dict],
    tools: list | None,
    train_on: str,
    end_ids: set[int],
    answer_turns: int | None = None,
) -> Encoded:
    try:
        full, spans = assistant_spans(tokenizer, messages, tools, answer_turns)
    except TemplateError as e:
        raise LorakitError(
            f"the chat template refused this conversation: {e}. Roles found: "
            f"{[m['role'] for m in messages]}. Use data.chat_template: chatml for chats "
            "with system or tool turns that this template does not accept."
        ) from None
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    if train_on == "all":
        return Encoded(list(ids), list(ids))
    labels = [IGNORE] * len(ids)
    last_of_span = []
    for start, end in spans:
        last = None
        for t, (a, b) in enumerate(offsets):
            # A token is trained when it overlaps the span (b > start) and begins before its end.
            if b > start and a < end and b > a:
                labels[t] = ids[t]
                last = t
        if last is not None:
            last_of_span.append(last)
    added = 0
    for t in reversed(last_of_span):  # insert from the back so earlier positions stay valid
        if ids[t] not in end_ids and tokenizer.eos_token_id is not None:
            ids.insert(t + 1, tokenizer.eos_token_id)
            labels.insert(t + 1, tokenizer.eos_token_id)
            added += 1
    return Encoded(list(ids), labels, eos_added=added)
