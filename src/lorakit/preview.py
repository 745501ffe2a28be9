"""`lorakit data preview`: show exactly which tokens will be trained, and whether the data is healthy.

Preference data (stats name an objective) shows each pair's prompt once, then its chosen and rejected answers."""

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


def _noun(stats: dict) -> str:
    return "pairs" if stats.get("objective") in ("dpo", "orpo") else "rows"


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
            f"{stats['truncated_rows']} {_noun(stats)} are longer than max_length={stats['max_length']} and were "
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
        if "chosen_input_ids" in row:
            _print_pair(tokenizer, row, i, stream, color)
            continue
        label = f", label {str(row['label']).lower()}" if "label" in row else ""
        print(f"──── example {i + 1} ({row['where']}, {len(row['input_ids'])} tokens{label}) ────", file=stream)
        print(show_example(tokenizer, row["input_ids"], row["labels"], color), file=stream)
    legend = "green = trained" if color else "[[...]] = trained"
    print(f"──── summary ({legend}) ────", file=stream)
    for name, value in _summary(stats):
        print(f"  {name:<15} {value}", file=stream)
    for w in warnings(stats):
        print(f"{YELLOW if color else ''}WARNING: {w}{RESET if color else ''}", file=stream)


def _print_pair(tokenizer: Any, row: dict, i: int, stream: TextIO, color: bool) -> None:
    # Both sequences start with the same prompt: shown once, then each answer with its trained tokens marked.
    start = row["prompt_len"]
    sizes = f"prompt {start}, chosen {len(row['chosen_input_ids']) - start}, rejected "
    sizes += f"{len(row['rejected_input_ids']) - start} tokens"
    print(f"──── pair {i + 1} ({row['where']}, {sizes}) ────", file=stream)
    print(show_example(tokenizer, row["chosen_input_ids"][:start], row["chosen_labels"][:start], color), file=stream)
    for side in ("chosen", "rejected"):
        print(f"── {side} ──", file=stream)
        ids, labels = row[f"{side}_input_ids"][start:], row[f"{side}_labels"][start:]
        print(show_example(tokenizer, ids, labels, color), file=stream)


def _summary(stats: dict) -> list[tuple[str, str]]:
    noun = _noun(stats)
    rows = f"{stats['rows']}" + (f"  (+{stats['eval_rows']} eval)" if "eval_rows" in stats else "")
    if "desirable" in stats:
        rows += f"  ({stats['desirable']} labelled true, {stats['undesirable']} false)"
    truncated = f"{stats['truncated_rows']}  (max_length {stats['max_length']}"
    if "max_prompt_length" in stats:  # preference data: prompts lose their start, answers their end
        truncated += f"; a cut prompt keeps its end, at least {stats['max_prompt_length']} tokens"
    lines = [
        ("format", f"{stats['format']}  (chat template: {stats['chat_template']}, train_on: {stats['train_on']})"),
        (noun, rows),
        ("tokens", f"{stats['tokens']:,}  (mean {stats['mean_length']:.0f}, longest {stats['max_seen_length']})"),
        ("trained tokens", f"{stats['trained_tokens']:,}  ({stats['trained_share']:.1%})"),
        (f"truncated {noun}", truncated + ")"),
        (f"{noun} dropped", ", ".join(f"{v} {k}" for k, v in stats["dropped"].items()) or "none"),
    ]
    if "objective" in stats:
        lines.insert(0, ("objective", stats["objective"]))
        lines[3] = ("tokens", lines[3][1] + f", over {stats['sequences']} sequences")
    return lines
