"""lorakit's DPO against TRL 1.16's DPOTrainer + PEFT: same model, pairs, order and settings; speed, memory, loss.

    python bench/dpo_vs_trl.py [--steps N] [--repeats 2] [--quick]

Settings, on SmolLM2-135M-Instruct in fp32 (both systems load it with lorakit.model.load_model, so the weights are
identical): LoRA r 16 / alpha 32 / dropout 0 on all linear layers, sigmoid DPO with beta 0.1, lr 5e-5 constant, no
warmup, no weight decay, clipping at 1.0, seed 0; the first steps x 2 pairs of LLaMA-Factory's dpo_en_demo.json
(ShareGPT conversations with a chosen and a rejected reply), so that each step trains new pairs (one epoch): max
length 512 a sequence (prompt + answer; a prompt keeps at least 256 tokens, lorakit's default half), batch 1 pair x
grad-accum 2, default 6 steps. One pair a micro-batch is TRL's best case: it pads a pair's two sequences to the
longer only, where larger micro-batches would pad more. TRL runs twice: its defaults (the reference is the base
with the adapter disabled, run forward beside the policy at every step) and with precompute_ref_log_probs=True (the
reference scored in one pass before training, as lorakit always does).

Both systems train on lorakit's tokens (its chat template, the model's own ChatML, and its truncation, which keeps a
prompt's end): TRL gets them as the prompt_ids/chosen_ids/rejected_ids its own preparation would make (trl_pair),
in lorakit's order, step by step and micro-batch by micro-batch (train.DataOrder, train.micro_batches), through a
sequential sampler. TRL's own tokenization of the same chats is compared beside (trl_tokenization) to say why: on
these pairs it also trains the template's newline after each answer's <|im_end|>, and it cuts a long sequence at
its end (dropping a pair whose prompt fills max_length) where lorakit keeps the prompt's end. Every step then sees
the same pairs and tokens in both systems (counted in both: the JSON says whether they are the same), a new adapter
(B = 0) makes the policy its own reference at step 1, so the first loss is ln 2 in both (within 1e-4), and the
per-step losses must agree within 2%, or the speed comparison does not count. TRL runs at its best on this CPU:
padded rows (TRL 1.16's DPO has no padding-free mode: padding_free=True warns and pads; its docs require
flash-attention for it anyway), its chunked log-prob head (no logits tensor), no activation checkpointing, fp32.

Runs alternate lorakit, TRL, TRL precomputed, lorakit..., each in its own process and with its own tokenization
cache, so that each one pays for its own reference pass and peak RSS (ru_maxrss) is per run. Timing leaves out the
first optimizer step (lazy initialization) and what comes before it (the reference passes included), from per-step
timestamps: lorakit's metrics.jsonl `train_s`, a TrainerCallback's on_step_end for TRL; each run's whole process
time is beside it. Targets (reported, not asserted): lorakit at least 1.5x the trained tokens/s of TRL's faster
arm, at most 0.8x its peak RSS.

Wall time: the default (6 steps, 12 pairs, --repeats 2) took 12 minutes on an idle 2-core AMD EPYC (2026-12-07);
--quick (3 steps, 6 pairs, one run each) 7.6 minutes on the shared, busy machine. Run it on an otherwise idle
machine.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import statistics
import sys
import tempfile
from collections import Counter
from pathlib import Path

import train_vs_peers as peers  # bench/ is this script's folder: its timing, spawning and loss agreement

MODEL = "smollm2-135m-instruct"
TRAIN = "preference/dpo_en_demo.json"  # under peers.DATA
SETTING = {"max_length": 512, "batch_size": 1, "grad_accum": 2, "lr": 5e-5, "beta": 0.1}
STEPS, QUICK_STEPS = 6, 3
IGNORE = -100  # lorakit.render.IGNORE: gpu_suite imports this module before --wheels has installed lorakit
FIRST_TOLERANCE = 1e-4  # the first step's loss against ln 2: policy and reference are the same weights
TARGETS = {"trained_speed_at_least": 1.5, "peak_rss_at_most": 0.8}  # lorakit over TRL's faster arm
TRL_WORDS = "padded rows (TRL 1.16's DPO has no padding-free mode), sdpa, its chunked log-prob head"
ARMS = {
    "trl": ({"precompute_ref_log_probs": False}, "its defaults: a reference forward (adapter disabled) every step"),
    "trl_precompute": ({"precompute_ref_log_probs": True}, "precompute_ref_log_probs=True: the reference scored "
                       "once before training"),
}  # fmt: skip
SYSTEMS = ("lorakit", *ARMS)


def run_config(steps: int, work: Path, name: str = "run") -> dict:
    """The lorakit config body of the comparison; TRL's arguments are read off the same body. Each run its own
    tokenization cache (and with it lorakit's reference): every run starts as a first run does."""
    s = SETTING
    return {
        "model": MODEL, "method": "lora", "objective": "dpo", "output_dir": str(work / name),
        "adapter": {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"},
        "preference": {"beta": s["beta"], "loss": "sigmoid"},
        "data": {"train": str(peers.DATA / TRAIN), "limit": steps * s["batch_size"] * s["grad_accum"],
                 "max_length": s["max_length"], "eval": None, "cache_dir": str(work / f"{name}-tokenized")},
        "train": {"max_steps": steps, "batch_size": s["batch_size"], "grad_accum": s["grad_accum"], "lr": s["lr"],
                  "scheduler": "constant", "warmup_steps": 0, "weight_decay": 0.0, "max_grad_norm": 1.0, "seed": 0,
                  "precision": "fp32", "save_every": None, "eval_every": None, "log_every": 1},
    }  # fmt: skip


def step_plan(cfg, prepared, steps: int) -> list[list[list[int]]]:
    """Per optimizer step, its micro-batches of pairs (indices into prepared.train) as lorakit's loop makes them: the
    step's pairs from train.DataOrder, grouped by train.micro_batches (longest first, by the pair's tokens)."""
    from lorakit import preference_train, train

    items = preference_train.items(prepared.train, cfg.objective, cfg.data.max_length)
    weights = [preference_train.tokens(x) for x in items]
    order = train.DataOrder(len(items), cfg.train.seed)
    per_step = cfg.train.batch_size * cfg.train.grad_accum
    return [train.micro_batches(order.rows(s, per_step), weights, cfg.train.batch_size) for s in range(steps)]


def trl_pair(row: dict) -> dict:
    """One of lorakit's tokenized pairs (data.prepare's columns) as TRL's DPOTrainer holds a pair after its own
    preparation: prompt_ids, chosen_ids, rejected_ids. Its collator joins the prompt to each answer and trains every
    answer token; raises ValueError where lorakit's labels say otherwise (untrained answer tokens, a trained prompt
    token, or prompts that differ), which TRL's form cannot carry."""
    n = row["prompt_len"]
    prompt = row["chosen_input_ids"][:n]
    out = {"prompt_ids": prompt}
    for side in ("chosen", "rejected"):
        ids, labels = row[f"{side}_input_ids"], row[f"{side}_labels"]
        if ids[:n] != prompt or labels[:n] != [IGNORE] * n or labels[n:] != ids[n:] or len(ids) == n:
            raise ValueError(
                f"{row.get('where', 'a pair')}: its {side} sequence is not the shared prompt ({n} tokens, untrained) "
                "followed by a wholly trained answer, which is all TRL's prompt_ids/chosen_ids/rejected_ids can hold"
            )
        out[f"{side}_ids"] = ids[n:]
    return out


def trl_rows(ds, plan: list[list[list[int]]]) -> list[dict]:
    """TRL's rows for the plan: each step's micro-batches in order, read front to back by a sequential sampler."""
    return [trl_pair(ds[i]) for step in plan for micro in step for i in micro]


def step_tokens(ds, plan: list[list[list[int]]]) -> tuple[list[int], list[int]]:
    """Input tokens (both sequences of each pair) and trained tokens of each step, from lorakit's tokens."""
    tokens, trained = [], []
    for step in plan:
        rows = [ds[i] for micro in step for i in micro]
        sides = [(r[f"{s}_input_ids"], r[f"{s}_labels"]) for r in rows for s in ("chosen", "rejected")]
        tokens.append(sum(len(ids) for ids, _ in sides))
        trained.append(sum(peers.trained(labels) for _, labels in sides))
    return tokens, trained


def one_trl(cfg, arm: str, load: dict | None = None, keys: dict | None = None) -> dict:
    """TRL's DPOTrainer + PEFT on cfg's pairs: lorakit's tokens (trl_rows) in lorakit's steps, `arm`'s reference
    (ARMS). `load`: lorakit.model.load_model's keywords (default fp32 on the CPU); `keys`: DPOConfig keys over this
    bench's (the GPU suite's device, precision, optimizer and kernels)."""
    import time

    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    from lorakit import data, model

    tok = model.load_tokenizer(cfg.model)
    prepared = data.prepare(cfg.data, tok, cfg.objective, cfg.preference)  # lorakit's tokens, as its run makes them
    t, p = cfg.train, cfg.preference
    ds = Dataset.from_list(trl_rows(prepared.train, step_plan(cfg, prepared, t.max_steps)))
    net = model.load_model(cfg.model, **(load or {"dtype": torch.float32}))
    net.config.use_cache = False
    args = DPOConfig(**{
        "output_dir": cfg.output_dir, "max_steps": t.max_steps, "learning_rate": t.lr,
        "lr_scheduler_type": t.scheduler, "warmup_steps": t.warmup_steps, "weight_decay": t.weight_decay,
        "max_grad_norm": t.max_grad_norm, "seed": t.seed, "per_device_train_batch_size": t.batch_size,
        "gradient_accumulation_steps": t.grad_accum, "train_sampling_strategy": "sequential",
        # TRL's defaults differ from lorakit's here: it checkpoints activations and trains in bf16 unless told.
        "gradient_checkpointing": False, "bf16": False, "fp16": False, "use_cpu": True,
        "logging_steps": 1, "save_strategy": "no", "report_to": [], "dataloader_num_workers": 0, "disable_tqdm": True,
        # The sequences already fit max_length (lorakit cut them): the collator's own cut changes nothing.
        "beta": p.beta, "loss_type": [p.loss], "max_length": cfg.data.max_length, **ARMS[arm][0], **(keys or {}),
    })  # fmt: skip
    lora = LoraConfig(r=cfg.adapter.r, lora_alpha=cfg.adapter.alpha, lora_dropout=cfg.adapter.dropout,
                      target_modules="all-linear", task_type="CAUSAL_LM")  # fmt: skip
    seen: list[tuple[int, int, int]] = []  # (input tokens, trained tokens, positions) per micro-batch, in order
    out: dict = {"losses": [], "step_end_s": []}

    class Counting(DPOTrainer):
        def _prepare_dataset(self, dataset, *rest, **kw):
            # Already TRL's tokenized columns, made from lorakit's tokens (trl_rows); TRL's own tokenization of the
            # chats differs (trl_tokenization), and preparing is not what is timed.
            return dataset

        def training_step(self, model, inputs, *rest, **kw):  # counts what the loop consumed, the batch unchanged
            trained = inputs["completion_mask"][:, 1:]  # position t scores token t + 1, as lorakit's labels do
            seen.append((int(inputs["attention_mask"].sum()), int(trained.sum()), inputs["input_ids"].numel()))
            return super().training_step(model, inputs, *rest, **kw)

    tic = time.perf_counter()
    trainer = Counting(model=net, args=args, train_dataset=ds, processing_class=tok, peft_config=lora,
                       callbacks=[peers.trl_clock(out)])  # fmt: skip
    setup_s = time.perf_counter() - tic  # with precompute_ref_log_probs, TRL's reference pass is in here
    metrics = trainer.train().metrics
    g = t.grad_accum  # micro-batches a step
    steps = [[sum(x) for x in zip(*seen[k : k + g])] for k in range(0, len(seen), g)]
    return {"losses": out["losses"], "step_end_s": out["step_end_s"], "loop_s": metrics["train_runtime"],
            "setup_s": round(setup_s, 2), "step_tokens": [s[0] for s in steps], "step_trained": [s[1] for s in steps],
            "step_positions": [s[2] for s in steps], "setting": f"{TRL_WORDS}; {ARMS[arm][1]}"}  # fmt: skip


# ---- TRL's own tokenization of the same chats, against lorakit's ----
def trl_chat(pair: dict) -> dict:
    """A converted pair (lorakit.preference's internal form) as TRL's conversational preference row."""
    tools = pair.get("tools")
    return {"prompt": pair["prompt"], "chosen": pair["chosen"], "rejected": pair["rejected"],
            "tools": json.dumps(tools) if tools else None}  # fmt: skip


def token_differences(ours: list[dict], theirs: list[dict], decode, max_length: int) -> dict:
    """lorakit's tokens of each pair against TRL's own (both in trl_pair's form; TRL's whole, cut here at max_length
    as its collator cuts them, keeping a sequence's start), sequence by sequence: how many are the same, how many are
    lorakit's followed by more tokens (what those are, decoded), how many differ otherwise; the trained tokens of
    each; and the pairs TRL would drop (a prompt that fills max_length)."""
    extra: Counter = Counter()
    same = other = dropped = ours_trained = theirs_trained = 0
    for a, b in zip(ours, theirs, strict=True):
        dropped += len(b["prompt_ids"]) >= max_length
        for side in ("chosen_ids", "rejected_ids"):
            mine = a["prompt_ids"] + a[side]
            cut = (b["prompt_ids"] + b[side])[:max_length]
            ours_trained += len(a[side])
            theirs_trained += max(0, len(cut) - len(b["prompt_ids"]))
            if cut == mine:
                same += 1
            elif cut[: len(mine)] == mine:
                extra[decode(cut[len(mine) :])] += 1
            else:
                other += 1
    return {"sequences": 2 * len(ours), "identical": same,
            "trl_trains_after_lorakit_s_end": {json.dumps(k): n for k, n in extra.items()},
            "differ_otherwise": other, "trl_would_drop_pairs": dropped,
            "trained_tokens": {"lorakit": ours_trained, "trl_own": theirs_trained}}  # fmt: skip


def trl_tokenization(cfg, tok, prepared, work: Path) -> dict:
    """What TRL 1.16's own preparation (DPOTrainer._prepare_dataset: the chat template and tokenization) and its
    collator's cut make of the same chats, compared with lorakit's tokens by token_differences, and in words why TRL
    is given lorakit's."""
    import types

    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from lorakit import preference, sources

    rows = sources.read(cfg.data.train, cfg.data.split, cfg.data.limit)
    conv = preference.convert(rows.records, rows.where, cfg.objective, cfg.data.format, cfg.data.system_prompt)
    chats = dict(zip(conv.where, conv.examples))
    ours = prepared.train
    ds = Dataset.from_list([trl_chat(chats[w]) for w in ours["where"]])
    args = DPOConfig(output_dir=str(work / "trl-tokenization"), max_length=None, use_cpu=True, report_to=[])
    # TRL tokenizes in this private method only; unbound, of the trainer it reads nothing the tokenizer does not give.
    theirs = DPOTrainer._prepare_dataset(types.SimpleNamespace(_tokenizer=tok), ds, tok, args, "check")
    got = token_differences([trl_pair(r) for r in ours], list(theirs), tok.decode, cfg.data.max_length)
    got["lorakit_truncated_pairs"] = sum(ours["truncated"])
    extra = got["trl_trains_after_lorakit_s_end"]
    more = ", ".join(f"{n} with {k}" for k, n in extra.items()) or "none"
    got["why_trl_gets_lorakit_tokens"] = (
        f"TRL's own preparation of the same {len(ours)} chats with the same template, cut at max_length "
        f"{cfg.data.max_length} as its collator cuts: {got['identical']} of {got['sequences']} sequences are "
        f"lorakit's; {sum(extra.values())} are lorakit's and then go on ({more}: the template's separator after the "
        f"end-of-turn token, which lorakit does not train); {got['differ_otherwise']} differ otherwise (lorakit cut "
        f"{got['lorakit_truncated_pairs']} pairs keeping each prompt's end, where TRL 1.16 keeps a sequence's start); "
        f"TRL would drop {got['trl_would_drop_pairs']} pairs. Trained tokens: lorakit "
        f"{got['trained_tokens']['lorakit']}, TRL's own {got['trained_tokens']['trl_own']}. Given lorakit's tokens, "
        "both train the same tokens at every step (same_tokens_per_step)."
    )
    return got


# ---- the comparison ----
def agreement(ours: list[float], theirs: list[float]) -> dict:
    """peers.agreement (within 2% at every step), and the first step's loss ln 2 in both within FIRST_TOLERANCE: a new
    adapter is zero, so the policy is its own reference. Either failing, the speed does not count."""
    if not ours or len(ours) != len(theirs):
        return {"agree": False, "verdict": f"{len(ours)} and {len(theirs)} steps logged: the speed does not count"}
    out = peers.agreement(ours, theirs)
    first = {"lorakit": ours[0] - math.log(2), "trl": theirs[0] - math.log(2)}
    first_ok = all(abs(d) <= FIRST_TOLERANCE for d in first.values())
    out |= {"first_minus_ln2": {k: float(f"{v:.3g}") for k, v in first.items()}, "first_is_ln2": first_ok}
    if not first_ok:
        out["agree"] = False
        out["verdict"] = f"the first step's loss is not ln 2 within {FIRST_TOLERANCE:g}: the speed does not count"
    return out


def compare(cfg, prepared, runs: dict[str, list[dict]]) -> dict:
    plan = step_plan(cfg, prepared, cfg.train.max_steps)
    lk_tokens, lk_trained = step_tokens(prepared.train, plan)
    out: dict = {"steps": cfg.train.max_steps, "timed_steps": cfg.train.max_steps - 1, "pairs": len(prepared.train),
                 "pairs_a_step": cfg.train.batch_size * cfg.train.grad_accum, "systems": {}, "agreement": {},
                 "same_tokens_per_step": {}}  # fmt: skip
    for system, rs in runs.items():
        mine = system == "lorakit"
        tokens, trained = (lk_tokens, lk_trained) if mine else (rs[0]["step_tokens"], rs[0]["step_trained"])
        ms = [peers.timed(r, tokens, trained) for r in rs]
        med = {k: statistics.median(m[k] for m in ms) for k in ms[0]}
        padding = rs[0]["padding_share"] if mine else round(1 - sum(tokens) / sum(rs[0]["step_positions"]), 4)
        out["systems"][system] = {
            **{k: round(v, 3) for k, v in med.items()}, "process_s": statistics.median(r["process_s"] for r in rs),
            "tokens": sum(tokens), "trained_tokens": sum(trained), "padding_share": padding,
            "losses": [round(x, 5) for x in rs[0]["losses"]], "timed_s_each": [round(m["timed_s"], 2) for m in ms],
            "setting": (f"lorakit, attention {rs[0]['attention']}, each pair's prompt run once "
                        f"({rs[0]['shared_share']:.1%} of its tokens)") if mine else rs[0]["setting"],
        }  # fmt: skip
        if not mine:
            out["same_tokens_per_step"][system] = tokens == lk_tokens and trained == lk_trained
            out["agreement"][system] = agreement(runs["lorakit"][0]["losses"], rs[0]["losses"])
    out["lorakit_recorded_tokens_match"] = runs["lorakit"][0]["recorded_tokens"][-1] == sum(lk_tokens)
    return out | verdict(out)


def verdict(out: dict) -> dict:
    """lorakit against TRL's faster arm (trained tokens/s), against the targets; whether the comparison counts."""
    lk, arms = out["systems"]["lorakit"], [s for s in out["systems"] if s != "lorakit"]
    faster = max(arms, key=lambda s: out["systems"][s]["trained_tokens_per_s"])
    versus = {}
    for arm in arms:
        them = out["systems"][arm]
        versus[arm] = {"trained_speed": round(lk["trained_tokens_per_s"] / them["trained_tokens_per_s"], 3),
                       "peak_rss": round(lk["peak_rss_gb"] / them["peak_rss_gb"], 3)}  # fmt: skip
    counts = all(a["agree"] for a in out["agreement"].values()) and all(out["same_tokens_per_step"].values())
    speed, memory = versus[faster]["trained_speed"], versus[faster]["peak_rss"]
    met = {"trained_speed": speed >= TARGETS["trained_speed_at_least"],
           "peak_rss": memory <= TARGETS["peak_rss_at_most"]}  # fmt: skip
    said = {k: "met" if v else "not met" for k, v in met.items()}
    why = "" if counts else " (it does not count: losses or tokens differ, see agreement and same_tokens_per_step)"
    words = (f"lorakit against TRL's faster arm ({faster}): {speed:.2f}x its trained tokens/s (target >= "
             f"{TARGETS['trained_speed_at_least']}: {said['trained_speed']}), {memory:.2f}x its peak RSS (target "
             f"<= {TARGETS['peak_rss_at_most']}: {said['peak_rss']}){why}")  # fmt: skip
    return {"lorakit_over_trl": versus, "faster_trl_arm": faster, "targets": TARGETS, "targets_met": met,
            "counts": counts, "verdict": words}  # fmt: skip


def table(r: dict) -> str:
    lines = [f"DPO, {MODEL} fp32, LoRA r16 all-linear, sigmoid beta {SETTING['beta']}: {r['pairs']} pairs, "
             f"{r['steps']} steps of {r['pairs_a_step']}; medians of steps 2..N",
             f"{'system':<16}{'trained tok/s':>14}{'tok/s':>8}{'peak GB':>9}{'process s':>11}{'padding':>9}"
             "  losses"]  # fmt: skip
    for system, s in r["systems"].items():
        losses = " ".join(f"{x:.4f}" for x in s["losses"])
        lines.append(f"{system:<16}{s['trained_tokens_per_s']:>14.1f}{s['tokens_per_s']:>8.1f}{s['peak_rss_gb']:>9.2f}"
                     f"{s['process_s']:>11.0f}{s['padding_share']:>9.1%}  {losses}")  # fmt: skip
        lines.append(f"{'':<16}{s['setting']}")
    for arm, a in r["agreement"].items():
        lines.append(f"{arm}: {a['verdict']}; same tokens every step: {r['same_tokens_per_step'][arm]}")
    lines.append(r["verdict"])
    return "\n".join(lines)


RUNNERS = {"lorakit": peers.one_lorakit, **{arm: functools.partial(one_trl, arm=arm) for arm in ARMS}}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, help=f"optimizer steps per run, at least 2 (default {STEPS}; "
                   f"{QUICK_STEPS} with --quick); the runs train the first steps x 2 pairs")  # fmt: skip
    p.add_argument("--repeats", type=int, help="runs per system, alternating (default 2; 1 with --quick)")
    p.add_argument("--quick", action="store_true", help=f"a short check: {QUICK_STEPS} steps, one run per system")
    p.add_argument("--_one", nargs=2, metavar=("SYSTEM", "BODY"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._one:
        return peers.child(*args._one, RUNNERS)
    steps = args.steps or (QUICK_STEPS if args.quick else STEPS)
    repeats = args.repeats or (1 if args.quick else 2)
    if steps < 2:
        p.error("--steps must be at least 2: the first step is left out of the timing")
    if repeats < 1:
        p.error("--repeats must be at least 1")
    if not (peers.DATA / TRAIN).is_file():
        print(f"skipped: the benchmark data is not here: {peers.DATA / TRAIN} (../shared/data beside the "
              "repository)", file=sys.stderr)  # fmt: skip
        return 0
    import torch

    from lorakit import config, data, model

    tok = model.load_tokenizer(MODEL)
    with tempfile.TemporaryDirectory() as td:
        work = Path(td)
        cfg = config.validate(run_config(steps, work))
        prepared = data.prepare(cfg.data, tok, cfg.objective, cfg.preference)
        tokenization = trl_tokenization(cfg, tok, prepared, work)
        runs: dict[str, list[dict]] = {s: [] for s in SYSTEMS}
        for rep in range(repeats):
            for system in SYSTEMS:
                runs[system].append(peers.spawn(system, run_config(steps, work, f"{system}-{rep}"), work, __file__))
        result = compare(cfg, prepared, runs)
    result = {"threads": torch.get_num_threads(), "repeats": repeats, "setting": SETTING, **result,
              "tokenization": tokenization}  # fmt: skip
    print(json.dumps(result, indent=1))
    print(table(result), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
