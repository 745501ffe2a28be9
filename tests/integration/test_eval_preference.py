"""`lorakit eval` on preference data: each model's preference and reward accuracy on held-out pairs (and KTO rows)
beside the generation comparison, against the base or the run's adapter.init as the reference."""

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from lorakit import cli, config, data, evaluate, model, train
from lorakit.render import IGNORE
from tiny import save_tiny

GOOD, BAD = "The capital of France is Paris.", "You are wrong and this is stupid."
PROMPTS = [f"Tell me about {w} number {i}" for i, w in enumerate(["red", "cat", "sun", "moon", "dog", "fish"] * 4)]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny llama; 'good', an adapter trained (SFT) to answer GOOD to any prompt; 'zero', an adapter that changes
    nothing (peft's B = 0); held-out pairs of unseen prompts, GOOD chosen over BAD."""
    tmp = tmp_path_factory.mktemp("eval-pref")
    base = save_tiny(tmp / "llama", arch="llama")
    sft = write_jsonl(tmp / "sft.jsonl", [{"prompt": p, "completion": GOOD} for p in PROMPTS[:16]])
    good = config.validate({
        "model": str(base), "output_dir": str(tmp / "runs" / "good"), "adapter": {"r": 8, "alpha": 16, "dropout": 0.0},
        "data": {"train": str(sft), "max_length": 64, "cache_dir": str(tmp / "cache")},
        "train": {"max_steps": 8, "batch_size": 2, "lr": 1e-2, "seed": 0, "scheduler": "constant"},
    })  # fmt: skip
    train.run(good, progress=False)
    zero = get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(r=4, target_modules=["q_proj"]))
    zero.save_pretrained(tmp / "zero")
    pairs = write_jsonl(tmp / "pairs.jsonl", [{"prompt": p, "chosen": GOOD, "rejected": BAD} for p in PROMPTS[16:]])
    return {"tmp": tmp, "base": base, "good": tmp / "runs" / "good", "zero": tmp / "zero", "pairs": pairs}


def dpo_config(w: dict, **adapter) -> config.RunConfig:
    return config.validate({
        "model": str(w["base"]), "objective": "dpo", "output_dir": str(w["tmp"] / "runs" / "dpo"), "adapter": adapter,
        "data": {"train": str(w["pairs"]), "eval": str(w["pairs"]), "max_length": 64, "cache_dir": str(w["tmp"] / "c")},
    })  # fmt: skip


def plain_logps(base: Path, seqs: list[tuple[list[int], list[int]]]) -> list[float]:
    """Each sequence alone through a plain Hugging Face forward of the base: its trained tokens' summed log-prob."""
    net = AutoModelForCausalLM.from_pretrained(base).eval()
    out = []
    with torch.no_grad():
        for ids, labels in seqs:
            logits = net(input_ids=torch.tensor([ids])).logits[0, :-1].float()
            target = torch.tensor(labels[1:])
            keep = target != IGNORE
            out.append(float(F.log_softmax(logits[keep], -1).gather(1, target[keep, None]).sum()))
    return out


def plain_preference_accuracy(cfg: config.RunConfig, path: str | None = None, limit: int | None = None) -> float:
    """The share of held-out pairs whose chosen answer the base finds likelier, by plain forwards."""
    ds = data.held_out_preference(cfg.data, model.load_tokenizer(cfg.model), "dpo", cfg.preference, path, limit)
    chosen = plain_logps(Path(cfg.model), list(zip(ds["chosen_input_ids"], ds["chosen_labels"])))
    rejected = plain_logps(Path(cfg.model), list(zip(ds["rejected_input_ids"], ds["rejected_labels"])))
    return sum(c > r for c, r in zip(chosen, rejected)) / len(ds)


def test_an_adapter_that_prefers_the_chosen_answers_ranks_every_pair_right(world, tmp_path):
    cfg = dpo_config(world)
    adapters = {"good": str(world["good"]), "zero": str(world["zero"])}
    report = evaluate.run(cfg, evaluate.EvalOptions(adapters=adapters, output=str(tmp_path / "out"), max_new_tokens=4))
    base, good, zero = (report["models"][n] for n in ("base", "good", "zero"))
    assert report["preference"] | {"explained": None} == {
        "objective": "dpo", "pairs": 8, "reference": "base", "beta": 0.1, "explained": None,
    }  # fmt: skip
    # The base is the reference: no reward of its own, only its plain preference, as plain forwards find it.
    assert base["reward_accuracy"] is None and base["reward_margin"] is None
    assert base["preference_accuracy"] == plain_preference_accuracy(cfg)
    assert good["reward_accuracy"] == 1.0 and good["reward_margin"] > 0 and good["preference_accuracy"] == 1.0
    # An adapter that changes nothing: every margin over the reference is zero, and a tie ranks no pair right.
    assert zero["reward_accuracy"] == 0.0 and zero["reward_margin"] == 0.0
    assert zero["preference_accuracy"] == base["preference_accuracy"]
    # Beside the generation comparison on the pairs' prompts, whose reference answer is the chosen one.
    assert {ex["reference"] for ex in report["examples"]} == {GOOD} and "chrf" in good
    page = (tmp_path / "out" / "eval.html").read_text()
    assert "<th>reward_accuracy</th>" in page and "over the reference than the rejected one" in page

    # The same pairs with chosen and rejected swapped: the same adapter now ranks every one wrong.
    swapped = write_jsonl(tmp_path / "swapped.jsonl", [{"prompt": p, "chosen": BAD, "rejected": GOOD} for p in PROMPTS])
    opts = evaluate.EvalOptions(adapters={"good": adapters["good"]}, data=str(swapped), output=str(tmp_path / "sw"),
                                max_new_tokens=2, limit=5)  # fmt: skip
    flipped = evaluate.run(cfg, opts)
    assert flipped["preference"]["pairs"] == 5 and len(flipped["examples"]) == 5
    assert flipped["models"]["good"]["reward_accuracy"] == 0.0 and flipped["models"]["good"]["reward_margin"] < 0
    assert flipped["models"]["good"]["preference_accuracy"] == 0.0


