"""What each command takes besides a run config: one dataclass per command whose fields carry their help.

A field is defined once (name, type, default, help) and cli.py generates the command-line flag from it,
as `config_reference` does for the run config: `--max-new-tokens` from `max_new_tokens: int = 128`,
choices from a `Literal`, a repeatable flag from a list, NAME=PATH pairs from a dict. Library code takes
the same objects (`evaluate.run(cfg, EvalOptions(...))`), so a default never exists twice. This module
stays light (no torch): `lorakit --help` builds every command's parser from it.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from dataclasses import MISSING, dataclass, field
from typing import Any, Literal

from lorakit.config import Dtype
from lorakit.errors import LorakitError
from lorakit.run_folder import EXPORT_MARKER


def option(
    default: Any = MISSING,
    *,
    help: str,
    flag: str | None = None,
    metavar: str | None = None,
    positional: bool = False,
    env: str | None = None,
    comma: bool = False,
    minimum: float | None = None,
    maximum: float | None = None,
) -> Any:
    """A dataclass field that is also a command-line option.

    flag: the flag when it is not `--field-name` (e.g. `--adapter` for `adapters`, `-n`). positional: an
    argument without a flag (optional when it has a default). env: an environment variable read when the
    option is not given. comma: a list given as one comma-separated value rather than a repeated flag.
    minimum, maximum: the range of a number, inclusive; a value outside it is one message (exit 2).
    """
    meta = {
        "help": help,
        "flag": flag,
        "metavar": metavar,
        "positional": positional,
        "env": env,
        "comma": comma,
        "minimum": minimum,
        "maximum": maximum,
    }
    if isinstance(default, list | dict):  # a fresh one per instance
        return field(default_factory=type(default), metadata=meta)
    return field(default=default, metadata=meta)


# ---- options several commands take: one definition each ----
def device_option(help: str = "where the model runs") -> Any:
    # One vocabulary, torch's (model.pick_device reads it): cpu, cuda, cuda:1 ...; never "gpu".
    return option("auto", help=f"{help}: auto (the GPU when there is one, else the CPU), cpu, cuda, cuda:1, ...")


def dtype_option() -> Any:
    return option("auto", help="the model's dtype: auto = fp32 on the CPU, bf16 on a GPU (fp16 where it has no bf16)")


def force_option() -> Any:
    return option(
        False,
        help="accept adapters whose recorded base model has another name (the same weights "
        "under another name); without it such an adapter is refused",
    )


def vllm_python_option() -> Any:
    return option(
        None,
        env="LORAKIT_VLLM_PYTHON",
        help="vllm: the python of the environment that has vLLM (default: this one when it has vllm, else the "
        "`vllm` program's on PATH)",
    )


def base_precision_option() -> Any:
    return option(
        "auto",
        help="how the base model is loaded: auto = 4-bit for a QLoRA run (the weights its adapter "
        "was trained against), else in --dtype; 4bit or 8bit (bitsandbytes), or full",
    )


BasePrecision = Literal["auto", "4bit", "8bit", "full"]


# Processes on one host (torchrun's --nproc-per-node): one per GPU, or a share of a CPU host's cores, and no host
# has more than a few hundred of either. `train --nproc` and `plan --nproc` take the same range: past it a number is a
# typo (a million processes would be started, or planned for), not a host.
NPROC_MAX = 1024


# ---- the options of each command ----
@dataclass(kw_only=True)
class TrainOptions:
    resume: bool = option(False, help="continue from the newest checkpoint in output_dir")
    overwrite: bool = option(False, help="delete an existing output_dir (an earlier lorakit run) and start over")
    no_progress: bool = option(False, help="no progress bar (metrics still go to metrics.jsonl)")
    force: bool = option(False, help="train even where `lorakit plan` predicts the run does not fit this device")
    nproc: int | None = option(
        None,
        minimum=1,
        maximum=NPROC_MAX,
        help="processes on this host (one per GPU; on a CPU, each takes a "
        "share of the batch): lorakit starts them with torchrun",
    )
    nnodes: int = option(
        1, minimum=1, help="hosts of a multi-host run: start the same command on each, with its --node-rank"
    )
    node_rank: int = option(0, minimum=0, help="this host's number in a multi-host run, 0 to nnodes-1")
    master_addr: str = option("127.0.0.1", help="address of host 0, where the ranks meet (multi-host runs)")
    master_port: int = option(29500, minimum=1, maximum=65535, help="port on host 0 where the ranks meet")
    device: str = device_option()


@dataclass(kw_only=True)
class EvalOptions:
    adapters: dict[str, str] = option(
        {},
        flag="--adapter",
        metavar="NAME=PATH",
        help="an adapter folder or run folder to compare (repeatable; default: the run's own adapter)",
    )
    data: str | None = option(None, help="held-out file (default: the config's data.eval)")
    output: str | None = option(None, help="output folder (default: output_dir/eval)")
    max_new_tokens: int = option(128, minimum=1, help="answer length cap")
    batch_size: int = option(8, minimum=1, help="generation and loss batch size (made smaller while it does not fit)")
    device: str = device_option()
    dtype: Dtype = dtype_option()
    base_precision: BasePrecision = base_precision_option()
    temperature: float = option(0.0, minimum=0, help="0 = greedy; >0 samples")
    top_p: float = option(1.0, maximum=1, help="nucleus sampling mass when sampling")
    stop: list[str] = option([], help="stop sequence (repeatable)")
    normalize: list[str] = option(
        [], comma=True, help="exact-match normalizers, comma-separated: case, whitespace, sql"
    )
    metrics: list[str] = option(
        [],
        flag="--metric",
        help="metric to compute (repeatable): exact_match, contains, "
        "token_f1, rouge_l, bleu, chrf, or module:function for your own; default: all built-ins",
    )
    harness: str | None = option(
        None,
        metavar="TASKS",
        help="also run lm-evaluation-harness tasks on the base and "
        "each adapter (comma-separated names, or paths of task YAML files; pip install "
        "'lorakit[harness]')",
    )
    limit: int | None = option(
        None, minimum=1, help="evaluate only the first N examples (of the held-out set and of each harness task)"
    )
    force: bool = force_option()
    overwrite: bool = option(False, help="replace an existing output folder")


@dataclass(kw_only=True)
class MergeOptions:
    adapter: str = option(positional=True, help="adapter folder, or a run folder of `lorakit train`")
    out: str = option(positional=True, help="new model folder (must not exist)")
    base: str | None = option(
        None, help="base model (default: the run's model, else the adapter's base_model_name_or_path)"
    )
    dtype: Dtype = option(
        "auto",
        help="dtype of the saved weights; auto = the base's own if 16-bit, else bf16 (the merge itself runs "
        "in fp32; fp32 keeps it exact)",
    )
    qlora: bool = option(False, help="the adapter was trained on a 4-bit base (detected for run folders)")
    force: bool = force_option()
    device: str = device_option()  # the merge and its parity check; the merge itself runs in fp32


@dataclass(kw_only=True)
class ExportOptions:
    source: str = option(
        positional=True,
        help="gguf: a model folder, adapter folder or run folder; vllm: a "
        "run/adapter folder (served under its run's name), or the base model for --adapter",
    )
    out: str = option(
        "export",
        positional=True,
        help="output folder, new or empty (or see --overwrite); vllm: its serve.sh starts vLLM, README.md says how",
    )
    format: Literal["gguf", "vllm"] = option(help="what to export")
    outtype: Literal["f32", "f16", "bf16", "q8_0", "q4_k_m"] = option(
        "f16",
        help="GGUF weight type: f16/bf16/f32 (llama.cpp's converter; proven token for token), q8_0 (converter) "
        "or q4_k_m (llama.cpp's quantizer; proven by top-1 agreement, see README)",
    )
    no_check: bool = option(
        False, help="keep the GGUF without proving it in llama.cpp (prompt tokens, greedy answers, stop token)"
    )
    pre: str | None = option(None, help="llama.cpp pre-tokenizer name written in the GGUF (default: guessed)")
    adapters: dict[str, str] = option(
        {}, flag="--adapter", metavar="NAME=PATH", help="vllm: an adapter or run folder to serve as NAME (repeatable)"
    )
    base: str | None = option(
        None, help="base model (default: the run's model, else the adapter's base_model_name_or_path)"
    )
    overwrite: bool = option(
        False,
        help=f"write into an OUT that holds an earlier lorakit export ({EXPORT_MARKER}): its GGUF, Modelfile, "
        "README.md, loss.png and merged/ (vllm: serve.sh, README.md) are replaced, other files are kept; without it "
        "OUT must be new or empty",
    )
    force: bool = force_option()
    # gguf: the merge (of an adapter) and the checks of the written file; vllm: what serve.sh is sized for
    device: str = device_option()
    vllm_python: str | None = vllm_python_option()


@dataclass(kw_only=True)
class ServeOptions:
    model: str = option(
        help="base model (as in `lorakit train`), or a run config YAML (its model, plus its trained adapter)"
    )
    served_model_name: str | None = option(None, help="name of the base in the API (default: --model)")
    adapters: dict[str, str] = option({}, flag="--adapter", metavar="NAME=PATH", help="an adapter (repeatable)")
    adapters_dir: str | None = option(
        None, help="folder whose subfolders are adapters; the load endpoint only reads here"
    )
    watch: bool = option(
        False, help="load new or changed adapters of --adapters-dir without a restart (SIGHUP forces a rescan)"
    )
    host: str = option("127.0.0.1", help="bind address")
    port: int = option(8000, minimum=1, maximum=65535, help="port")
    api_key: str | None = option(
        None, env="LORAKIT_API_KEY", help="require Authorization: Bearer KEY on all but /health"
    )
    max_adapters: int | None = option(
        None,
        minimum=1,
        help="keep at most N adapters loaded: the least recently used is "
        "unloaded, and loaded again when a request names it",
    )
    max_batch: int = option(8, minimum=1, help="requests decoded together")
    batching: Literal["on", "off"] = option(
        "on",
        help="off: one request at a time, switching the active adapter per request (the naive server, for comparison)",
    )
    max_tokens_limit: int = option(1024, minimum=1, help="largest max_tokens a request may ask")
    batch_window_ms: float = option(
        10.0, minimum=0, help="how long an idle server waits for more requests to batch with the first"
    )
    watch_interval_s: float = option(2.0, minimum=0.1, flag="--watch-interval", help="seconds between --watch rescans")
    max_model_len: int | None = option(
        None, minimum=1, help="prompt + max_tokens at most (default: the model's context)"
    )
    max_body_bytes: int = option(1 << 20, minimum=1, help="largest request body in bytes")
    threads: int | None = option(
        None,
        minimum=1,
        help="torch's CPU threads (default: auto, one per core that other processes leave free, followed as they "
        "come and go; $OMP_NUM_THREADS where set)",
    )
    device: str = device_option()
    dtype: Dtype = dtype_option()
    base_precision: BasePrecision = base_precision_option()
    force: bool = force_option()
    no_ui: bool = option(
        False,
        help="serve the API only: no explorer page at / (it compares the base and its "
        "adapters side by side, and shows their training runs)",
    )
    engine: Literal["lorakit", "vllm"] = option(
        "lorakit", help="vllm: exec vLLM's OpenAI server with the same model, adapters, limits and precision"
    )
    vllm_python: str | None = vllm_python_option()
    # Replicated serving on Ray Serve (serve/replicas.py); without --replicas, one process serves.
    replicas: str | None = option(
        None,
        metavar="N|MIN..MAX",
        help="serve from Ray Serve replicas behind one address: N fixed, or MIN..MAX scaled with the requests "
        "in flight (--target-queue); pip install 'lorakit[ray]'",
    )
    target_queue: float = option(
        1.0, help="with --replicas MIN..MAX: the requests in flight or queued per replica that Ray scales to"
    )
    address: str | None = option(
        None,
        help="with --replicas: the Ray cluster to join (HOST:6379, as `ray start --head` prints); default: "
        "start Ray on this machine",
    )
    replica_cpus: float = option(1.0, minimum=0, help="with --replicas: CPUs per replica (its torch threads)")
    replica_gpus: float = option(0.0, minimum=0, help="with --replicas: GPUs per replica (0.5: two share one)")
    upscale_delay_s: float = option(
        10.0, minimum=0, flag="--upscale-delay", help="with --replicas: seconds a queue must last to add a replica"
    )
    downscale_delay_s: float = option(
        60.0, minimum=0, flag="--downscale-delay", help="with --replicas: idle seconds before a replica is removed"
    )


@dataclass(kw_only=True)
class PlanOptions:
    # The run config and its key.sub=value overrides come first, as for `lorakit train`; without one, --model and
    # the options below describe the run. Each option is the override of one config key (plan.OPTION_KEYS).
    model: str | None = option(
        None, help="hub id, folder, config.json or alias (a bundled reference model's config needs no download)"
    )
    method: Literal["lora", "qlora", "full"] | None = option(
        None, help="lora, qlora or full (method=...; default: the config's, else lora)"
    )
    seq_len: int | None = option(
        None, minimum=1, help="tokens per row (data.max_length=...; default: the config's, else 1024)"
    )
    batch: int | None = option(
        None,
        minimum=1,
        help="rows per forward pass per process (train.batch_size=..., which also takes auto; "
        "default: the config's, else 4)",
    )
    r: int | None = option(None, minimum=1, help="LoRA rank (adapter.r=...; default: the config's, else 16)")
    gradient_checkpointing: bool = option(
        False, help="recompute activations (train.gradient_checkpointing=true; also on where the config says so)"
    )
    nproc: int = option(
        1, minimum=1, maximum=NPROC_MAX, help="processes on one host sharing the run, as `lorakit train --nproc`"
    )
    strategy: Literal["auto", "ddp", "fsdp"] | None = option(
        None, help="ddp or fsdp across processes (train.strategy=...; default: the config's)"
    )
    device: str = device_option(
        "what to plan for (auto: this machine's device, and the common GPUs also on a machine without one; cuda: "
        "the common GPUs in bf16; cpu: this CPU in fp32)"
    )
    json: bool = option(False, help="print one JSON object (bytes) instead of the table")


@dataclass(kw_only=True)
class QuickstartDataOptions:
    out: str = option("runs/quickstart-data", positional=True, help="folder")
    n_train: int = option(2000, minimum=1, help="training chats")
    n_eval: int = option(50, minimum=1, help="held-out chats")
    seed: int = option(0, help="seed of the generator")


@dataclass(kw_only=True)
class QuickstartCompareOptions:
    max_new_tokens: int = option(48, minimum=1, help="answer length cap")
    device: str = device_option()
    dtype: Dtype = dtype_option()


@dataclass(kw_only=True)
class PreviewOptions:
    n: int = option(3, minimum=0, flag="-n", help="how many examples to print")
    no_color: bool = option(False, help="mark trained spans with [[...]] even on a terminal")


# ---- dataclass <-> argparse ----
def add_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """One argument per field of `cls`, typed, with its help and default."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        meta, kind = f.metadata, hints[f.name]
        inner, choices = _unwrap(kind)
        kwargs: dict[str, Any] = {"help": _help(f), "metavar": meta["metavar"]}
        if choices:
            kwargs.update(choices=choices, metavar=meta["metavar"])
        elif inner is bool:
            kwargs = {"help": kwargs["help"], "action": "store_true"}
        elif inner in (int, float):
            kwargs["type"] = inner
        elif typing.get_origin(inner) in (list, dict) and not meta["comma"]:
            kwargs["action"] = "append"
        if meta["positional"]:
            kwargs.pop("metavar")
            if f.default is not MISSING:
                kwargs.update(nargs="?", default=f.default)
            parser.add_argument(f.name, **kwargs)
        else:
            flag = meta["flag"] or "--" + f.name.replace("_", "-")
            if "action" not in kwargs and not choices:
                kwargs["metavar"] = meta["metavar"] or flag.lstrip("-").upper().replace("-", "_")
            required = f.default is MISSING and f.default_factory is MISSING
            parser.add_argument(
                flag, dest=f.name, required=required, default=None if required else _default(f), **kwargs
            )


