"""Preference tuning that helps on held-out prompts: base, SFT, SFT->DPO, SFT->ORPO (lorakit) and SFT->DPO (TRL).

    python bench/preference_quality.py [--seeds 0,1,2] [--sft-rows N] [--pairs N] [--eval-rows N] [--out DIR]
                                       [--quick]

ParaDetox (toxic -> polite rewrite) as preference pairs: the prompt is quality_vs_trl's detox prompt ("Rewrite
politely: {toxic}", as a user turn), the chosen answer the polite reference rewrite (neutral1), the rejected answer
the toxic input itself, copied. A row whose reference itself repeats its toxic input (`repeats`: ~5% of ParaDetox,
where the annotator changed little) would be a pair preferring nothing: it is left out, from training and held-out
rows alike. Each seed then trains, on SmolLM2-135M-Instruct in fp32, LoRA r 16 / alpha 32 / dropout 0.05 all-linear:
  sft        lorakit SFT on prompt -> chosen of the first --sft-rows rows: quality_vs_trl's detox run (lr 5e-4 linear,
             batch 4 x grad-accum 2, one epoch)
  dpo        lorakit DPO on the first --pairs of those rows' pairs, adapter.init = that seed's SFT adapter (its start
             and its reference): sigmoid, beta 0.1
  orpo       lorakit ORPO on the same pairs, from the same SFT adapter (lambda 0.1). ORPO's paper trains from the
             base in one stage, its NLL term doing the SFT; started here from the SFT adapter with DPO's pairs, steps
             and lr, the two objectives are compared alone (from the base it would need SFT's rows at twice SFT's cost)
  trl-dpo    TRL 1.16's DPOTrainer + PEFT from the same SFT adapter (a PeftModel and no peft_config: TRL trains the
             adapter and keeps a frozen copy of it as the reference, its documented way to retrain an adapter), set up
             by bench/dpo_vs_trl.py's one_trl (lorakit's tokens, in lorakit's order, step by step) with its
             reference precomputed, as lorakit's, and the adapter's dropout kept (TRL's disable_dropout=False), as
             lorakit keeps it
  DPO, ORPO and TRL's DPO alike: lr 5e-5 linear to 0, no warmup, batch 4 pairs x grad-accum 1, one epoch of --pairs.
  The lr was set once, not tuned: a first seed at 2e-4 over-optimized DPO (held-out reward accuracy 100% and no
  repeated input, but chrF halved against SFT's, 30.9 vs 61.6: the rewrites left the reference's wording), so a
  quarter of it; TRL's DPO at 2e-4 did the same (30.9).
  Every run: max length 256 (MAX_LENGTH: no pair is cut, as with quality_vs_trl's 1024).
Scores on held-out rows never trained on (the last --eval-rows kept rows of the TSV, none sharing a toxic text with
a training row), one `lorakit eval` per seed (quality_vs_trl.evaluate: greedy, 64 new tokens) of the base and that
seed's four adapters, with the seed's DPO run config, so the reference is that seed's SFT adapter:
  reward accuracy   eval's preference metric: the share of held-out pairs whose chosen answer gained more
                    log-probability over the reference (the SFT adapter) than the rejected one; "-" for the base and
                    the SFT adapter (the reference itself)
  preference acc.   eval's: the share of pairs whose chosen answer is likelier than the rejected one (every model)
  chrF              eval's, of the generated rewrite against the reference rewrite (the chosen answer)
  repeats %         the share of generated rewrites that repeat the toxic input: chrF (lorakit's, sacrebleu) of the
                    output against the input, both lowercased, >= 90. chrF ignores spaces, so ParaDetox's tokenized
                    "article ." matches "article."; lowercasing, since case does not make a text polite. Dropping one
                    swear word from a long sentence can stay above 90: that is why rows whose reference does are left
                    out, so that the reference rewrites repeat 0% by construction.
The check: lorakit's DPO mean at least TRL's DPO mean minus the larger spread (max - min over seeds) of the two, on
each score (repeats: at most TRL's plus the larger spread, lower being better); printed as holds / does not hold.

Each training run is its own process (quality_vs_trl.spawn; lorakit's runs through quality_vs_trl's child, TRL's
through this script's), its wall time from loading the model to the saved adapter. Output: a JSON line per model
and seed on stdout, then a markdown table (mean, min..max per system) and the check. --out keeps the run folders,
configs, pair files, eval.json/eval.html per seed and results.json.

Duration of the default (3 seeds, 160 SFT rows, 48 pairs, 24 held-out rows), estimated from quality_vs_trl's
measured step times on the idle 2-core Xeon (an 8-row detox SFT step: lorakit 2.6 s, TRL 3.7 s; ~8 s to start and
load a run; `lorakit eval` ~0.75 s per held-out row and model) and a pair being two rows' tokens:
  per seed: SFT 20 steps x 2.6 s + 8 = 60 s; DPO 12 steps of 4 pairs x 2.6 s + the reference pass (forward only,
  ~1/3 of a step's cost) + 8 = 50 s; ORPO 12 x 2.6 + 8 = 40 s; TRL 12 x 3.7 s + its precomputed reference + 12 = 70 s;
  eval 5 models x 24 rows x 0.75 s + 5 preference passes over 48 sequences (~5 s each) + 15 s start = 130 s.
  3 x 350 s: about 18 minutes; measured 23.8 minutes on a 2-core AMD EPYC (2026-12-07), mostly eval (~160 s a
  seed). (160 SFT rows and 40 held-out rows with 160 pairs would take ~45 minutes.)
`--quick` (1 seed, 16 SFT rows, 8 pairs, 4 held-out rows): a smoke run of every stage, 4.1 minutes on the shared,
busy machine with OMP_NUM_THREADS=1; its scores mean nothing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import quality_vs_trl as qv  # bench/ is this script's folder: the detox task, its runs, eval and table helpers

SYSTEMS = ("sft", "dpo", "orpo", "trl-dpo")
LABELS = {"base": "base", "sft": "SFT (lorakit)", "dpo": "SFT->DPO (lorakit)", "orpo": "SFT->ORPO (lorakit)",
          "trl-dpo": "SFT->DPO (TRL)"}  # fmt: skip
PREF = {"beta": 0.1, "loss": "sigmoid", "orpo_lambda": 0.1, "lr": 5e-5, "scheduler": "linear", "warmup_steps": 0,
        "batch_size": 4, "grad_accum": 1}  # fmt: skip
TRL_ARM = "trl_precompute"  # dpo_vs_trl.ARMS: the reference scored once before training, as lorakit does
# No ParaDetox chat (prompt + either answer, SmolLM2's template) exceeds 109 tokens: 256 cuts nothing, as
# quality_vs_trl's 1024 does not, and lorakit's memory plan, which sizes a run by it, then accepts a busy machine.
MAX_LENGTH = 256
REPEAT_CHRF = 90.0  # an output whose chrF against the toxic input is at least this repeats it
SCORES = {  # score -> (label, higher is better, scale for the table)
    "reward_accuracy": ("reward acc. %", True, 100),
    "preference_accuracy": ("pref. acc. %", True, 100),
    "chrf": ("chrF", True, 1),
    "repeats": ("repeats %", False, 100),
}
CHECKED = ("reward_accuracy", "chrf", "repeats")
DEFAULTS = {"sft_rows": 160, "pairs": 48, "eval_rows": 24, "seeds": "0,1,2"}  # about 24 minutes: see above
QUICK = {"sft_rows": 16, "pairs": 8, "eval_rows": 4, "seeds": "0"}


# ---- ParaDetox as pairs ----
def repeats(output: str, toxic: str) -> bool:
    """Whether `output` repeats the toxic input: chrF of the two, lowercased, at least REPEAT_CHRF."""
    from lorakit import scoring

    lower = scoring.normalizer(["case"])
    totals, _ = scoring.score([lower(output)], [lower(toxic)], ["chrf"], {})
    return totals["chrf"] >= REPEAT_CHRF


def to_pair(row: dict) -> dict:
    """A ParaDetox row as a conversational pair: quality_vs_trl's detox chat, the toxic input as the rejected answer."""
    chat = qv.paradetox_chat(row)
    return {"prompt": chat["prompt"], "chosen": chat["completion"],
            "rejected": [{"role": "assistant", "content": row["toxic"]}]}  # fmt: skip


