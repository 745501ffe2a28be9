"""Run config: strict keys with paths in messages, overrides, and every shipped YAML parses."""

from pathlib import Path

import pytest
import yaml

from lorakit import config
from lorakit.errors import LorakitError

ROOT = Path(__file__).parents[2]


def write(tmp_path: Path, body: dict) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


def test_minimal_config_gets_defaults(tmp_path):
    cfg = config.load(write(tmp_path, {"data": {"train": "x.jsonl"}}))
    assert cfg.model == "smollm2-135m-instruct"
    assert cfg.method == "lora" and cfg.adapter.target_modules == "all-linear"
    assert cfg.data.train_on == "completions" and cfg.data.packing is True


def test_unknown_key_names_its_path_and_the_known_keys(tmp_path):
    with pytest.raises(LorakitError) as e:
        config.load(write(tmp_path, {"data": {"train": "x.jsonl", "formt": "alpaca"}}))
    msg = str(e.value)
    assert "data.formt: unknown key" in msg
    assert "format" in msg.split("Known keys here:")[1]
    assert str(tmp_path / "run.yaml") in msg


def test_wrong_type_names_its_path(tmp_path):
    with pytest.raises(
        LorakitError, match=r"train\.batch_size: must be a whole number from 1 to 4096, or auto \(got \"eight\"\)"
    ):
        config.load(write(tmp_path, {"data": {"train": "x"}, "train": {"batch_size": "eight"}}))


def test_a_rule_across_keys_names_its_key_not_the_whole_config(tmp_path):
    """A model validator's error read "(top level): ..." with the whole config as its value."""
    with pytest.raises(LorakitError) as e:
        config.load(write(tmp_path, {"method": "qlora", "data": {"train": "x"}, "train": {"strategy": "fsdp"}}))
    assert str(e.value).splitlines()[1] == (
        "  train.strategy: fsdp shards 16/32-bit weights, not QLoRA's 4-bit ones; use ddp for qlora (its 4-bit base "
        'fits one device), or method lora or full with fsdp (got "fsdp")'
    )


def test_every_problem_is_reported_at_once(tmp_path):
    with pytest.raises(LorakitError) as e:
        config.load(write(tmp_path, {"data": {"train": "x"}, "method": "prefix", "adapter": {"r": 0}}))
    assert "2 problems" in str(e.value) and "method" in str(e.value) and "adapter.r" in str(e.value)


@pytest.mark.parametrize("fraction", [0.0, 1.0, 1.5, -0.1])
def test_eval_fraction_outside_open_unit_interval_is_refused(tmp_path, fraction):
    with pytest.raises(LorakitError, match=r"data.eval: an eval fraction must be between 0 and 1"):
        config.load(write(tmp_path, {"data": {"train": "x.jsonl", "eval": fraction}}))


def test_overrides_are_typed_and_nested(tmp_path):
    cfg = config.load(
        write(tmp_path, {"data": {"train": "x.jsonl"}}),
        ["train.max_steps=20", "data.train=y.jsonl", "data.eval=0.1", "adapter.target_modules=[q_proj,v_proj]"],
    )
    assert cfg.train.max_steps == 20 and cfg.data.train == "y.jsonl" and cfg.data.eval == 0.1
    assert cfg.adapter.target_modules == ["q_proj", "v_proj"]


def test_an_override_of_a_text_key_is_its_text(tmp_path):
    """YAML reads `{a}` as a mapping: a template override written with braces failed as 'not a string'."""
    cfg = config.load(
        write(tmp_path, {"data": {"train": "x.jsonl"}}),
        ["data.template.prompt=Rewrite politely: {toxic}", "data.template.completion={neutral1}", "output_dir=[x]"],
    )
    assert (cfg.data.template.prompt, cfg.data.template.completion) == ("Rewrite politely: {toxic}", "{neutral1}")
    assert cfg.output_dir == "[x]"


@pytest.mark.parametrize("bad", ["train.max_steps", "=3", "train.nope=1"])
def test_bad_overrides_are_refused(tmp_path, bad):
    with pytest.raises(LorakitError):
        config.load(write(tmp_path, {"data": {"train": "x.jsonl"}}), [bad])


def test_missing_and_non_mapping_files(tmp_path):
    with pytest.raises(LorakitError, match="config file not found"):
        config.load(tmp_path / "nope.yaml")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(LorakitError, match="top level must be a mapping"):
        config.load(tmp_path / "list.yaml")
    (tmp_path / "bad.yaml").write_text("data: [unclosed\n")
    with pytest.raises(LorakitError, match="not valid YAML"):
        config.load(tmp_path / "bad.yaml")


def test_resolved_config_round_trips(tmp_path):
    cfg = config.load(write(tmp_path, {"data": {"train": "x.jsonl", "eval": 0.2}, "train": {"lr": 1e-3}}))
    config.dump(cfg, tmp_path / "resolved.yaml")
    assert config.load(tmp_path / "resolved.yaml") == cfg


@pytest.mark.parametrize("path", sorted((ROOT / "configs").rglob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_parses(path):
    """Every YAML under configs/, recipes included, and its local: twin where it has one."""
    config.load(path)
    if "local" in yaml.safe_load(path.read_text()):
        config.load(path, local=True)


def test_a_local_block_is_applied_section_by_section(tmp_path):
    path = write(
        tmp_path,
        {
            "model": "org/big",
            "data": {"train": "hub/set", "max_length": 2048},
            "local": {"model": "smollm2-135m-instruct", "data": {"train": "local.jsonl"}},
        },
    )
    assert config.load(path).model == "org/big"
    local = config.load(path, ["data.max_length=64"], local=True)
    assert (local.model, local.data.train, local.data.max_length) == ("smollm2-135m-instruct", "local.jsonl", 64)
    with pytest.raises(LorakitError, match="--local needs a `local:` block"):
        config.load(write(tmp_path, {"data": {"train": "x"}}), local=True)
    with pytest.raises(LorakitError, match=r"\(with its local: block\).*\n  data.nope: unknown key"):
        config.load(write(tmp_path, {"data": {"train": "x"}, "local": {"data": {"nope": 1}}}), local=True)
