"""Preference training (objective dpo, orpo, kto) on a tiny llama: each objective learns a preference it can learn,
its logged losses are the pure formulas of independent log-probs, a killed run resumes to the same weights and
metrics without scoring the reference again, and its adapter is served; adapter.init continues an adapter (SFT too)
and is DPO's reference; --nproc 2 equals one process; plan and time_budget know two sequences a pair."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from fastapi.testclient import TestClient
from openai import OpenAI
from peft import PeftModel
from safetensors.torch import load_file
from test_distributed import free_port
from transformers import AutoModelForCausalLM, AutoTokenizer

from lorakit import budget, config, data, objectives, reference, train
from lorakit.generate import generate
from lorakit.render import IGNORE
from lorakit.serve import server
from tiny import save_tiny

WORDS = ["red", "green", "blue", "cat", "dog", "fish", "sun", "moon", "star", "one", "two", "three"]
# A preference the tiny model can learn whatever the prompt: always this answer, never that one.
GOOD, BAD = "The capital of France is Paris.", "You are wrong and this is stupid."
ROWS_KEPT = ("tokens_per_s", "train_s")  # timing: the only metrics a resumed run may log differently


def prompts(n: int) -> list[str]:
    import random

    rng = random.Random(0)
    return [f"Tell me about {' '.join(rng.choices(WORDS, k=3))}" for _ in range(n)]


def data_file(tmp: Path, objective: str, n: int = 24) -> Path:
    if objective == "kto":  # unpaired: every other row the good answer, labelled true
        rows = [{"prompt": p, "completion": GOOD if k % 2 else BAD, "label": bool(k % 2)}
                for k, p in enumerate(prompts(n))]  # fmt: skip
    else:
        rows = [{"prompt": p, "chosen": GOOD, "rejected": BAD} for p in prompts(n)]
    path = tmp / f"{objective}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("llama"), arch="llama")


def make_config(tmp: Path, base: Path, objective: str, out: str = "run", **over) -> config.RunConfig:
    raw = {
        "model": str(base),
        "objective": objective,
        "output_dir": str(tmp / out),
        "adapter": {"r": 8, "alpha": 16, "dropout": 0.0},
        "data": {"train": str(data_file(tmp, objective)), "eval": 0.25, "max_length": 64,
                 "cache_dir": str(tmp / "cache")},
        "train": {"max_steps": 12, "batch_size": 2, "grad_accum": 2, "lr": 1e-2, "seed": 0, "scheduler": "constant",
                  "eval_every": 4},
    }  # fmt: skip
    for key, value in over.items():
        config.apply_override(raw, f"{key}={json.dumps(value)}")
    return config.validate(raw)


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def count_reference_passes(monkeypatch) -> list[int]:
    calls: list[int] = []
    real = reference.log_probs
    monkeypatch.setattr(reference, "log_probs", lambda *a, **k: calls.append(len(a[1])) or real(*a, **k))
    return calls


def lorakit(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lorakit", *args], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **(env or {})})  # fmt: skip


def served_answer(runs: Path, base: Path, name: str) -> str:
    """The adapter's greedy answer through `lorakit serve` (in process, the openai client)."""
    app, _ = server.build(server.ServeOptions(model=str(base), served_model_name="base", adapters_dir=str(runs)))
    client = OpenAI(base_url="http://testserver/v1", api_key="none", http_client=TestClient(app), max_retries=0)
    assert name in {m.id for m in client.models.list().data}
    msgs = [{"role": "user", "content": "Tell me about the sun"}]
    answer = client.chat.completions.create(model=name, messages=msgs, max_tokens=8, temperature=0)
    return answer.choices[0].message.content