def test_the_reference_is_the_runs_adapter_init_where_it_has_one(world, tmp_path):
    """A DPO run from the SFT adapter compares with it: that adapter is the reference (no reward of its own), a copy
    of it elsewhere has margins of zero, and the base (which finds the chosen answer far less likely than the SFT
    adapter does) negative ones."""
    cfg = dpo_config(world, init=str(world["good"]))
    copy = shutil.copytree(world["good"] / "adapter", tmp_path / "copy")
    adapters = {"sft": str(world["good"]), "copy": str(copy)}
    report = evaluate.run(cfg, evaluate.EvalOptions(adapters=adapters, output=str(tmp_path / "out"), max_new_tokens=2))
    assert report["preference"]["reference"] == f"adapter.init: {world['good'] / 'adapter'}"
    base, sft, same = (report["models"][n] for n in ("base", "sft", "copy"))
    assert sft["reward_accuracy"] is None and sft["reward_margin"] is None and sft["preference_accuracy"] == 1.0
    assert same["reward_accuracy"] == 0.0 and same["reward_margin"] == 0.0 and same["preference_accuracy"] == 1.0
    assert base["reward_accuracy"] == 0.0 and base["reward_margin"] < 0
    assert base["preference_accuracy"] == plain_preference_accuracy(cfg)


def test_kto_rows_count_as_right_when_their_reward_has_their_labels_sign(world, tmp_path, capsys):
    """An sft run's config given a --data file of KTO rows: GOOD answers, 6 labelled desirable and 2 undesirable.
    The adapter made GOOD likelier everywhere: exactly the desirable rows are right."""
    rows = [{"prompt": p, "completion": GOOD, "label": k % 4 != 0} for k, p in enumerate(PROMPTS[16:])]
    kto = write_jsonl(tmp_path / "kto.jsonl", rows)
    run = tmp_path / "sft.yaml"
    run.write_text(yaml.safe_dump(config.load(world["good"] / "config.yaml").model_dump(mode="json")))
    args = ["eval", str(run), "--data", str(kto), "--adapter", f"good={world['good']}", "--output", str(tmp_path / "o")]
    assert cli.main([*args, "--max-new-tokens", "2"]) == 0
    report = json.loads((tmp_path / "o" / "eval.json").read_text())
    assert report["preference"]["objective"] == "kto" and report["preference"]["rows"] == 8
    good, base = report["models"]["good"], report["models"]["base"]
    assert good["reward_accuracy"] == 0.75 and good["preference_accuracy"] is None
    assert base["reward_accuracy"] is None
    assert len(report["examples"]) == 6, "the desirable rows are the generation's references"
    assert "sign of their label" in capsys.readouterr().out

    # A DPO run's eval given KTO rows: one message naming the file, exit 2.
    dpo = tmp_path / "dpo.yaml"
    dpo.write_text(yaml.safe_dump(dpo_config(world).model_dump(mode="json")))
    assert cli.main(["eval", str(dpo), "--data", str(kto), "--output", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    assert str(kto) in err and "objective: kto" in err and "Traceback" not in err


def test_a_real_file_of_llama_factory_pairs(world, tmp_path, shared_data):
    """dpo_en_demo.json (ShareGPT conversations with a chosen and a rejected message) as --data of an sft run."""
    demo = shared_data / "preference" / "dpo_en_demo.json"
    run = tmp_path / "sft.yaml"
    run.write_text(yaml.safe_dump(config.load(world["good"] / "config.yaml").model_dump(mode="json")))
    args = ["eval", str(run), "--data", str(demo), "--limit", "3", "--output", str(tmp_path / "o")]
    assert cli.main([*args, "--max-new-tokens", "2", "data.max_length=256"]) == 0
    report = json.loads((tmp_path / "o" / "eval.json").read_text())
    assert report["preference"]["pairs"] == 3 and report["preference"]["reference"] == "base"
    first = json.loads(demo.read_text())[:3]
    assert [ex["reference"] for ex in report["examples"]] == [row["chosen"]["value"] for row in first]
    cfg = config.load(run, ["data.max_length=256", "objective=dpo"])
    # Three pairs: an accuracy and its complement (chosen and rejected swapped) always differ.
    assert report["models"]["base"]["preference_accuracy"] == plain_preference_accuracy(cfg, str(demo), limit=3)