def split_rows(table: list[dict], sft_rows: int, eval_rows: int) -> tuple[list[dict], list[dict], int]:
    """(training rows, held-out rows, rows left out): rows whose reference repeats the toxic input are left out;
    training takes the first sft_rows of the rest, held-out the last eval_rows of those whose toxic text no training
    row has. Exits saying so where the table has too few."""
    kept = [r for r in table if not repeats(r["neutral1"], r["toxic"])]
    train = kept[:sft_rows]
    seen = {r["toxic"].strip().lower() for r in train}
    rest = [r for r in kept[sft_rows:] if r["toxic"].strip().lower() not in seen]
    if len(train) < sft_rows or len(rest) < eval_rows:
        sys.exit(f"--sft-rows {sft_rows} + --eval-rows {eval_rows}: ParaDetox has {len(kept)} rows whose reference "
                 f"does not repeat the toxic input, and held-out rows must not train")  # fmt: skip
    return train, rest[-eval_rows:], len(table) - len(kept)


def write_pairs(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(to_pair(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def check_same_prompts(sft_config: Path, pairs: Path) -> None:
    """lorakit's SFT reader of the training TSV (the detox template) must give the chats its preference reader gives
    the pairs (prompt + chosen): SFT, DPO and ORPO train on the same prompts and answers."""
    from lorakit import config, formats, preference, sources

    d = config.load(sft_config).data
    rows = sources.read(d.train, d.split, d.limit)
    sft = [ex["messages"] for ex in formats.convert(rows.records, rows.where, d.format, d.template).examples]
    rows = sources.read(str(pairs), "train")
    conv = preference.convert(rows.records, rows.where, "dpo")
    if [p["prompt"] + p["chosen"] for p in conv.examples] != sft[: len(conv.examples)]:
        sys.exit(f"the pairs in {pairs} are not the SFT rows' chats (prompt + chosen): the bench is broken")


# ---- each system's run ----
def preference_config(objective: str, pairs: Path, n_pairs: int, seed: int, init: str, run_dir: Path) -> dict:
    """The lorakit run config of DPO or ORPO from the SFT adapter `init` (TRL's DPO reads its settings off the DPO
    one). The adapter's shape and dropout are the SFT adapter's own."""
    block = {"beta": PREF["beta"], "loss": PREF["loss"]} if objective == "dpo" else {"orpo_lambda": PREF["orpo_lambda"]}
    per_step = PREF["batch_size"] * PREF["grad_accum"]
    train = {"max_steps": n_pairs // per_step, "batch_size": PREF["batch_size"], "grad_accum": PREF["grad_accum"],
             "lr": PREF["lr"], "scheduler": PREF["scheduler"], "warmup_steps": PREF["warmup_steps"], "seed": seed,
             "precision": "fp32", "log_every": 1}  # fmt: skip
    data = {"train": str(pairs), "max_length": MAX_LENGTH, "cache_dir": str(run_dir / "tokenized")}
    return {"model": qv.MODEL, "method": "lora", "objective": objective, "adapter": {"init": init},
            "preference": block, "data": data, "train": train, "output_dir": str(run_dir)}  # fmt: skip


def one_trl_dpo(spec: dict) -> dict:
    """TRL's DPOTrainer + PEFT from the SFT adapter spec["init"], as dpo_vs_trl.one_trl sets it up for the DPO config
    spec["body"]. one_trl makes a new adapter (peft_config); TRL retrains an existing one when given a PeftModel and
    no peft_config, so its DPOTrainer is swapped, for this call only, for one that does that and is kept to save
    the trained adapter (one_trl saves none)."""
    from unittest import mock

    import dpo_vs_trl as dpo
    import trl
    from peft import PeftModel

    from lorakit import config

    cfg = config.validate(spec["body"])
    made = []

    class FromAdapter(trl.DPOTrainer):
        def __init__(self, model, *args, peft_config=None, **kw):
            model = PeftModel.from_pretrained(model, spec["init"], is_trainable=True)
            super().__init__(model, *args, **kw)
            made.append(self)

    t0 = time.perf_counter()
    with mock.patch.object(trl, "DPOTrainer", FromAdapter):
        result = dpo.one_trl(cfg, arm=TRL_ARM, keys={"disable_dropout": False})
    if len(made) != 1 or "ref" not in made[0].model.peft_config:
        sys.exit("TRL did not train the SFT adapter against a frozen copy of it: the bench is broken")
    adapter = Path(spec["dir"]) / "adapter"
    made[0].save_model(str(adapter))  # adapter_model.safetensors of the trained adapter (its "ref" copy in ref/)
    return {"wall_s": time.perf_counter() - t0, "loop_s": result["loop_s"], "steps": cfg.train.max_steps,
            "epochs": 1.0, "losses": result["losses"], "adapter": str(adapter)}  # fmt: skip


def sft_config(seed: int, rows: int, train: Path, work: Path) -> Path:
    """quality_vs_trl's lorakit detox run on the training rows kept here, written into work/configs."""
    body = qv.lorakit_config("detox", rows, seed, work / "runs" / f"sft-{seed}")
    body["data"].update(train=str(train), max_length=MAX_LENGTH)
    return qv.write_config(work, f"sft-{seed}", body)


def train_seed(seed: int, args: argparse.Namespace, files: dict[str, Path], work: Path) -> list[dict]:
    """SFT, then DPO, ORPO and TRL's DPO from its adapter: one record per run."""
    runs = work / "runs"
    config = sft_config(seed, args.sft_rows, files["sft"], work)
    spec = {"system": "lorakit", "config": str(config), "dir": str(runs / f"sft-{seed}")}
    records = [{"system": "sft", "seed": seed, "rows": args.sft_rows} | qv.spawn(spec, work)]
    init = records[0]["adapter"]
    for system in ("dpo", "orpo", "trl-dpo"):
        name = f"{system}-{seed}"
        objective = "orpo" if system == "orpo" else "dpo"
        body = preference_config(objective, files["pairs"], args.pairs, seed, init, runs / name)
        if system == "trl-dpo":
            spec = {"system": system, "body": body, "init": init, "dir": str(runs / name)}
            result = qv.spawn(spec, work, script=__file__)
        else:
            spec = {"system": "lorakit", "config": str(qv.write_config(work, name, body)), "dir": str(runs / name)}
            result = qv.spawn(spec, work)
        records.append({"system": system, "seed": seed, "rows": args.pairs, "init": f"sft-{seed}"} | result)
    return records


# ---- scoring ----
def score_seed(seed: int, records: list[dict], args: argparse.Namespace, held_out: list[dict], work: Path) -> dict:
    """One `lorakit eval` of the base and the seed's adapters on the held-out pairs, with the seed's DPO config (its
    reference: the SFT adapter); each model's eval scores and its share of outputs repeating the toxic input."""
    adapters = {f"{r['system']}-{seed}": r["adapter"] for r in records}
    print(f"  seed {seed}: scoring {len(adapters)} adapters and the base on {args.eval_rows} held-out pairs",
          file=sys.stderr, flush=True)  # fmt: skip
    cfg = work / "configs" / f"dpo-{seed}.yaml"
    out = work / f"eval-{seed}"
    models, eval_s = qv.evaluate("detox", cfg, work / "held_out_pairs.jsonl", args.eval_rows, adapters, out)
    report = json.loads((out / "eval.json").read_text())
    if "preference" not in report:
        sys.exit(f"{out / 'eval.json'} has no preference block: this lorakit eval does not score preference pairs")
    examples = report["examples"]
    if [ex["prompt"] for ex in examples] != [to_pair(r)["prompt"] for r in held_out]:
        sys.exit(f"{out / 'eval.json'}: its examples are not the held-out pairs in order")
    scores = {}
    for name, s in models.items():
        outputs = [ex["outputs"][name] for ex in examples]
        shared = sum(repeats(o, r["toxic"]) for o, r in zip(outputs, held_out)) / len(held_out)
        scores[name] = {k: s.get(k) for k in SCORES if k != "repeats"} | {"repeats": shared}
    scores["base"]["reward_accuracy"] = None  # against the SFT adapter: the base was never trained from it
    return {"scores": scores, "eval_s": round(eval_s, 1)}


# ---- the result ----
def larger_spread_check(ours: list[float], theirs: list[float], higher_is_better: bool = True) -> dict:
    """lorakit's mean against TRL's, allowed to fall short by the larger of the two spreads (max - min over seeds)."""
    mine, other = statistics.mean(ours), statistics.mean(theirs)
    allowance = max(max(ours) - min(ours), max(theirs) - min(theirs))
    holds = mine >= other - allowance if higher_is_better else mine <= other + allowance
    return {"lorakit_mean": mine, "trl_mean": other, "larger_spread": allowance, "holds": holds}


def checks(records: list[dict]) -> dict[str, dict]:
    """larger_spread_check of lorakit's DPO against TRL's on each CHECKED score."""
    out = {}
    for key in CHECKED:
        values = {s: [r["scores"][key] for r in records if r["system"] == s] for s in ("dpo", "trl-dpo")}
        if all(v and None not in v for v in values.values()):
            out[key] = larger_spread_check(values["dpo"], values["trl-dpo"], SCORES[key][1])
    return out


def check_lines(found: dict[str, dict]) -> list[str]:
    lines = []
    for key, c in found.items():
        label, higher, scale = SCORES[key]
        sign, op = ("-", ">=") if higher else ("+", "<=")
        lines.append(f"{label}: lorakit's DPO mean {c['lorakit_mean'] * scale:.1f} {op} TRL's DPO mean "
                     f"{c['trl_mean'] * scale:.1f} {sign} the larger spread {c['larger_spread'] * scale:.1f}: "
                     f"{'holds' if c['holds'] else 'does not hold'}")  # fmt: skip
    return lines


def table(records: list[dict]) -> str:
    """Markdown: per system, each score's mean and min..max over seeds, the mean training loss, wall time, steps."""
    head = ["system", "seeds", *[c for k in SCORES for c in (f"{SCORES[k][0]} mean", "min..max")], "train loss",
            "wall s/run", "steps"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for system in ("base", *SYSTEMS):
        rs = [r for r in records if r["system"] == system]
        if not rs:
            continue
        cells = [LABELS[system], str(len(rs))]
        for key, (_, _, scale) in SCORES.items():
            values = [r["scores"][key] * scale for r in rs if r["scores"][key] is not None]
            mean, lo, hi, _ = qv.spread(values) if values else (None, None, None, None)
            cells += [f"{mean:.1f}", f"{lo:.1f}..{hi:.1f}"] if values else ["-", "-"]
        trained = [r for r in rs if "wall_s" in r]
        cells.append(f"{statistics.mean(statistics.mean(r['losses']) for r in trained):.3f}" if trained else "-")
        cells.append(f"{statistics.mean(r['wall_s'] for r in trained):.0f}" if trained else "-")
        cells.append("/".join(sorted({str(r["steps"]) for r in trained})) or "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", help=f"comma-separated seeds, each a run of every system (default {DEFAULTS['seeds']})")
    p.add_argument("--sft-rows", type=int, help=f"SFT rows, one epoch (default {DEFAULTS['sft_rows']})")
    p.add_argument("--pairs", type=int, help=f"DPO/ORPO pairs, the first SFT rows' (default {DEFAULTS['pairs']})")
    p.add_argument("--eval-rows", type=int, help=f"held-out pairs scored (default {DEFAULTS['eval_rows']})")
    p.add_argument("--out", help="keep runs, configs, eval reports and results.json here (default: a temporary folder)")
    p.add_argument("--quick", action="store_true", help=f"smoke run: seeds {QUICK['seeds']}, {QUICK['sft_rows']} SFT "
                   f"rows, {QUICK['pairs']} pairs, {QUICK['eval_rows']} held out")  # fmt: skip
    p.add_argument("--_one", metavar="SPEC", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for key, value in (QUICK if args.quick else DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    sft_step = qv.HYPER["batch_size"] * qv.HYPER["grad_accum"]
    pair_step = PREF["batch_size"] * PREF["grad_accum"]
    if args.sft_rows < sft_step or args.sft_rows % sft_step:
        p.error(f"--sft-rows must be a multiple of {sft_step} (one SFT step's rows)")
    if args.pairs < pair_step or args.pairs % pair_step or args.pairs > args.sft_rows:
        p.error(f"--pairs must be a multiple of {pair_step} (one step's pairs), at most --sft-rows")
    if args.eval_rows < 1:
        p.error("--eval-rows must be at least 1")
    return args


def main() -> int:
    args = parse()
    if args._one:  # TRL's run; lorakit's go through quality_vs_trl's child
        print(json.dumps(one_trl_dpo(json.loads(Path(args._one).read_text()))))
        return 0
    source = qv.DATA / qv.TASKS["detox"]["train"]
    if not source.is_file():
        print(f"error: the benchmark data is not here: {source} (../shared/data beside the repo)", file=sys.stderr)
        return 2
    seeds = [int(s) for s in args.seeds.split(",")]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as td:
        work = Path(args.out or td).resolve()
        work.mkdir(parents=True, exist_ok=True)
        train, held_out, left_out = split_rows(qv.read_tsv(source), args.sft_rows, args.eval_rows)
        files = {"sft": qv.write_tsv(work / "train_detox.tsv", train),
                 "pairs": write_pairs(work / "train_pairs.jsonl", train[: args.pairs])}  # fmt: skip
        write_pairs(work / "held_out_pairs.jsonl", held_out)
        check_same_prompts(sft_config(seeds[0], args.sft_rows, files["sft"], work), files["pairs"])
        records = []
        for seed in seeds:
            runs = train_seed(seed, args, files, work)
            scored = score_seed(seed, runs, args, held_out, work)
            for r in runs:
                r.update(scores=scored["scores"][f"{r['system']}-{seed}"], eval_s=scored["eval_s"])
            runs.append({"system": "base", "seed": seed, "rows": 0, "scores": scored["scores"]["base"],
                         "eval_s": scored["eval_s"]})  # fmt: skip
            for r in runs:
                r["eval_rows"] = args.eval_rows
                print(qv.json_line(r), flush=True)
            records += runs
        found = checks(records)
        (work / "results.json").write_text(json.dumps({"records": records, "checks": found}, indent=1))
    minutes = (time.perf_counter() - started) / 60
    print(f"\nParaDetox pairs (polite rewrite chosen over the toxic input copied; {left_out} rows left out whose "
          f"reference repeats its input): SFT on {args.sft_rows} rows, DPO/ORPO on the first {args.pairs} as pairs, "
          f"{args.eval_rows} held-out pairs, seeds {args.seeds}; {minutes:.1f} min in all. Reward accuracy against "
          f"each seed's SFT adapter; repeats: output chrF >= {REPEAT_CHRF:.0f} against the toxic input.\n")  # fmt: skip
    print(table(records))
    print("\n" + "\n".join(check_lines(found)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
