"""`lorakit` command line: one table maps each subcommand to one function; no logic lives here."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import warnings
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
    from lorakit.run_folder import RunFolder

    cfg = config.load(args.config, args.overrides)
    summary = train.run(cfg, resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress).summary
    if summary:
        keys = ("steps", "final_train_loss", "final_eval_loss", "tokens_per_s", "wall_time_s", "peak_memory_mb")
        print("  ".join(f"{k}={summary[k]:.4g}" if isinstance(summary[k], float) else f"{k}={summary[k]}"
                        for k in keys if summary.get(k) is not None))
        print(f"saved {RunFolder.of(cfg).weights(cfg.method)}")
    return 0


def cmd_quickstart_data(args: argparse.Namespace) -> int:
    from lorakit import quickstart

    train_path, eval_path = quickstart.make_task(args.out, n_train=args.n_train, n_eval=args.n_eval, seed=args.seed)
    print(f"wrote {train_path} ({args.n_train} chats) and {eval_path} ({args.n_eval} held-out chats)")
    return 0


def cmd_quickstart_compare(args: argparse.Namespace) -> int:
    from lorakit import config, quickstart

    cfg = config.load(args.config, args.overrides)
    quickstart.print_table(quickstart.compare(cfg, max_new_tokens=args.max_new_tokens))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from lorakit import config, evaluate

    cfg = config.load(args.config, args.overrides)
    adapters = _pairs(args.adapter, "--adapter")
    opts = evaluate.EvalOptions(
        adapters=adapters, data=args.data, output=args.output, max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size, temperature=args.temperature, top_p=args.top_p, stop=args.stop,
        normalize=[n for n in args.normalize.split(",") if n], metrics=args.metric, harness=args.harness,
        limit=args.limit, force=args.force, overwrite=args.overwrite)
    report = evaluate.run(cfg, opts)
    evaluate.print_table(report)
    out = args.output or f"{cfg.output_dir}/eval"
    print(f"wrote {out}/eval.json and {out}/eval.html")
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from lorakit import merge

    report = merge.merge(args.adapter, args.out, base=args.base, dtype=args.dtype, force=args.force,
                         qlora=True if args.qlora else None)
    print(f"merged {'QLoRA (into the dequantized 4-bit base)' if report['qlora'] else 'LoRA'} into {args.out} "
          f"({report['dtype']}), eos_token_id {report['eos_token_id']}")
    checks = [("base+adapter", report)] + ([("4-bit base+adapter", report["vs_4bit"])] if "vs_4bit" in report else [])
    for what, r in checks:
        print(f"parity vs {what}: max |logit diff| {r['max_abs_logit_diff']:.4g} <= tolerance {r['tolerance']:.4g} "
              f"({r['relative_tolerance']} x max |logit| {r['logit_scale']:.3g}), top-1 agreement "
              f"{r['top1_agreement']:.1%} on {r['positions']} positions ({report['prompts']} prompts)")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    if args.format == "vllm":
        from lorakit.export import vllm

        command, notes = vllm.for_source(args.source, _pairs(args.adapter, "--adapter"), base=args.base,
                                         force=args.force)
        for w in notes:
            print(f"warning: {w}", file=sys.stderr)
        print(shlex.join(command))
        return 0
    from lorakit.export import gguf

    result = gguf.export(args.source, args.out, outtype=args.outtype, pre=args.pre, base=args.base, force=args.force)
    if result["merged"]:
        m = result["merged"]
        print(f"merged {args.source} into {args.out}/merged (fp32; parity max |logit diff| "
              f"{m['max_abs_logit_diff']:.3g} <= tolerance {m['tolerance']:.3g})")
    print(f"wrote {result['gguf']} ({result['outtype']}); read back with transformers: tokenizer identical, "
          f"max |logit diff| {result['max_abs_logit_diff']:.3g} <= tolerance {result['tolerance']:.3g} "
          f"({result['relative_tolerance']} x max |logit|, {result['positions']} positions)")
    print(f"wrote {result['modelfile']} (ollama create NAME -f {result['modelfile']})")
    if result["modelfile_warning"]:
        print(f"warning: {result['modelfile_warning']}", file=sys.stderr)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from lorakit.serve import server

    opts = server.ServeOptions(
        model=args.model, served_model_name=args.served_model_name, adapters=_pairs(args.adapter, "--adapter"),
        adapters_dir=args.adapters_dir, host=args.host, port=args.port, api_key=args.api_key or os.environ.get("LORAKIT_API_KEY"),
        max_adapters=args.max_adapters, max_batch=args.max_batch, batch_window_ms=args.batch_window_ms,
        batching=args.batching == "on", watch=args.watch, watch_interval_s=args.watch_interval,
        max_tokens_limit=args.max_tokens_limit, max_model_len=args.max_model_len, max_body_bytes=args.max_body_bytes,
        device=args.device, dtype=args.dtype, quantization=args.quantization, engine=args.engine)
    return server.run(opts)


def _pairs(items: list[str], flag: str) -> dict[str, str]:
    out = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise LorakitError(f"{flag} '{item}' is not NAME=PATH (e.g. {flag} sql=runs/quickstart)")
        out[name] = path
    return out


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

    ev = sub.add_parser(
        "eval", help="compare the base model and adapters on held-out data",
        description="Run one held-out set through the base model and each adapter (one loaded base, peft "
        "multi-adapter), compute loss/perplexity on the answers and generation metrics against the references, "
        "print a table and write eval.json and eval.html.", epilog=config_reference(),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_config_args(ev)
    ev.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH",
                    help="an adapter folder or run folder to compare (repeatable; default: the run's own adapter)")
    ev.add_argument("--data", help="held-out file (default: the config's data.eval)")
    ev.add_argument("--output", help="output folder (default: output_dir/eval)")
    ev.add_argument("--max-new-tokens", type=int, default=128, help="answer length cap (default 128)")
    ev.add_argument("--batch-size", type=int, default=8, help="generation batch size (default 8)")
    ev.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); >0 samples")
    ev.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass when sampling (default 1.0)")
    ev.add_argument("--stop", action="append", default=[], help="stop sequence (repeatable)")
    ev.add_argument("--normalize", default="", help="exact-match normalizers, comma-separated: case, whitespace, sql")
    ev.add_argument("--metric", action="append", default=[],
                    help="metric to compute (repeatable): exact_match, contains, token_f1, rouge_l, bleu, chrf, "
                    "or module:function for your own; default: all built-ins")
    ev.add_argument("--harness", metavar="TASKS", help="also run lm-evaluation-harness tasks on the base and each "
                    "adapter (comma-separated names, or paths of task YAML files; pip install 'lorakit[harness]')")
    ev.add_argument("--limit", type=int, help="evaluate only the first N examples (of the held-out set and of each "
                    "harness task)")
    ev.add_argument("--force", action="store_true", help="accept adapters trained on a different base")
    ev.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    ev.set_defaults(func=cmd_eval)

    mg = sub.add_parser(
        "merge", help="merge a LoRA adapter into its base and check logit parity",
        description="Merge a LoRA (or QLoRA: into the dequantized 4-bit base) adapter into a copy of its base, "
        "save an HF model folder with tokenizer, chat template and stop tokens, and check that its logits match "
        "base+adapter within a printed tolerance (nothing is written if they do not).")
    mg.add_argument("adapter", help="adapter folder, or a run folder of `lorakit train`")
    mg.add_argument("out", help="new model folder (must not exist)")
    mg.add_argument("--base", help="base model (default: the run's model, else the adapter's base_model_name_or_path)")
    mg.add_argument("--dtype", choices=["auto", "bf16", "fp16", "fp32"], default="auto",
                    help="dtype of the saved weights; auto = the base's own if 16-bit, else bf16 (the merge itself "
                    "runs in fp32; fp32 keeps it exact)")
    mg.add_argument("--qlora", action="store_true", help="the adapter was trained on a 4-bit base (detected for run folders)")
    mg.add_argument("--force", action="store_true", help="accept an adapter whose recorded base differs from --base")
    mg.set_defaults(func=cmd_merge)

    ex = sub.add_parser(
        "export", help="export for other runtimes: GGUF (+ Ollama Modelfile) or a vLLM command line",
        description="--format gguf: write a GGUF of a merged model (an adapter or run folder is merged first), "
        "read it back with transformers and check logits, and write an Ollama Modelfile beside it. "
        "--format vllm: print the `vllm serve ... --enable-lora --lora-modules ...` command for the adapters, "
        "after checking that vLLM accepts their ranks and target modules.")
    ex.add_argument("source", help="gguf: a model folder, adapter folder or run folder; vllm: a run/adapter "
                    "folder (served under its folder's name), or the base model for --adapter")
    ex.add_argument("out", nargs="?", default="export", help="gguf: output folder (default ./export)")
    ex.add_argument("--format", choices=["gguf", "vllm"], required=True, help="what to export")
    ex.add_argument("--outtype", choices=["f32", "f16"], default="f16", help="GGUF weight type (default f16)")
    ex.add_argument("--pre", help="llama.cpp pre-tokenizer name written in the GGUF (default: guessed)")
    ex.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH", help="vllm: an adapter or run folder to serve as NAME (repeatable)")
    ex.add_argument("--base", help="base model (default: the run's model, else the adapter's base_model_name_or_path)")
    ex.add_argument("--force", action="store_true", help="accept an adapter whose recorded base differs")
    ex.set_defaults(func=cmd_export)

    sv = sub.add_parser(
        "serve", help="serve a base model and its adapters behind an OpenAI-compatible API",
        description="One base model, many LoRA adapters: /v1/chat/completions, /v1/completions (streaming), "
        "/v1/models, /v1/load_lora_adapter, /v1/unload_lora_adapter, /health, /metrics. The request's `model` "
        "picks the adapter; concurrent requests of different adapters share one batch.")
    sv.add_argument("--model", required=True, help="base model (as in `lorakit train`), or a run config YAML "
                    "(its model, plus its trained adapter)")
    sv.add_argument("--served-model-name", help="name of the base in the API (default: --model)")
    sv.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH", help="an adapter (repeatable)")
    sv.add_argument("--adapters-dir", help="folder whose subfolders are adapters; the load endpoint only reads here")
    sv.add_argument("--watch", action="store_true", help="load new or changed adapters of --adapters-dir "
                    "without a restart (SIGHUP forces a rescan)")
    sv.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    sv.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    sv.add_argument("--api-key", help="require Authorization: Bearer KEY on all but /health (or $LORAKIT_API_KEY)")
    sv.add_argument("--max-adapters", type=int, help="keep at most N adapters loaded: the least recently used is "
                    "unloaded, and loaded again when a request names it")
    sv.add_argument("--max-batch", type=int, default=8, help="requests decoded together (default 8)")
    sv.add_argument("--batching", choices=["on", "off"], default="on", help="off: one request at a time, switching "
                    "the active adapter per request (the naive server, for comparison)")
    sv.add_argument("--max-tokens-limit", type=int, default=1024, help="largest max_tokens a request may ask")
    sv.add_argument("--batch-window-ms", type=float, default=10.0,
                    help="how long an idle server waits for more requests to batch with the first (default 10)")
    sv.add_argument("--watch-interval", type=float, default=2.0, help="seconds between --watch rescans (default 2)")
    sv.add_argument("--max-model-len", type=int, help="prompt + max_tokens at most (default: the model's context)")
    sv.add_argument("--max-body-bytes", type=int, default=1 << 20, help="largest request body (default 1 MiB)")
    sv.add_argument("--device", default="auto", help="auto (cuda if there is one, else cpu), cpu, cuda, cuda:1, ...")
    sv.add_argument("--dtype", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
                    help="weights dtype; auto = fp32 on CPU, bf16 (or fp16) on GPU")
    sv.add_argument("--quantization", choices=["4bit", "8bit"],
                    help="load the base with bitsandbytes (default: 4bit for a QLoRA run config, else none)")
    sv.add_argument("--engine", choices=["lorakit", "vllm"], default="lorakit",
                    help="vllm: exec vLLM's OpenAI server with the same model and adapters (GPU machines)")
    sv.set_defaults(func=cmd_serve)

    qs = sub.add_parser("quickstart", help="the generated text-to-SQL task behind `make quickstart`",
                        description="Steps of `make quickstart`: `data` writes the task, `lorakit train "
                        "configs/quickstart.yaml` trains, `compare` scores base vs adapter on held-out questions.")
    qs_sub = qs.add_subparsers(dest="qs_command", metavar="SUBCOMMAND")
    qd = qs_sub.add_parser("data", help="write the task's train.jsonl and eval.jsonl",
                           description="Write a seeded text-to-SQL task: train and eval chats whose eval values "
                           "(names, cities, departments, thresholds) never occur in train.")
    qd.add_argument("out", nargs="?", default="runs/quickstart-data", help="folder (default runs/quickstart-data)")
    qd.add_argument("--n-train", type=int, default=2000, help="training chats (default 2000)")
    qd.add_argument("--n-eval", type=int, default=50, help="held-out chats (default 50)")
    qd.add_argument("--seed", type=int, default=0, help="seed of the generator (default 0)")
    qd.set_defaults(func=cmd_quickstart_data)
    qc = qs_sub.add_parser("compare", help="exact match of base vs trained adapter, with sample answers",
                           description="`lorakit eval` of the run with SQL-normalized exact match: answers to "
                           "the run's held-out chats from the base model and its adapter (one loaded base), the "
                           "score and 3 samples side by side; writes output_dir/eval/eval.json and eval.html.")
    _add_config_args(qc)
    qc.add_argument("--max-new-tokens", type=int, default=48, help="answer length cap (default 48)")
    qc.set_defaults(func=cmd_quickstart_compare)

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
    # peft reads transformers' deprecated `is_gradient_checkpointing` on every PeftModel: a warning on
    # each run that the user can do nothing about.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.* is deprecated", category=FutureWarning)
    try:
        return func(args)
    except LorakitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a file the command reads or writes (disk full, permissions): one message, not a trace
        where = f" {e.filename}" if e.filename else ""
        print(f"error: could not read or write{where}: {e.strerror or e}. Free disk space or fix permissions, "
              "then run again", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
