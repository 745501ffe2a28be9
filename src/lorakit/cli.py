"""`lorakit` command line: one table maps each subcommand to one function; no logic lives here."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel

from lorakit.errors import LorakitError

OVERRIDES_HELP = "config overrides as key.sub=value, e.g. train.max_steps=20 data.train=x.jsonl"


def config_reference() -> str:
    """Every config key with its help text, generated from the pydantic models so it never drifts."""
    from lorakit.config import RunConfig

    lines = ["config keys (YAML file or key.sub=value overrides):"]

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, f in model.model_fields.items():
            ann = f.annotation
            sub = next((a for a in (ann, *getattr(ann, "__args__", ())) if isinstance(a, type)
                        and issubclass(a, BaseModel)), None)
            if sub is not None:
                walk(sub, f"{prefix}{name}.")
                continue
            default = "required" if f.is_required() else f"default {f.get_default(call_default_factory=True)!r}"
            lines.append(f"  {prefix}{name:<24} {f.description or ''} [{default}]")

    walk(RunConfig, "")
    return "\n".join(lines)


def cmd_data_preview(args: argparse.Namespace) -> int:
    from lorakit import config, data, model, preview

    cfg = config.load(args.config, args.overrides)
    tokenizer = model.load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code)
    prepared = data.prepare(cfg.data, tokenizer)
    preview.print_preview(tokenizer, prepared.train, prepared.stats, n=args.n,
                          color=False if args.no_color or os.environ.get("NO_COLOR") else None)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from lorakit import config, train

    cfg = config.load(args.config, args.overrides)
    summary = train.run(cfg, resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress).summary
    if summary:
        keys = ("steps", "final_train_loss", "final_eval_loss", "tokens_per_s", "wall_time_s", "peak_memory_mb")
        print("  ".join(f"{k}={summary[k]:.4g}" if isinstance(summary[k], float) else f"{k}={summary[k]}"
                        for k in keys if summary.get(k) is not None))
        print(f"saved {cfg.output_dir}/{'model' if cfg.method == 'full' else 'adapter'}")
    return 0


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML run file (see configs/)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help=OVERRIDES_HELP)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lorakit", description="Fine-tune open LLMs with LoRA, QLoRA or full fine-tuning; "
        "inspect data, train, evaluate, merge and serve.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    tr = sub.add_parser(
        "train", help="fine-tune a model as one YAML run describes",
        description="Train a LoRA, QLoRA or full fine-tune. Writes to output_dir: adapter/ (peft format) or "
        "model/, config.yaml, metrics.jsonl, loss.png, summary.json and checkpoints/.",
        epilog=config_reference(), formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_config_args(tr)
    tr.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in output_dir")
    tr.add_argument("--overwrite", action="store_true", help="delete an existing output_dir and start over")
    tr.add_argument("--no-progress", action="store_true", help="no progress bar (metrics still go to metrics.jsonl)")
    tr.set_defaults(func=cmd_train)

    data_p = sub.add_parser("data", help="inspect a run's data set",
                            description="Inspect how a run's data becomes training tokens.")
    data_sub = data_p.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    prev = data_sub.add_parser(
        "preview", help="show rendered examples with trained spans marked, and a summary",
        description="Load, convert, tokenize and mask the run's data exactly as training will (cached), "
        "print N examples with the trained tokens marked (green on a terminal, [[...]] otherwise) and a "
        "summary: rows, tokens, trained share, truncated and dropped rows, with warnings.",
        epilog=config_reference(), formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_config_args(prev)
    prev.add_argument("-n", type=int, default=3, help="how many examples to print (default 3)")
    prev.add_argument("--no-color", action="store_true", help="mark trained spans with [[...]] even on a terminal")
    prev.set_defaults(func=cmd_data_preview)
    return parser



def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Any = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 0 if not argv and args.command is None else 2
    try:
        return func(args)
    except LorakitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