def from_args(cls: type, args: argparse.Namespace) -> Any:
    """The options object of the parsed arguments; NAME=PATH pairs and comma lists are split here."""
    values = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        value, meta = getattr(args, f.name), f.metadata
        flag = meta["flag"] or "--" + f.name.replace("_", "-")
        if value is None and f.default_factory is not MISSING:  # a repeatable flag never given
            value = f.default_factory()
        if meta["env"] and value is None:
            value = os.environ.get(meta["env"])
        if meta["comma"] and isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if typing.get_origin(_unwrap(hints[f.name])[0]) is dict and isinstance(value, list):
            value = pairs(value, flag)
        _check_range(value, meta["minimum"], meta["maximum"], flag)
        values[f.name] = value
    return cls(**values)


def to_argv(opts: Any) -> list[str]:
    """The command-line words that `from_args` turns back into `opts`: each field that differs from its default.

    What a launcher passes on to the processes it starts (`train --nproc`), so that a field added to an options
    class travels without a second list of flags. Fields read from an environment variable are left out: the
    processes inherit the environment, and a secret (an API key) does not belong in a command line.
    """
    argv: list[str] = []
    hints = typing.get_type_hints(type(opts))
    for f in dataclasses.fields(opts):
        value, meta = getattr(opts, f.name), f.metadata
        default = f.default_factory() if f.default_factory is not MISSING else f.default
        if value == default or meta["env"]:
            continue
        if meta["positional"]:
            argv.append(str(value))
            continue
        flag = meta["flag"] or "--" + f.name.replace("_", "-")
        # FLAG=VALUE, one word: a value that starts with "-" is not taken for a flag.
        if _unwrap(hints[f.name])[0] is bool:
            argv.append(flag)
        elif isinstance(value, dict):
            argv += [f"{flag}={name}={path}" for name, path in value.items()]
        elif isinstance(value, list):
            argv += [f"{flag}={','.join(value)}"] if meta["comma"] else [f"{flag}={v}" for v in value]
        else:
            argv.append(f"{flag}={value}")
    return argv


