"""`lorakit` command line: the table `COMMANDS` maps each subcommand to one function and its options.

Flags and their help are generated from the options dataclasses (options.py) and the run config's
fields (config.py), so nothing is typed twice. Each function only loads what it needs, calls the library
and prints the result; the modules it calls hold the logic.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import textwrap
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from lorakit import options as o
from lorakit.errors import LorakitError

OVERRIDES_HELP = "config overrides as key.sub=value, e.g. train.max_steps=20 data.train=x.jsonl"
LOCAL_HELP = (
    "apply the file's `local:` block: a recipe's twin that runs offline on a CPU (the built-in model, "
    "data from ../shared/data, fewer steps)"
)


def config_reference() -> str:
    """Every config key with its help text, generated from the pydantic models so it never drifts."""
    from lorakit.config import RunConfig

    lines = ["config keys (YAML file or key.sub=value overrides):"]

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, f in model.model_fields.items():
            ann = f.annotation
            sub = next(
                (a for a in (ann, *getattr(ann, "__args__", ())) if isinstance(a, type) and issubclass(a, BaseModel)),
                None,
            )
            if sub is not None:
                walk(sub, f"{prefix}{name}.")
                continue
            default = "required" if f.is_required() else f"default {f.get_default(call_default_factory=True)!r}"
            lines.append(f"  {prefix}{name:<24} {f.description or ''} [{default}]")

    walk(RunConfig, "")
    return "\n".join(lines)


# ---- one function per command: (run config,) options -> exit code ----
def cmd_data_preview(cfg: Any, opts: o.PreviewOptions) -> int:
    from lorakit import data, model, preview

    tokenizer = model.load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code)
    prepared = data.prepare(cfg.data, tokenizer, objective=cfg.objective, preference=cfg.preference)
    preview.print_preview(
        tokenizer,
        prepared.train,
        prepared.stats,
        n=opts.n,
        color=False if opts.no_color or os.environ.get("NO_COLOR") else None,
    )
    return 0


def cmd_train(cfg: Any, opts: o.TrainOptions) -> int:
    from lorakit import train
    from lorakit.run_folder import RunFolder

    result = train.run(
        cfg,
        resume=opts.resume,
        overwrite=opts.overwrite,
        progress=not opts.no_progress,
        force=opts.force,
        device=opts.device,
    )
    summary = result.summary
    if summary:
        # final_eval_rewards_accuracy: a preference run's (an sft run has none)
        keys = ("steps", "final_train_loss", "final_eval_loss", "final_eval_rewards_accuracy", "tokens_per_s",
                "wall_time_s", "peak_memory_mb")  # fmt: skip
        print(
            "  ".join(
                f"{k}={summary[k]:.4g}" if isinstance(summary[k], float) else f"{k}={summary[k]}"
                for k in keys
                if summary.get(k) is not None
            )
        )
        print(f"saved {RunFolder.of(cfg).weights(cfg.method)}")
    return 0


def train_launch(args: argparse.Namespace, cfg: Any, opts: o.TrainOptions) -> int | None:
    """Several processes or hosts: check the run folder once, then start the ranks with torchrun (None: train
    here, in this process, which may itself be one rank of a launch)."""
    import torch

    from lorakit import checkpoint, launch

    if not launch.wanted(opts):
        return None
    launch.check_strategy(cfg, torch.cuda.is_available(), opts.resume)
    checkpoint.check_output_dir(cfg, opts.resume, opts.overwrite, (opts.nproc or 1) * opts.nnodes)
    return launch.run(cfg, args.config, args.overrides, opts, args.local)


def train_interrupted(args: argparse.Namespace) -> str | None:
    """What a Ctrl-C'd training run tells: where its newest checkpoint is and the command that continues it
    (the launch flags too); nothing in a rank whose launcher or main rank says it (launch.quiet_rank)."""
    from lorakit import checkpoint, config, launch
    from lorakit.run_folder import RunFolder, latest

    if launch.quiet_rank():
        return None
    cfg = config.load(args.config, args.overrides, local=args.local)
    run = RunFolder.of(cfg)
    newest = latest(run.checkpoints)
    if newest is None:
        return f"interrupted: no checkpoint was saved in {run.root} ({checkpoint.none_yet(cfg)})"
    if launch.is_rank():  # the main rank of the user's own torchrun or accelerate launch: its command is theirs
        return f"interrupted: the newest checkpoint is {newest}; continue it by adding --resume to the launch command"
    again = launch.resume_command(args.config, args.overrides, o.from_args(o.TrainOptions, args), args.local)
    return f"interrupted: the newest checkpoint is {newest}; continue the run with:\n  {again}"


def cmd_quickstart_data(opts: o.QuickstartDataOptions) -> int:
    from lorakit import quickstart

    train_path, eval_path = quickstart.make_task(opts.out, n_train=opts.n_train, n_eval=opts.n_eval, seed=opts.seed)
    print(f"wrote {train_path} ({opts.n_train} chats) and {eval_path} ({opts.n_eval} held-out chats)")
    return 0


def cmd_quickstart_compare(cfg: Any, opts: o.QuickstartCompareOptions) -> int:
    from lorakit import quickstart

    report = quickstart.compare(cfg, max_new_tokens=opts.max_new_tokens, device=opts.device, dtype=opts.dtype)
    quickstart.print_table(report)
    return 0


def cmd_evaluate(cfg: Any, opts: o.EvalOptions) -> int:
    from lorakit import evaluate
    from lorakit.run_folder import EVAL_HTML, EVAL_JSON

    evaluate.print_table(evaluate.run(cfg, opts))
    out = evaluate.output_dir(cfg, opts)
    print(f"wrote {out / EVAL_JSON} and {out / EVAL_HTML}")
    return 0


def cmd_merge(opts: o.MergeOptions) -> int:
    from lorakit import merge

    report = merge.merge(
        opts.adapter,
        opts.out,
        base=opts.base,
        dtype=opts.dtype,
        force=opts.force,
        qlora=True if opts.qlora else None,
        device=opts.device,
    )
    print(
        f"merged {'QLoRA (into the dequantized 4-bit base)' if report['qlora'] else 'LoRA'} into {opts.out} "
        f"({report['dtype']}), eos_token_id {report['eos_token_id']}"
    )
    checks = [("base+adapter", report)] + ([("4-bit base+adapter", report["vs_4bit"])] if "vs_4bit" in report else [])
    for what, r in checks:
        print(
            f"parity vs {what}: max |logit diff| {r['max_abs_logit_diff']:.4g} <= tolerance {r['tolerance']:.4g} "
            f"({r['relative_tolerance']} x max |logit| {r['logit_scale']:.3g}), top-1 agreement "
            f"{r['top1_agreement']:.1%} on {r['positions']} positions ({report['prompts']} prompts)"
        )
    return 0


def cmd_export(opts: o.ExportOptions) -> int:
    if opts.format == "vllm":
        from lorakit.export import vllm_folder

        written = vllm_folder.export(opts)
        for w in written.notes:
            print(f"warning: {w}", file=sys.stderr)
        print(f"wrote {written.script} (and README.md beside it), which runs:\n{written.launch.shell()}")
        return 0
    from lorakit.export import gguf, proof

    result = gguf.export(
        opts.source, opts.out, outtype=opts.outtype, pre=opts.pre, base=opts.base, force=opts.force,
        device=opts.device, check=not opts.no_check, overwrite=opts.overwrite,
    )  # fmt: skip
    if result["merged"]:
        m = result["merged"]
        print(
            f"merged {opts.source} into {opts.out}/merged (fp32; parity max |logit diff| "
            f"{m['max_abs_logit_diff']:.3g} <= tolerance {m['tolerance']:.3g})"
        )
    print(
        f"wrote {result['gguf']} ({result['outtype']}, {result['bytes'] / 2**20:.1f} MiB) with llama.cpp's converter "
        f"in {result['export_s']:.1f} s; pre-tokenizer: {result['pre_tokenizer']}"
    )
    if result["ok"] is None:
        print("not checked in llama.cpp (--no-check)")
    else:
        print(f"checked in llama.cpp in {result['check_s']:.1f} s on {result['prompts']} prompts "
              f"(top-1 agreement {result['agreement']:.1%}):")  # fmt: skip
        print(proof.table(result))
    print(f"wrote {result['modelfile']} ({shlex.join(['ollama', 'create', 'NAME', '-f', result['modelfile']])})")
    if result["modelfile_warning"]:
        print(f"warning: {result['modelfile_warning']}", file=sys.stderr)
    return 0


def cmd_plan(cfg: Any | None, opts: o.PlanOptions) -> int:
    from dataclasses import asdict

    from lorakit import plan

    shape, setup, est = plan.plan(cfg, opts)
    if opts.json:
        print(json.dumps({**asdict(est), "model": shape.name, "setup": asdict(setup)}))
    else:
        print(plan.table(shape, setup, est))
    return 0


def cmd_serve(opts: o.ServeOptions) -> int:
    from lorakit.serve import replicas, server

    # --replicas (or --address): Ray Serve replicas of lorakit's engine behind one address; else one process.
    return (replicas if opts.replicas is not None or opts.address is not None else server).run(opts)


# ---- the command table ----
@dataclass(frozen=True)
class Command:
    name: str  # "train", or "GROUP NAME" for a subcommand ("quickstart data")
    run: Callable[..., int]  # run(cfg, opts) when it takes a run config, else run(opts)
    options: type  # its options dataclass (options.py)
    help: str  # one line in `lorakit --help`
    description: str  # the top of `lorakit NAME --help`
    takes_config: bool = False  # a YAML run file and key.sub=value overrides come first
    config_optional: bool = False  # and may be left out (run(None, opts)): plan --model describes a run itself
    # What Ctrl-C prints: "interrupted" when unset; nothing when it returns None (a rank whose launcher speaks).
    interrupted: Callable[[argparse.Namespace], str | None] | None = None
    launcher: Callable[..., int | None] | None = None  # (args, cfg, opts) -> exit code of a launch, None: run here


GROUPS = {
    "quickstart": (
        "the generated text-to-SQL task behind `make quickstart`",
        "Steps of `make quickstart`: `data` writes the task, `lorakit train configs/quickstart.yaml` "
        "trains, `compare` scores base vs adapter on held-out questions.",
    ),
    "data": ("inspect a run's data set", "Inspect how a run's data becomes training tokens."),
}

COMMANDS = [
    Command(
        "train",
        cmd_train,
        o.TrainOptions,
        "fine-tune a model as one YAML run describes",
        "Train a LoRA, QLoRA or full fine-tune. Writes to output_dir: adapter/ (peft format) or model/, "
        "config.yaml, metrics.jsonl, loss.png, summary.json and checkpoints/.",
        takes_config=True,
        interrupted=train_interrupted,
        launcher=train_launch,
    ),
    Command(
        "eval",
        cmd_evaluate,
        o.EvalOptions,
        "compare the base model and adapters on held-out data",
        "Run one held-out set through the base model and each adapter (one loaded base, peft multi-adapter), "
        "compute loss/perplexity on the answers and generation metrics against the references, print a "
        "table and write eval.json and eval.html.",
        takes_config=True,
    ),
    Command(
        "merge",
        cmd_merge,
        o.MergeOptions,
        "merge a LoRA adapter into its base and check logit parity",
        "Merge a LoRA (or QLoRA: into the dequantized 4-bit base) adapter into a copy of its base, save an HF "
        "model folder with tokenizer, chat template and stop tokens, and check that its logits match "
        "base+adapter within a printed tolerance (nothing is written if they do not).",
    ),
    Command(
        "export",
        cmd_export,
        o.ExportOptions,
        "export for other runtimes: GGUF (+ Ollama Modelfile) or a vLLM launch script",
        "--format gguf: convert a merged model (an adapter or run folder is merged first) with llama.cpp's own "
        "converter into a new or empty OUT, prove it in llama.cpp (prompt tokens, greedy answers, stop tokens) "
        "and write an Ollama Modelfile and a model card beside it. --format vllm: "
        "write OUT/serve.sh, which starts vLLM's OpenAI server on the adapters as `lorakit serve --engine vllm` "
        "would (after checking that vLLM accepts their ranks and target modules), and a README.md.",
    ),
    Command(
        "serve",
        cmd_serve,
        o.ServeOptions,
        "serve a base model and its adapters behind an OpenAI-compatible API",
        "One base model, many LoRA adapters: /v1/chat/completions, /v1/completions (streaming), /v1/models, "
        "/v1/load_lora_adapter, /v1/unload_lora_adapter, /health, /metrics. The request's `model` picks the "
        "adapter; concurrent requests of different adapters share one batch. --replicas: Ray Serve replicas of "
        "the server behind one address, added and removed with the queue.",
    ),
    Command(
        "plan",
        cmd_plan,
        o.PlanOptions,
        "will a run fit, and how long will it take: memory and speed from the model's config",
        "Predict a training run's peak memory (weights, trained parameters, gradients, optimizer states, "
        "activations, logits, framework) and tokens/s from the model's config alone, on this machine (as "
        "`lorakit train` would run it here: its auto batch, its refusals) and on the common GPUs, with the largest "
        "micro-batch that fits each. Takes the run config and overrides as `lorakit train` does, or --model. "
        "Bundled configs: Gemma-2B, Gemma-2 2B/9B, Llama-2 7B/13B, Llama-3.2 1B/3B, bloom-1b1.",
        takes_config=True,
        config_optional=True,
    ),
    Command(
        "quickstart data",
        cmd_quickstart_data,
        o.QuickstartDataOptions,
        "write the task's train.jsonl and eval.jsonl",
        "Write a seeded text-to-SQL task: train and eval chats whose eval values (names, cities, departments, "
        "thresholds) never occur in train.",
    ),
    Command(
        "quickstart compare",
        cmd_quickstart_compare,
        o.QuickstartCompareOptions,
        "exact match of base vs trained adapter, with sample answers",
        "`lorakit eval` of the run with SQL-normalized exact match: answers to the run's held-out chats from "
        "the base model and its adapter (one loaded base), the score and 3 samples side by side; writes "
        "output_dir/eval/eval.json and eval.html.",
        takes_config=True,
    ),
    Command(
        "data preview",
        cmd_data_preview,
        o.PreviewOptions,
        "show rendered examples with trained spans marked, and a summary",
        "Load, convert, tokenize and mask the run's data exactly as training will (cached), print N examples "
        "with the trained tokens marked (green on a terminal, [[...]] otherwise) and a summary: rows, tokens, "
        "trained share, truncated and dropped rows, with warnings. For objective dpo or orpo, each pair's prompt "
        "and its chosen and rejected answers.",
        takes_config=True,
    ),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lorakit",
        description="Fine-tune open LLMs with LoRA, QLoRA or full fine-tuning; "
        "inspect data, train, evaluate, merge and serve.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    top = parser.add_subparsers(dest="command", metavar="COMMAND")
    groups: dict[str, Any] = {}
    for cmd in COMMANDS:
        group, _, name = cmd.name.rpartition(" ")
        if group and group not in groups:
            help_, description = GROUPS[group]
            groups[group] = top.add_parser(group, help=help_, description=description).add_subparsers(
                dest=f"{group}_command", metavar="SUBCOMMAND"
            )
        p = (groups[group] if group else top).add_parser(
            name,
            help=cmd.help,
            description=textwrap.fill(cmd.description, 100),
            formatter_class=argparse.RawDescriptionHelpFormatter,  # keeps the config reference's lines
            epilog=config_reference() if cmd.takes_config else None,
        )
        if cmd.takes_config:
            p.add_argument("config", nargs="?" if cmd.config_optional else None, help="YAML run file (see configs/)")
            p.add_argument("overrides", nargs="*", metavar="key.sub=value", help=OVERRIDES_HELP)
            p.add_argument("--local", action="store_true", help=LOCAL_HELP)
        o.add_arguments(p, cmd.options)
        p.set_defaults(cmd=cmd)
    return parser


def main(argv: list[str] | None = None) -> int:
    from lorakit import launch

    launch.tie_to_launcher()  # first: a rank must not outlive a launcher killed while it starts
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    cmd: Command | None = getattr(args, "cmd", None)
    # argparse fills `overrides` only with the key=value words before the first option: the ones after
    # an option (`lorakit train run.yaml --resume train.max_steps=5`) come back here, in their order.
    if rest and cmd is not None and cmd.takes_config and not any(r.startswith("-") for r in rest):
        args.overrides += rest
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if cmd is None:
        parser.print_help()
        return 0 if not argv and args.command is None else 2
    # peft reads transformers' deprecated `is_gradient_checkpointing` on every PeftModel: a warning on
    # each run that the user can do nothing about.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.* is deprecated", category=FutureWarning)
    try:
        opts = o.from_args(cmd.options, args)
        if not cmd.takes_config:
            return cmd.run(opts)
        from lorakit import config

        cfg = config.load(args.config, args.overrides, local=args.local) if args.config else None
        if cmd.launcher and (code := cmd.launcher(args, cfg, opts)) is not None:
            return code
        return cmd.run(cfg, opts)
    except LorakitError as e:
        return report(str(e))
    except BrokenPipeError:  # the reader went away (`lorakit plan ... | head`): nothing more to say
        return 0
    except OSError as e:  # a file the command reads or writes (disk full, permissions): one message, not a trace
        where = f" {e.filename}" if e.filename else ""
        return report(
            f"could not read or write{where}: {e.strerror or e}. Free disk space or fix permissions, then run again"
        )
    except KeyboardInterrupt:
        message = cmd.interrupted(args) if cmd.interrupted else "interrupted"
        if message:
            print(message, file=sys.stderr)
        return 130
    except RuntimeError as e:
        if not launch.lost_peers(e):  # anything else is a bug in lorakit, which keeps its traceback
            raise
        return report(f"rank {os.environ.get('RANK')} stopped: {launch.LOST_PEERS}", kind="peer")


def report(message: str, kind: str = "error") -> int:
    """Print why the command failed and return its exit code; a rank of lorakit's launcher leaves the message to
    the launcher, which prints it once (launch.record). kind "peer": a rank that lost its peers (exit code 1)."""
    from lorakit import launch

    if not launch.record(message, kind):
        print(f"{'note' if kind == 'peer' else 'error'}: {message}", file=sys.stderr)
    return 1 if kind == "peer" else 2


if __name__ == "__main__":
    sys.exit(main())
