"""`lorakit data preview` on every shared data set, and every bad input ending in exit code 2."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lorakit import cli

PARADETOX_TEMPLATE = {"prompt": "Rewrite this comment politely: {toxic}", "completion": "{neutral1}"}
SHARED_FILES = [
    ("alpaca/alpaca_5000.json", None, "alpaca"),
    ("alpaca/alpaca_gpt4_en_demo_llamafactory.json", None, "alpaca"),
    ("gpteacher/codegen-instruct.json", None, "alpaca"),
    ("gpteacher/roleplay-simple-deduped-roleplay-instruct.json", None, "alpaca"),
    ("guanaco/guanaco-llama2-1k-train.parquet", None, "chat_text"),
    ("guanaco/guanaco_1k_human_assistant.jsonl", None, "chat_text"),
    ("guanaco/guanaco_1k_messages.jsonl", None, "messages"),
    ("paradetox/paradetox.tsv", PARADETOX_TEMPLATE, "template"),
    ("sharegpt/glaive_toolcall_en_demo.json", None, "sharegpt"),
    ("sharegpt/sharegpt_v3_first1000.json", None, "sharegpt"),
    ("sql/wikisql_mlx/train.jsonl", None, "text"),
]


def write_config(tmp_path: Path, model_dir: Path, **data) -> Path:
    data.setdefault("cache_dir", str(tmp_path / "cache"))
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"model": str(model_dir), "data": data}))
    return path


@pytest.mark.parametrize("rel, template, fmt", SHARED_FILES, ids=[f[0].split("/")[-1] for f in SHARED_FILES])
def test_preview_every_shared_file(tmp_path, tiny_llama_dir, shared_data, capsys, rel, template, fmt):
    cfg = write_config(tmp_path, tiny_llama_dir, train=str(shared_data / rel), limit=40, template=template)
    assert cli.main(["data", "preview", str(cfg), "-n", "2", "--no-color"]) == 0
    out = capsys.readouterr().out
    assert out.count("──── example") == 2
    assert "[[" in out and "]]" in out, "trained spans are marked"
    assert f"format          {fmt}" in out
    for line in ("rows            40", "trained tokens", "truncated rows", "rows dropped"):
        assert line in out


def test_preview_colors_on_a_terminal(tmp_path, tiny_llama_dir, capsys):
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"prompt": "hi", "completion": "hello"}) + "\n")
    from lorakit import data, model, preview
    from lorakit.config import DataConfig

    tok = model.load_tokenizer(str(tiny_llama_dir))
    p = data.prepare(DataConfig(train=str(f), cache_dir=str(tmp_path / "c")), tok)
    preview.print_preview(tok, p.train, p.stats, n=1, color=True)
    out = capsys.readouterr().out
    assert f"{preview.GREEN}hello<|im_end|>{preview.RESET}" in out and "[[" not in out


def test_preview_warns_when_few_tokens_are_trained(tmp_path, tiny_llama_dir, capsys):
    f = tmp_path / "d.jsonl"
    f.write_text(
        "".join(json.dumps({"prompt": "the quick brown fox " * 30, "completion": "ok"}) + "\n" for _ in range(3))
    )
    assert cli.main(["data", "preview", str(write_config(tmp_path, tiny_llama_dir, train=str(f))), "--no-color"]) == 0
    assert "WARNING: only" in capsys.readouterr().out


def test_override_on_the_command_line(tmp_path, tiny_llama_dir, shared_data, capsys):
    cfg = write_config(tmp_path, tiny_llama_dir, train="nope.jsonl")
    args = [
        "data",
        "preview",
        str(cfg),
        f"data.train={shared_data / 'alpaca/alpaca_5000.json'}",
        "data.limit=7",
        "-n",
        "0",
    ]
    assert cli.main(args) == 0
    assert "rows            7" in capsys.readouterr().out


def bad_cases(tmp_path: Path):
    """(name, data config or raw config override, expected fragment of the one-line message)."""
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"question": "q", "answer": "a"}) + "\n")
    wrong_type = tmp_path / "wrong_type.jsonl"
    wrong_type.write_text(
        json.dumps({"instruction": "a", "output": "b"}) + "\n" + json.dumps({"instruction": "a", "output": 5}) + "\n"
    )
    missing = tmp_path / "missing.jsonl"
    missing.write_text(json.dumps({"instruction": "a", "output": "b"}) + "\n" + json.dumps({"instruction": "a"}) + "\n")
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"prompt": "a", "completion": ""}) + "\n")
    (tmp_path / "data.xlsx").write_text("x")
    (tmp_path / "nothing.jsonl").write_text("")
    (tmp_path / "latin1.csv").write_bytes("prompt,completion\ncaf\xe9,ok\n".encode("latin-1"))
    scores = tmp_path / "scores.tsv"
    scores.write_text("q\tscore\nhow good?\t5\n")
    return [
        ("missing file", {"train": str(tmp_path / "nope.jsonl")}, "data file not found"),
        ("unknown extension", {"train": str(tmp_path / "data.xlsx")}, "unsupported file type '.xlsx'"),
        (
            "undetectable format",
            {"train": str(good)},
            "cannot tell the data format from the columns ['answer', 'question']",
        ),
        ("row of wrong type", {"train": str(wrong_type)}, "wrong_type.jsonl:2: field 'output' must be str"),
        ("missing field", {"train": str(missing)}, "missing.jsonl:2: missing field 'output'"),
        ("empty after filtering", {"train": str(empty)}, "no usable rows left after filtering"),
        ("empty file", {"train": str(tmp_path / "nothing.jsonl")}, "nothing.jsonl: no rows to read"),
        (
            "not UTF-8",
            {"train": str(tmp_path / "latin1.csv")},
            "latin1.csv:2: not UTF-8 text (invalid continuation byte at byte 21)",
        ),
        (
            "template fill",
            {"train": str(scores), "template": {"prompt": "{q}", "completion": "{score:d}"}},
            "scores.tsv:2: data.template.completion '{score:d}' cannot be filled from this row",
        ),
        ("eval fraction", {"train": str(good), "eval": 1.5}, "data.eval: an eval fraction must be between 0 and 1"),
        (
            "template column",
            {"train": str(good), "template": {"prompt": "{questoin}", "completion": "{answer}"}},
            "data.template.prompt names column(s) ['questoin']",
        ),
        ("unknown key", {"train": str(good), "packingg": True}, "data.packingg: unknown key"),
        ("wrong type", {"train": str(good), "max_length": "long"}, "data.max_length: Input should be a valid integer"),
    ]


def test_every_bad_input_is_one_message_and_exit_2(tmp_path, tiny_llama_dir, capsys):
    for name, data_cfg, fragment in bad_cases(tmp_path):
        cfg = write_config(tmp_path, tiny_llama_dir, **data_cfg)
        assert cli.main(["data", "preview", str(cfg)]) == 2, name
        err = capsys.readouterr().err
        assert err.startswith("error: ") and fragment in err, (name, err)
        assert "Traceback" not in err


def test_console_script_exit_code_and_no_traceback(tmp_path, tiny_llama_dir):
    cfg = write_config(tmp_path, tiny_llama_dir, train=str(tmp_path / "nope.jsonl"))
    exe = Path(sys.executable).parent / "lorakit"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    res = subprocess.run([str(exe), "data", "preview", str(cfg)], capture_output=True, text=True, env=env)
    assert res.returncode == 2
    assert res.stderr.startswith("error: data file not found") and "Traceback" not in res.stderr
    helped = subprocess.run([str(exe), "--help"], capture_output=True, text=True)
    assert helped.returncode == 0 and "data" in helped.stdout


def test_help_explains_every_config_key(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["data", "preview", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for key in ("data.train_on", "data.packing", "adapter.r", "train.grad_accum", "output_dir", "-n N"):
        assert key in out
