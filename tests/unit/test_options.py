"""Command-line options come from one definition: the options dataclasses and the command table."""

import dataclasses
import typing
from types import SimpleNamespace

import pytest

from lorakit import cli, options
from lorakit.errors import LorakitError

REQUIRED = {"merge": ["adapter_dir", "out_dir"], "export": ["src", "--format", "gguf"], "serve": ["--model", "m"]}


def parse(name: str, extra: list[str]):
    argv = name.split() + (["run.yaml"] if cli_command(name).takes_config else []) + extra
    return cli.build_parser().parse_args(argv)


def cli_command(name: str) -> cli.Command:
    return next(c for c in cli.COMMANDS if c.name == name)


@pytest.mark.parametrize("name", [c.name for c in cli.COMMANDS])
def test_flags_default_to_the_dataclass_defaults(name):
    cmd = cli_command(name)
    opts = options.from_args(cmd.options, parse(name, REQUIRED.get(name, [])))
    required = [
        f.name
        for f in dataclasses.fields(cmd.options)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    assert opts == cmd.options(**{k: getattr(opts, k) for k in required}), "no default exists twice"
    assert parse(name, REQUIRED.get(name, [])).cmd is cmd


@pytest.mark.parametrize("name", [c.name for c in cli.COMMANDS])
def test_every_field_has_a_flag_with_its_help_and_default(name, capsys):
    with pytest.raises(SystemExit):
        cli.main(name.split() + ["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for f in dataclasses.fields(cli_command(name).options):
        flag = f.name if f.metadata["positional"] else f.metadata["flag"] or "--" + f.name.replace("_", "-")
        assert flag in text and " ".join(f.metadata["help"].split())[:40] in text, f.name
        if f.default not in (dataclasses.MISSING, None, False):
            assert f"(default {f.default})" in text, f.name


def test_values_reach_the_options_object(monkeypatch):
    args = parse(
        "eval",
        [
            "--adapter",
            "a=runs/a",
            "--adapter",
            "b=runs/b",
            "--normalize",
            "sql, case",
            "--stop",
            "x",
            "--stop",
            "y",
            "--metric",
            "bleu",
            "--max-new-tokens",
            "9",
            "--temperature",
            "0.5",
        ],
    )
    opts = options.from_args(options.EvalOptions, args)
    assert opts.adapters == {"a": "runs/a", "b": "runs/b"} and opts.normalize == ["sql", "case"]
    assert (opts.stop, opts.metrics, opts.max_new_tokens, opts.temperature) == (["x", "y"], ["bleu"], 9, 0.5)
    monkeypatch.setenv("LORAKIT_API_KEY", "from-env")
    serve = options.from_args(
        options.ServeOptions,
        parse("serve", ["--model", "m", "--batching", "off", "--watch-interval", "3", "--base-precision", "4bit"]),
    )
    assert (serve.api_key, serve.batching, serve.watch_interval_s, serve.base_precision) == (
        "from-env",
        "off",
        3.0,
        "4bit",
    )
    assert options.from_args(options.ServeOptions, parse("serve", ["--model", "m", "--api-key", "k"])).api_key == "k"
    with pytest.raises(LorakitError, match="--adapter 'nameonly' is not NAME=PATH"):
        options.from_args(options.EvalOptions, parse("eval", ["--adapter", "nameonly"]))
    with pytest.raises(SystemExit):
        parse("serve", ["--model", "m", "--dtype", "int3"])  # choices come from the Literal


@pytest.mark.parametrize(
    "argv",
    [
        ["train", "run.yaml", "--resume", "train.max_steps=5", "train.lr=1e-3"],
        ["train", "run.yaml", "train.max_steps=5", "--resume", "train.lr=1e-3"],
        ["train", "--resume", "run.yaml", "train.max_steps=5", "train.lr=1e-3"],
        ["data", "preview", "run.yaml", "-n", "0", "train.max_steps=5", "train.lr=1e-3"],
    ],
)
def test_overrides_and_options_in_any_order(argv, monkeypatch):
    from lorakit import config, data, model, preview, train

    seen = {}
    cfg = SimpleNamespace(model="m", trust_remote_code=False, data=None, objective="sft", preference=None)
    monkeypatch.setattr(
        config, "load", lambda path, overrides, local: seen.update(path=path, overrides=overrides) or cfg
    )
    monkeypatch.setattr(train, "run", lambda cfg, **kw: seen.update(kw) or SimpleNamespace(summary={}))
    monkeypatch.setattr(model, "load_tokenizer", lambda *a, **kw: None)
    monkeypatch.setattr(data, "prepare", lambda *a, **kw: SimpleNamespace(train=None, stats={}))
    monkeypatch.setattr(preview, "print_preview", lambda *a, n, color: seen.update(n=n))
    assert cli.main(argv) == 0
    assert seen["path"] == "run.yaml" and seen["overrides"] == ["train.max_steps=5", "train.lr=1e-3"]
    assert seen.get("resume", True) and seen.get("n", 0) == 0


def test_a_stray_flag_is_still_an_error(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "run.yaml", "train.lr=1e-3", "--no-such-flag"])
    assert e.value.code == 2 and "unrecognized arguments: --no-such-flag" in capsys.readouterr().err


def other_value(f: dataclasses.Field, kind) -> object:
    """A value of the field's type that is not its default, within its range."""
    inner, choices = options._unwrap(kind)
    default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    if choices:
        return next(c for c in reversed(choices) if c != default)
    if inner is bool:
        return True
    if inner in (int, float):
        low, high = f.metadata["minimum"], f.metadata["maximum"]
        value = inner((low if low is not None else 0) + 3)
        return value if high is None else min(value, inner(high))
    if typing.get_origin(inner) is dict:
        return {"a": "runs/a", "b-2": "my runs/b=c"}
    if typing.get_origin(inner) is list:
        return ["x", "y z"] if not f.metadata["comma"] else ["sql", "case"]
    return "a value, with spaces"


@pytest.mark.parametrize("name", [c.name for c in cli.COMMANDS])
def test_every_field_of_every_command_survives_to_argv_and_back(name):
    """What a launcher passes on (options.to_argv) is what the command parses: no field is forgotten."""
    cmd = cli_command(name)
    hints = typing.get_type_hints(cmd.options)
    fields = [f for f in dataclasses.fields(cmd.options) if not f.metadata["env"]]
    opts = cmd.options(**{f.name: other_value(f, hints[f.name]) for f in fields})
    argv = options.to_argv(opts)
    back = options.from_args(cmd.options, parse(name, argv))
    assert back == opts
    required = {f.name: getattr(opts, f.name) for f in fields if is_required(f)}
    assert len(options.to_argv(cmd.options(**required))) == len(required), "a field at its default is left out"


def test_a_secret_from_the_environment_never_reaches_a_command_line():
    opts = options.ServeOptions(model="m", api_key="s3cret")
    assert options.to_argv(opts) == ["--model=m"]


def is_required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def test_a_launch_passes_every_train_option_but_its_own_to_the_ranks():
    from lorakit import launch

    launched = options.TrainOptions(no_progress=True, force=True, resume=True, nproc=2, nnodes=2, master_port=4000)
    assert launch._rank_argv("run.yaml", ["train.lr=0.1"], launched, local=True) == [
        "train", "run.yaml", "train.lr=0.1", "--local", "--no-progress", "--force",
    ]  # fmt: skip
    every = {f.name for f in dataclasses.fields(options.TrainOptions)}
    assert set(launch.LAUNCH_OPTIONS) < every, "the launch's own options are TrainOptions fields"