@pytest.mark.parametrize("objective", ["dpo", "orpo", "kto"])
def test_each_objective_learns_resumes_exactly_and_is_served(tmp_path, base, objective, monkeypatch):
    keys = {"train.save_every": 2, "train.keep_best": "eval_loss"}
    cfg = make_config(tmp_path, base, objective, "runs/whole", **keys)
    calls = count_reference_passes(monkeypatch)
    summary = train.run(cfg, progress=False).summary
    assert calls == ([] if objective == "orpo" else [18, 6]), "one pass over train and held-out items; none for orpo"
    whole = records(tmp_path / "runs" / "whole")
    assert [r["step"] for r in whole] == list(range(1, 13))
    for key in ("loss", *objectives.METRICS):
        assert key in whole[0] and f"eval_{key}" in whole[-1], key
    if objective == "dpo":
        assert whole[0]["loss"] == pytest.approx(0.6931471805599453, abs=1e-4), "a new adapter is its reference"
    # What the run learned: held-out pairs (rows) ranked right by the reward, by a margin.
    assert whole[-1]["eval_rewards_accuracy"] >= 0.9 and whole[-1]["eval_rewards_margin"] > 0, whole[-1]
    assert summary["best_eval_loss"] == min(r["eval_loss"] for r in whole if "eval_loss" in r)
    assert summary["objective"] == objective and (tmp_path / "runs" / "whole" / "loss.png").is_file()
    # Padding-free, and a pair's prompt run once (its rejected answer a branch); a KTO row is one sequence.
    assert summary["padding_share"] == 0 and (summary["shared_share"] > 0) == (objective != "kto"), summary
    assert not summary["packing"], "pairs (rows) are never packed together"
    assert ("reference_s" not in summary) if objective == "orpo" else summary["reference_s"] > 0, summary

    # A rerun of the same data and model reads the reference; `lorakit train` killed by SIGKILL after step 5, it
    # resumes exactly.
    killed = tmp_path / "killed.yaml"
    killed.write_text(yaml.safe_dump(cfg.model_copy(update={"output_dir": str(tmp_path / "runs" / "killed")})
                                     .model_dump(mode="json")))  # fmt: skip
    died = lorakit("train", str(killed), "--no-progress", env={"LORAKIT_KILL_AFTER_STEP": "5"})
    assert died.returncode == -signal.SIGKILL, died.stderr[-2000:]
    assert ("reference log-probs" not in died.stdout) if objective == "orpo" else (
        "reference log-probs: read from" in died.stdout), died.stdout  # fmt: skip
    assert calls == ([] if objective == "orpo" else [18, 6]), "the rerun read the reference"
    resumed_summary = train.run(config.load(killed), resume=True, progress=False).summary
    assert calls == ([] if objective == "orpo" else [18, 6]), "--resume scores nothing again"
    assert resumed_summary.get("reference_s", 0.0) == 0.0, "read, not scored"
    resumed = records(tmp_path / "runs" / "killed")
    assert [{k: v for k, v in r.items() if k not in ROWS_KEPT} for r in resumed] == [
        {k: v for k, v in r.items() if k not in ROWS_KEPT} for r in whole
    ]
    for part in ("adapter/adapter_model.safetensors", "checkpoints/step-0000012/trainable.safetensors"):
        a, b = load_file(tmp_path / "runs" / "whole" / part), load_file(tmp_path / "runs" / "killed" / part)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part

    # The published adapter is an ordinary one: lorakit serve answers with it, as plain peft does.
    net = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), tmp_path / "runs" / "whole" / "adapter")
    msgs = [[{"role": "user", "content": "Tell me about the sun"}]]
    offline = generate(net, AutoTokenizer.from_pretrained(base), msgs, max_new_tokens=8)[0]
    assert served_answer(tmp_path / "runs", base, "whole") == offline


def plain_logps(net, seqs: list[dict]) -> torch.Tensor:
    """Each sequence alone through a plain Hugging Face forward: the summed log-probs of its trained tokens."""
    out = []
    with torch.no_grad():
        for s in seqs:
            logits = net(input_ids=torch.tensor([s["input_ids"]])).logits[0, :-1].float()
            labels = torch.tensor(s["labels"][1:])
            keep = labels != IGNORE
            out.append(F.log_softmax(logits[keep], -1).gather(1, labels[keep, None]).sum())
    return torch.stack(out).double()


def trained_tokens(seqs: list[dict]) -> torch.Tensor:
    return torch.tensor([sum(x != IGNORE for x in s["labels"][1:]) for s in seqs])


