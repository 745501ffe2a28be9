"""Unpacked training is padding-free: the losses of padded micro-batches, no padding, the attention named."""

import json
import random
from pathlib import Path

import pytest

from lorakit import attention, config, tracking, train
from lorakit.run_folder import RunFolder
from tiny import save_tiny

WORDS = ["red", "green", "blue", "cat", "dog", "fish", "one", "two", "three", "sun", "moon", "star"]


def task_file(path: Path, n: int = 40) -> Path:
    """Prompts of 1 to 14 words: rows this uneven left ~16% padding in micro-batches grouped by length."""
    rng = random.Random(0)
    with open(path, "w") as f:
        for _ in range(n):
            words = rng.choices(WORDS, k=rng.randint(1, 14))
            f.write(json.dumps({"prompt": "reverse: " + " ".join(words), "completion": " ".join(reversed(words))}))
            f.write("\n")
    return path


def run(tmp_path: Path, model_dir: Path, name: str) -> tuple[dict, list[dict]]:
    raw = {
        "model": str(model_dir),
        "output_dir": str(tmp_path / name),
        "adapter": {"r": 8, "alpha": 16, "dropout": 0.0},
        "data": {"train": str(task_file(tmp_path / "task.jsonl")), "eval": 0.2, "max_length": 128},
        "train": {"max_steps": 4, "batch_size": 4, "grad_accum": 2, "lr": 1e-3, "seed": 0, "eval_every": 2},
    }
    raw["data"] |= {"packing": False, "cache_dir": str(tmp_path / "cache")}
    cfg = config.validate(raw)
    summary = train.run(cfg, progress=False).summary
    return summary, tracking.read(RunFolder.of(cfg).metrics)


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_unpacked_training_is_padding_free_with_the_padded_losses(tmp_path, arch, monkeypatch):
    model_dir = save_tiny(tmp_path / arch, arch=arch)
    free, free_records = run(tmp_path, model_dir, "free")
    # Today's unpacked training as it was: the model's own attention, each micro-batch padded to its longest row.
    monkeypatch.setattr(attention, "choose", lambda model, device, dtype: attention.name(model))
    padded, padded_records = run(tmp_path, model_dir, "padded")
    own = "eager" if arch == "gemma2" else "sdpa"
    assert (free["attention"], padded["attention"]) == (f"{own}-per-row", own)
    assert free["padding_share"] == 0 and padded["padding_share"] > 0.1, padded["padding_share"]
    assert free["tokens"] == padded["tokens"] and free["trained_tokens"] == padded["trained_tokens"]
    on_disk = json.loads((tmp_path / "free" / "summary.json").read_text())
    assert on_disk["attention"] == f"{own}-per-row" and on_disk["padding_share"] == 0
    for key in ("loss", "eval_loss"):
        want = [r[key] for r in padded_records if key in r]
        got = [r[key] for r in free_records if key in r]
        assert len(got) == len(want) >= 2 and got == pytest.approx(want, rel=1e-5), key
