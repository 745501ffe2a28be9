"""`lorakit data preview`: show exactly which tokens will be trained, and whether the data is healthy."""

from __future__ import annotations

import sys
from typing import Any, TextIO

from lorakit.render import IGNORE

GREEN, DIM, YELLOW, RESET = "\033[32;1m", "\033[2m", "\033[33;1m", "\033[0m"
WARN_TRAINED_SHARE = 0.05


def show_example(tokenizer: Any, input_ids: list[int], labels: list[int], color: bool) -> str:
    """The example's text with trained spans in green (terminal) or inside [[...]] (files, pipes)."""
    out, run, trained = [], [], None
    for tok, lab in zip(input_ids, labels):
        flag = lab != IGNORE
        if trained is not None and flag != trained:
            out.append(_mark(tokenizer.decode(run), trained, color))
            run = []
        run.append(tok)
        trained = flag
    if run:
        out.append(_mark(tokenizer.decode(run), bool(trained), color))
    return "".join(out)


def _mark(text: str, trained: bool, color: bool) -> str:
    if color:
        return f"{GREEN}{text}{RESET}" if trained else f"{DIM}{text}{RESET}"
    return f"[[{text}]]" if trained else text


def warnings(stats: dict) -> list[str]:
    """The data problems that silently ruin fine-tunes, in words."""
    out = []
    if stats["trained_share"] < WARN_TRAINED_SHARE:
        out.append(
            f"only {stats['trained_share']:.1%} of tokens are trained (under {WARN_TRAINED_SHARE:.0%}): "
            "most compute goes to prompts. Check train_on and max_length, or that answers are not cut off."
        )
    if stats["eos_added_turns"]:
        out.append(
            f"the chat template drops the end-of-turn token after {stats['eos_added_turns']} assistant "
            "turns; lorakit appended EOS so the model learns to stop, but inference with this "
            "template will not show it. Prefer data.chat_template: chatml (or a template that ends turns)."
        )
    if stats["truncated_rows"]:
        out.append(
            f"{stats['truncated_rows']} rows are longer than max_length={stats['max_length']} and were "
            "truncated; raise data.max_length to keep them whole."
        )
    if stats["rows_without_trained_token"]:
        out.append(f"{stats['rows_without_trained_token']} rows have no trained token left (answer cut off).")
    return out


def print_preview(
    tokenizer: Any, ds: Any, stats: dict, n: int = 3, stream: TextIO | None = None, color: bool | None = None
) -> None:
    stream = stream or sys.stdout
    color = stream.isatty() if color is None else color
    for i in range(min(n, len(ds))):
        row = ds[i]
        print(f"──── example {i + 1} ({row['where']}, {len(row['input_ids'])} tokens) ────", file=stream)
        print(show_example(tokenizer, row["input_ids"], row["labels"], color), file=stream)
    legend = "green = trained" if color else "[[...]] = trained"
    print(f"──── summary ({legend}) ────", file=stream)
    dropped = ", ".join(f"{v} {k}" for k, v in stats["dropped"].items()) or "none"
    lines = [
        ("format", f"{stats['format']}  (chat template: {stats['chat_template']}, train_on: {stats['train_on']})"),
        ("rows", f"{stats['rows']}" + (f"  (+{stats['eval_rows']} eval)" if "eval_rows" in stats else "")),
        ("tokens", f"{stats['tokens']:,}  (mean {stats['mean_length']:.0f}, longest {stats['max_seen_length']})"),
        ("trained tokens", f"{stats['trained_tokens']:,}  ({stats['trained_share']:.1%})"),
        ("truncated rows", f"{stats['truncated_rows']}  (max_length {stats['max_length']})"),
        ("rows dropped", dropped),
    ]
    for name, value in lines:
        print(f"  {name:<15} {value}", file=stream)
    for w in warnings(stats):
        print(f"{YELLOW if color else ''}WARNING: {w}{RESET if color else ''}", file=stream)