def pairs(items: list[str], flag: str) -> dict[str, str]:
    """NAME=PATH items as a dict; one message for an item that is not one."""
    out = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise LorakitError(f"{flag} '{item}' is not NAME=PATH (e.g. {flag} sql=runs/quickstart)")
        out[name] = path
    return out


def _check_range(value: Any, low: float | None, high: float | None, flag: str) -> None:
    if not isinstance(value, int | float) or isinstance(value, bool):
        return
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = (
            f"between {low:g} and {high:g}"
            if low is not None and high is not None
            else f"at least {low:g}"
            if low is not None
            else f"at most {high:g}"
        )
        # An int as typed: `:g` writes 1000000 as 1e+06.
        raise LorakitError(f"{flag} {value if isinstance(value, int) else format(value, 'g')}: must be {bounds}")


def _unwrap(kind: Any) -> tuple[Any, list | None]:
    """(the type without `| None`, the choices of a Literal)."""
    if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union:
        kind = next(a for a in typing.get_args(kind) if a is not type(None))
    return kind, list(typing.get_args(kind)) if typing.get_origin(kind) is Literal else None


def _default(f: dataclasses.Field) -> Any:
    if f.default_factory is not MISSING:
        return None  # a repeated flag appends to None; from_args turns "not given" into the empty value
    return f.default


def _help(f: dataclasses.Field) -> str:
    default = f.default
    if f.metadata["env"]:
        return f"{f.metadata['help']} (or ${f.metadata['env']})"
    if default is MISSING or default is None or default is False:
        return f.metadata["help"]
    return f"{f.metadata['help']} (default {default})"