@pytest.mark.parametrize("objective", ["dpo", "orpo", "kto"])
def test_the_logged_loss_is_the_formula_of_independent_log_probs(tmp_path, base, objective):
    # Step 2 trains every item once (8 items, 2 x 2 x 2 a step), with the weights step 1 left (its checkpoint):
    # its logged loss and metrics from plain forwards of each sequence alone, through objectives' pure formulas.
    smoothing = {"preference.label_smoothing": 0.1} if objective == "dpo" else {}
    over = {"data.eval": None, "data.limit": 8, "train.max_steps": 2, "train.save_every": 1, "train.grad_accum": 4,
            "train.eval_every": None, **smoothing}  # fmt: skip
    cfg = make_config(tmp_path, base, objective, **over)
    train.run(cfg, progress=False)
    logged = records(tmp_path / "run")[1]
    tok = AutoTokenizer.from_pretrained(base)
    ds = data.prepare(cfg.data, tok, objective, cfg.preference).train
    assert len(ds) == 8
    ref_net = AutoModelForCausalLM.from_pretrained(base)
    net = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), tmp_path / "run" / "checkpoints" /
                                    "step-0000001" / "adapter")  # fmt: skip
    p = cfg.preference
    if objective == "kto":
        seqs = [{"input_ids": i, "labels": lab} for i, lab in zip(ds["input_ids"], ds["labels"])]
        n = ds["prompt_len"]
        # KTO's KL sequences: each prompt with the answer of the row before it.
        kl = [{"input_ids": s["input_ids"][: n[k]] + seqs[k - 1]["input_ids"][n[k - 1] :],
               "labels": [IGNORE] * n[k] + seqs[k - 1]["labels"][n[k - 1] :]} for k, s in enumerate(seqs)]  # fmt: skip
        estimate = objectives.kl_estimate((plain_logps(net, kl) - plain_logps(ref_net, kl)).sum(), len(kl))
        pol, ref = plain_logps(net, seqs), plain_logps(ref_net, seqs)
        desirable = torch.tensor(ds["label"])
        losses, rewards = objectives.kto(pol, ref, desirable, estimate, p.beta)
        want = {"loss": losses.mean(), "rewards_chosen": rewards[desirable].mean(), "kl": estimate,
                "rewards_rejected": rewards[~desirable].mean(), "logps_chosen": pol[desirable].mean()}  # fmt: skip
    else:
        chosen = [{"input_ids": i, "labels": lab} for i, lab in zip(ds["chosen_input_ids"], ds["chosen_labels"])]
        rejected = [{"input_ids": i, "labels": lab} for i, lab in zip(ds["rejected_input_ids"], ds["rejected_labels"])]
        pc, pr = plain_logps(net, chosen), plain_logps(net, rejected)
        if objective == "dpo":
            rc, rr = plain_logps(ref_net, chosen), plain_logps(ref_net, rejected)
            losses, wc, wr = objectives.dpo(pc, pr, rc, rr, p.beta, p.loss, p.label_smoothing)
            logps = (pc, pr)
        else:
            cm, rm = pc / trained_tokens(chosen), pr / trained_tokens(rejected)
            losses, wc, wr = objectives.orpo(cm, rm, -cm, p.orpo_lambda)
            logps = (cm, rm)
        want = {"loss": losses.mean(), "rewards_chosen": wc.mean(), "rewards_rejected": wr.mean(),
                "rewards_margin": (wc - wr).mean(), "logps_chosen": logps[0].mean(),
                "logps_rejected": logps[1].mean()}  # fmt: skip
    assert abs(float(want["loss"]) - 0.6931) > 1e-3 or objective != "dpo", "policy and reference differ at step 2"
    for key, value in want.items():
        assert logged[key] == pytest.approx(float(value), rel=1e-4, abs=1e-5), key


def sft_file(tmp: Path) -> Path:
    path = tmp / "answers.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "completion": GOOD}) + "\n" for p in prompts(16)))
    return path


def test_adapter_init_continues_an_adapter_and_is_dpo_s_reference(tmp_path, base, monkeypatch):
    sft = {"data.train": str(sft_file(tmp_path)), "adapter.r": 4, "train.eval_every": None}
    first = make_config(tmp_path, base, "sft", "sft", **sft, **{"train.max_steps": 4})
    train.run(first, progress=False)
    start = load_file(tmp_path / "sft" / "adapter" / "adapter_model.safetensors")
    # SFT continued on new data: it starts from the adapter's weights, in its own shape (rank 4, not the config's 8).
    tiny_lr = {"train.max_steps": 1, "train.lr": 1e-9, "adapter.r": 8, "adapter.init": str(tmp_path / "sft")}
    again = make_config(tmp_path, base, "sft", "again", **{**sft, **tiny_lr})
    train.run(again, progress=False)
    went_on = load_file(tmp_path / "again" / "adapter" / "adapter_model.safetensors")
    assert went_on.keys() == start.keys() and all(torch.allclose(went_on[k], start[k], atol=1e-7) for k in start)
    assert json.loads((tmp_path / "again" / "adapter" / "adapter_config.json").read_text())["r"] == 4
    # DPO from it: its weights are the policy's start and the reference (the first loss is ln 2, not the base's).
    calls = count_reference_passes(monkeypatch)
    dpo = make_config(tmp_path, base, "dpo", "dpo", **{"adapter.init": str(tmp_path / "sft" / "adapter"),
                                                       "train.max_steps": 2})  # fmt: skip
    train.run(dpo, progress=False)
    assert records(tmp_path / "dpo")[0]["loss"] == pytest.approx(0.6931471805599453, abs=1e-4)
    fresh = make_config(tmp_path, base, "dpo", "fresh", **{"train.max_steps": 1})
    train.run(fresh, progress=False)
    assert len(calls) == 4, "another start, another reference: each scored once"
    kept = sorted((Path(data.prepare(dpo.data, AutoTokenizer.from_pretrained(base), "dpo").cache_path) /
                   "reference").glob("*.safetensors"))  # fmt: skip
    assert len(kept) == 2
    a, b = (load_file(p)["train"] for p in kept)
    assert not torch.allclose(a, b), "the adapter's reference is not the base's"


@pytest.mark.slow
def test_two_processes_score_their_share_of_the_reference_and_train_as_one(tmp_path, base):
    def run_file(name: str, batch: int) -> Path:
        cfg = make_config(tmp_path, base, "dpo", name, **{"train.batch_size": batch, "train.max_steps": 4,
                          "train.max_grad_norm": None, "data.cache_dir": str(tmp_path / f"cache-{name}")})  # fmt: skip
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
        return path

    train.run(config.load(run_file("one", 2)), progress=False)
    two = lorakit("train", str(run_file("two", 1)), "--nproc", "2", "--no-progress", f"--master-port={free_port()}")
    assert two.returncode == 0, two.stderr[-3000:]
    assert "reference log-probs: 48 sequences scored" in two.stdout, "each rank scored its share, none was read"
    a, b = records(tmp_path / "one"), records(tmp_path / "two")
    for key in ("loss", "rewards_margin", "eval_loss", "eval_rewards_accuracy"):
        assert [r[key] for r in a if key in r] == pytest.approx([r[key] for r in b if key in r], rel=1e-5, abs=1e-6)
    wa, wb = (load_file(tmp_path / n / "adapter" / "adapter_model.safetensors") for n in ("one", "two"))
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5, rtol=1e-4) for k in wa)


def test_a_time_budget_plans_a_preference_run(tmp_path, base, monkeypatch):
    planned: list[int] = []

    def plan_steps(budget_s, spent_s, done, step_s, *rest):
        planned.append(done)
        return 3 if done == 0 else 5

    monkeypatch.setattr(budget, "plan_steps", plan_steps)
    cfg = make_config(tmp_path, base, "dpo", **{"train.max_steps": None, "train.time_budget": "10m"})
    summary = train.run(cfg, progress=False).summary
    assert planned[:2] == [0, 1] and summary["steps"] == summary["planned_steps"] == 5
    assert len(records(tmp_path / "run")) == 5


def test_plan_counts_two_sequences_a_pair_and_the_reference_pass(tmp_path, base, capsys):
    cfgs = {}
    for objective in ("sft", "dpo", "orpo"):
        raw = {"model": str(base), "data": {"train": "x.jsonl", "max_length": 256}, "train": {"batch_size": 2}}
        cfgs[objective] = tmp_path / f"{objective}.yaml"
        cfgs[objective].write_text(yaml.safe_dump({**raw, "objective": objective}))
    out = {}
    for objective, path in cfgs.items():
        from lorakit import cli

        assert cli.main(["plan", str(path), "--device", "cpu", "--json"]) == 0
        out[objective] = json.loads(capsys.readouterr().out)
    sft, dpo, orpo = (out[k]["fits"]["this CPU"] for k in ("sft", "dpo", "orpo"))
    assert dpo["largest_batch"] == sft["largest_batch"] // 2, "a pair is two sequences of max_length"
    assert out["dpo"]["breakdown"]["activations"] == pytest.approx(2 * out["sft"]["breakdown"]["activations"], abs=2)
    assert dpo["reference_s_per_1000"] > 0 and orpo["reference_s_per_1000"] == 0
    notes = " ".join(out["dpo"]["notes"])
    assert "2 pairs, each two sequences" in notes and "reference pass" in notes
    assert "no reference pass" in " ".join(out["orpo"]["notes"])
