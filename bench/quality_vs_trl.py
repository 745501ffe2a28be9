"""lorakit against TRL's SFTTrainer + PEFT on answer quality: the same model, task and hyperparameters, 3 seeds.

    python bench/quality_vs_trl.py [--tasks sql,detox] [--seeds 0,1,2] [--rows N] [--eval-rows N] [--out DIR]
                                   [--time-budget] [--quick]

Each system fine-tunes SmolLM2-135M-Instruct (fp32; both load it with lorakit.model.load_model, so the weights are
identical) on a public task from ../shared/data, the way its own users run it, with the same hyperparameters: LoRA
r 16 / alpha 32 / dropout 0.05 on all linear layers, AdamW lr 5e-4 with a linear decay and no warmup, one epoch,
batch 4 x grad-accum 2, no weight decay, clipping at 1.0 (both defaults), max length 1024, no packing.
  lorakit  a run config YAML as a user writes it (written into --out), trained by lorakit.train.run
  TRL      load_dataset, a map to conversational prompt-completion rows, SFTTrainer with its default
           completion-only loss for such rows (the TRL docs' recipe) and a PEFT LoraConfig; TRL's activation
           checkpointing and bf16 defaults are turned off to match lorakit on a CPU
Tasks (train on the first --rows rows of the file; held-out rows never trained on, written into --out):
  sql    WikiSQL (mlx-lm's table/columns/Q/A text; lorakit reads it as `format: chat_text`), scored by exact match
         of the generated query, sql-normalized (case outside literals, spacing, trailing ;). WikiSQL's mlx copy
         has no databases, so there is no execution match: a different but equivalent query scores 0.
         Held out: the first --eval-rows rows of its test.jsonl.
  detox  ParaDetox (toxic -> polite rewrite; lorakit reads the TSV with a `data.template`), scored by chrF
         against the first reference. Held out: the last --eval-rows rows of the TSV.
The benchmark checks first that TRL's map gives exactly the chats lorakit's reader gives (train and held-out rows),
so the eval prompts are the ones TRL trained on. Every adapter of a task is then scored by one `lorakit eval` run
(`--adapter NAME=PATH`, greedy, 64 new tokens), on the same held-out rows, beside the untrained base. TRL's adapter
folder holds the tokenizer TRL trained with (SFTTrainer.save_model saves it), so eval answers with its chat template.

Each run is its own process (TRL's imports cannot slow lorakit); wall time per run counts from loading the model to
the saved adapter (tokenization included, Python imports not), the span lorakit's train.time_budget counts.
--time-budget adds a row on the sql task: lorakit with train.time_budget set to the TRL run's wall time of the same
seed (lorakit then plans its own number of steps, more or less than one epoch, to end in that time).

Output: a JSON line per run (train and eval numbers) on stdout, then a markdown table: per task and system the
score's mean, min..max and standard deviation over seeds, and the mean wall time per run. --out keeps the run
folders, configs, held-out files, eval.json/eval.html and results.json.

Wall time, measured on a 2-core Xeon (2026-12-05, nothing else running; a CPU shared with other jobs is several
times slower, the two systems unevenly): an optimizer step of 8 rows takes lorakit 4.2 s and TRL 6.5 s on sql (115
tokens a row), 2.6 s and 3.7 s on detox (62 tokens a row); each run also pays ~8 s to start, import and load; `lorakit
eval` ~0.75 s per held-out row and model. `make bench-quality` (the defaults and --time-budget: 160 rows = 20 steps,
50 held-out rows, 3 seeds, 2 tasks: 15 runs, evals of 10 and 7 models) took 33.4 minutes, ~8 of them the
--time-budget row's.
`--quick` (1 seed, 48 rows = 6 steps, 10 held-out rows) took 3.5 minutes: a smoke run, too short to teach WikiSQL's
query form (its sql scores stay at the base's).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
MODEL = "smollm2-135m-instruct"
SYSTEMS = ("lorakit", "trl")
BUDGET = "lorakit-budget"  # lorakit with train.time_budget = the TRL run's wall time (--time-budget, sql only)
HYPER = {"r": 16, "alpha": 32, "dropout": 0.05, "lr": 5e-4, "scheduler": "linear", "warmup_steps": 0, "epochs": 1,
         "batch_size": 4, "grad_accum": 2, "max_length": 1024}  # fmt: skip
TASKS = {
    "sql": {"train": "sql/wikisql_mlx/train.jsonl", "held_out": "sql/wikisql_mlx/test.jsonl", "metric": "exact_match",
            "label": "exact match %, sql-normalized", "normalize": "sql", "data": {"format": "chat_text"}},
    "detox": {"train": "paradetox/paradetox.tsv", "held_out": "paradetox/paradetox.tsv", "metric": "chrf",
              "label": "chrF", "normalize": None,
              "data": {"format": "template", "template": {"prompt": "Rewrite politely: {toxic}",
                                                          "completion": "{neutral1}"}}},
}  # fmt: skip
DEFAULTS = {"rows": 160, "eval_rows": 50, "seeds": "0,1,2"}  # about 28 minutes on a 2-core CPU: see above
QUICK = {"rows": 48, "eval_rows": 10, "seeds": "0"}
MAX_NEW_TOKENS = 64  # WikiSQL queries and ParaDetox rewrites are a few dozen tokens; the base rambles past them
ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


# ---- each system's data, as its users bring it ----
def lorakit_config(task: str, rows: int, seed: int, run_dir: Path, budget_s: float | None = None) -> dict:
    """The run config a lorakit user writes for the task (only cache_dir is the benchmark's: one per run, so that
    every run pays its own tokenization, as every TRL run does)."""
    data = {"train": str(DATA / TASKS[task]["train"]), "limit": rows, **TASKS[task]["data"], "packing": False,
            "max_length": HYPER["max_length"], "cache_dir": str(run_dir / "tokenized")}  # fmt: skip
    train = {"epochs": HYPER["epochs"], "batch_size": HYPER["batch_size"], "grad_accum": HYPER["grad_accum"],
             "lr": HYPER["lr"], "scheduler": HYPER["scheduler"], "warmup_steps": HYPER["warmup_steps"], "seed": seed,
             "precision": "fp32", "log_every": 1}  # fmt: skip
    if budget_s is not None:
        train["time_budget"] = round(budget_s, 1)
    adapter = {"r": HYPER["r"], "alpha": HYPER["alpha"], "dropout": HYPER["dropout"], "target_modules": "all-linear"}
    return {"model": MODEL, "method": "lora", "adapter": adapter, "data": data, "train": train,
            "output_dir": str(run_dir)}  # fmt: skip


def wikisql_chat(row: dict) -> dict:
    """mlx-lm's WikiSQL text as a TRL user maps it: the table, columns and question ask, the query answers."""
    head, _, query = row["text"].rpartition("\nA:")
    preamble, _, question = head.rpartition("\nQ:")
    return {"prompt": [{"role": "user", "content": f"{preamble.strip()}\n{question.strip()}"}],
            "completion": [{"role": "assistant", "content": query.strip()}]}  # fmt: skip


def paradetox_chat(row: dict) -> dict:
    return {"prompt": [{"role": "user", "content": f"Rewrite politely: {row['toxic']}"}],
            "completion": [{"role": "assistant", "content": row["neutral1"]}]}  # fmt: skip


TO_CHAT = {"sql": wikisql_chat, "detox": paradetox_chat}


def trl_dataset(task: str, path: str, rows: int | None = None):
    """The rows as conversational prompt-completion chats, read the way the TRL docs read a local file."""
    from datasets import load_dataset

    tsv = path.endswith(".tsv")
    ds = load_dataset("csv" if tsv else "json", data_files=path, split="train", **({"delimiter": "\t"} if tsv else {}))
    if rows is not None:
        ds = ds.select(range(rows))
    return ds.map(TO_CHAT[task], remove_columns=ds.column_names)


def check_same_chats(task: str, cfg_path: Path, held_out: Path) -> None:
    """TRL's map must give the chats lorakit's reader gives, train and held-out: eval asks with lorakit's prompts."""
    from lorakit import config, formats, sources

    d = config.load(cfg_path).data
    for path, limit in ((d.train, d.limit), (str(held_out), None)):
        rows = sources.read(path, d.split, limit)
        ours = [ex["messages"] for ex in formats.convert(rows.records, rows.where, d.format, d.template).examples]
        theirs = [r["prompt"] + r["completion"] for r in trl_dataset(task, path, limit)]
        if ours != theirs:
            bad = next(i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b) if len(ours) == len(theirs) else -1
            sys.exit(f"{task}: TRL's rows differ from lorakit's in {path} (row {bad}; {len(ours)} vs {len(theirs)})")


def write_held_out(task: str, n: int, rows: int, folder: Path) -> Path:
    """The held-out rows as a file of the task's own format: WikiSQL's first test rows, ParaDetox's last rows."""
    if task == "sql":
        train, test = (_lines(DATA / TASKS[task][k]) for k in ("train", "held_out"))
        if rows > len(train) or n > len(test):
            sys.exit(f"--rows {rows}, --eval-rows {n}: WikiSQL has {len(train)} train and {len(test)} test rows")
        out = folder / "held_out_sql.jsonl"
        out.write_text("\n".join(test[:n]) + "\n", encoding="utf-8")
        return out
    source = DATA / TASKS[task]["held_out"]
    table = read_tsv(source)
    if rows + n > len(table):
        sys.exit(f"--rows {rows} + --eval-rows {n}: {source} has {len(table)} rows, and held-out rows must not train")
    return write_tsv(folder / "held_out_detox.tsv", table[-n:])


def read_tsv(path: Path) -> list[dict]:
    """ParaDetox's rows as dicts of its columns (toxic, neutral1..3)."""
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def write_tsv(path: Path, rows: list[dict]) -> Path:
    """Rows of read_tsv's form as a TSV lorakit and TRL read back unchanged."""
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter="\t")
        writer.writeheader()
        writer.writerows(rows)
    return path


def _lines(path: Path) -> list[str]:
    return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# ---- one training run, in its own process ----
def one_lorakit(spec: dict) -> dict:
    from lorakit import config, tracking, train
    from lorakit.run_folder import RunFolder

    cfg = config.load(spec["config"])
    t0 = time.perf_counter()
    summary = train.run(cfg, progress=False).summary
    wall = time.perf_counter() - t0
    losses = [r["loss"] for r in tracking.read(RunFolder.of(cfg).metrics) if "loss" in r]
    return {"wall_s": wall, "loop_s": summary["train_s"], "steps": summary["steps"], "epochs": summary["epochs"],
            "losses": losses, "adapter": str(RunFolder.of(cfg).weights("lora"))}  # fmt: skip


def one_trl(spec: dict) -> dict:
    import torch
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from lorakit import model

    t0 = time.perf_counter()
    tokenizer = model.load_tokenizer(MODEL)  # the converted GGUF, offline: the files lorakit trains on
    net = model.load_model(MODEL, dtype=torch.float32)
    dataset = trl_dataset(spec["task"], str(DATA / TASKS[spec["task"]]["train"]), spec["rows"])
    args = SFTConfig(
        output_dir=spec["dir"], num_train_epochs=HYPER["epochs"], per_device_train_batch_size=HYPER["batch_size"],
        gradient_accumulation_steps=HYPER["grad_accum"], learning_rate=HYPER["lr"],
        lr_scheduler_type=HYPER["scheduler"], warmup_steps=HYPER["warmup_steps"], seed=spec["seed"],
        max_length=HYPER["max_length"],
        # TRL's defaults differ from lorakit's here: it checkpoints activations and trains in bf16 unless told.
        activation_checkpointing=False, bf16=False, fp16=False,
        logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True,
    )  # fmt: skip
    lora = LoraConfig(r=HYPER["r"], lora_alpha=HYPER["alpha"], lora_dropout=HYPER["dropout"],
                      target_modules="all-linear", task_type="CAUSAL_LM")  # fmt: skip
    trainer = SFTTrainer(model=net, args=args, train_dataset=dataset, processing_class=tokenizer, peft_config=lora)
    result = trainer.train()
    adapter = Path(spec["dir"]) / "adapter"
    trainer.save_model(str(adapter))  # adapter_config.json, adapter_model.safetensors and the tokenizer it used
    wall = time.perf_counter() - t0
    losses = [x["loss"] for x in trainer.state.log_history if "loss" in x]
    return {"wall_s": wall, "loop_s": result.metrics["train_runtime"], "steps": result.global_step,
            "epochs": trainer.state.epoch, "losses": losses, "adapter": str(adapter)}  # fmt: skip


def child(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    result = (one_trl if spec["system"] == "trl" else one_lorakit)(spec)
    print(json.dumps(result))
    return 0


def spawn(spec: dict, work: Path, script: str = __file__) -> dict:
    """Run one training in a fresh process (`script --_one SPEC`: this script's child by default); its result, with
    the process's own wall time (imports included)."""
    name = Path(spec["dir"]).name
    path = work / "specs" / f"{name}.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(spec))
    t0, cpu0 = time.perf_counter(), _children_cpu()
    out = subprocess.run([sys.executable, script, "--_one", str(path)], capture_output=True, text=True,
                         env={**os.environ, **ENV})  # fmt: skip
    (work / "logs").mkdir(exist_ok=True)
    (work / "logs" / f"{name}.log").write_text(out.stdout + out.stderr)
    if out.returncode != 0:
        sys.exit(f"{name} failed (log: {work / 'logs' / f'{name}.log'}):\n{out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    # CPU seconds tell what the run costs on a machine shared with other jobs, where wall time does not.
    result.update(process_s=time.perf_counter() - t0, process_cpu_s=_children_cpu() - cpu0)
    print(f"  {name}: {result['steps']} steps, {result['wall_s']:.0f} s", file=sys.stderr, flush=True)
    return result


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


# ---- scoring ----
def evaluate(
    task: str, cfg: Path, held_out: Path, n_rows: int, adapters: dict[str, str], out: Path
) -> tuple[dict, float]:
    """`lorakit eval` of the base and every adapter on the held-out rows: one CLI run, one loaded base.

    All rows in one batch (up to 64): a CPU decodes 40 rows at once 20% faster than in batches of 16."""
    cmd = [sys.executable, "-m", "lorakit", "eval", str(cfg), "--data", str(held_out), "--output", str(out),
           "--max-new-tokens", str(MAX_NEW_TOKENS), "--batch-size", str(min(n_rows, 64)), "--metric", "exact_match",
           "--metric", "chrf", "--overwrite", *[f"--adapter={n}={p}" for n, p in adapters.items()]]  # fmt: skip
    if TASKS[task]["normalize"]:
        cmd += ["--normalize", TASKS[task]["normalize"]]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **ENV})
    if done.returncode != 0:
        sys.exit(f"lorakit eval failed on {task}:\n{done.stderr[-3000:]}")
    return json.loads((out / "eval.json").read_text())["models"], time.perf_counter() - t0


# ---- the benchmark ----
def budget_supported() -> bool:
    """Whether this lorakit's config has train.time_budget (the --time-budget row needs it)."""
    from lorakit.config import TrainConfig

    return "time_budget" in TrainConfig.model_fields


def run_task(task: str, args: argparse.Namespace, seeds: list[int], work: Path) -> list[dict]:
    """Train every system and seed on one task, score them all; one record per run (and one for the base)."""
    held_out = write_held_out(task, args.eval_rows, args.rows, work)
    eval_config = write_config(work, f"{task}-eval", lorakit_config(task, args.rows, 0, work / "runs" / task))
    check_same_chats(task, eval_config, held_out)
    records = []
    for seed in seeds:  # alternating systems, so that a machine slowing down in between hits both alike
        records += [train_one(system, task, seed, args.rows, work) for system in SYSTEMS]
        if args.time_budget and task == "sql":
            records.append(train_one(BUDGET, task, seed, args.rows, work, budget_s=records[-1]["wall_s"]))
    adapters = {f"{r['system']}-{r['seed']}": r["adapter"] for r in records}
    print(f"  {task}: scoring {len(adapters)} adapters and the base on {args.eval_rows} held-out rows",
          file=sys.stderr, flush=True)  # fmt: skip
    scores, eval_s = evaluate(task, eval_config, held_out, args.eval_rows, adapters, work / f"eval-{task}")
    print(f"  {task}: eval {eval_s:.0f} s", file=sys.stderr, flush=True)
    for r in records:
        r["scores"] = scores[f"{r['system']}-{r['seed']}"]
    records.append({"task": task, "system": "base", "seed": None, "rows": 0, "scores": scores["base"]})
    for r in records:
        r.update(eval_rows=args.eval_rows, eval_s=round(eval_s, 1), metric=TASKS[task]["metric"])
    return records


def train_one(system: str, task: str, seed: int, rows: int, work: Path, budget_s: float | None = None) -> dict:
    """One training run of `system` (lorakit, trl, or lorakit with a time budget) in its own process."""
    name = f"{task}-{system}-{seed}"
    run_dir = work / "runs" / name
    spec = {"system": system, "task": task, "rows": rows, "seed": seed, "dir": str(run_dir)}
    if system != "trl":
        spec["config"] = str(write_config(work, name, lorakit_config(task, rows, seed, run_dir, budget_s)))
    record = {"task": task, "system": system, "seed": seed, "rows": rows}
    if budget_s is not None:
        record["time_budget_s"] = round(budget_s, 1)
    return record | spawn(spec, work)


def write_config(work: Path, name: str, body: dict) -> Path:
    import yaml

    path = work / "configs" / f"{name}.yaml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    return path


def json_line(record: dict) -> str:
    """One run as a JSON line: its losses as their mean over the steps, no paths."""
    out = {k: v for k, v in record.items() if k not in ("losses", "adapter")}
    if "losses" in record:
        out["train_loss"] = round(statistics.mean(record["losses"]), 4)
    return json.dumps(out)


def spread(values: list[float]) -> tuple[float, float, float, float]:
    """mean, min, max and sample standard deviation (0 for one value)."""
    return statistics.mean(values), min(values), max(values), statistics.stdev(values) if len(values) > 1 else 0.0


def table(records: list[dict]) -> str:
    """Markdown: per task and system, the score over seeds and the wall time per run."""
    head = ("task: score", "system", "seeds", "score mean", "min..max", "std", "other", "train loss", "wall s/run",
            "steps")  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for task in dict.fromkeys(r["task"] for r in records):
        metric = TASKS[task]["metric"]
        other = "chrf" if metric == "exact_match" else "exact_match"
        for system in ("base", *SYSTEMS, BUDGET):
            rs = [r for r in records if r["task"] == task and r["system"] == system]
            if not rs:
                continue
            scale = 100 if metric == "exact_match" else 1  # exact match as a percentage, chrF is 0..100 already
            mean, lo, hi, sd = spread([r["scores"][metric] * scale for r in rs])
            o = statistics.mean(r["scores"][other] * (100 if other == "exact_match" else 1) for r in rs)
            trained = [r for r in rs if "wall_s" in r]
            wall = f"{statistics.mean(r['wall_s'] for r in trained):.0f}" if trained else "-"
            loss = f"{statistics.mean(statistics.mean(r['losses']) for r in trained):.3f}" if trained else "-"
            steps = "/".join(sorted({f"{r['steps']}" + (f" ({r['epochs']:.2f} ep)" if "time_budget_s" in r else "")
                                     for r in trained})) or "-"  # fmt: skip
            label = f"{task}: {TASKS[task]['label']}"
            lines.append(f"| {label} | {system} | {len(rs) if trained else '-'} | {mean:.1f} | {lo:.1f}..{hi:.1f} | "
                         f"{sd:.1f} | {other} {o:.1f} | {loss} | {wall} | {steps} |")  # fmt: skip
    return "\n".join(lines)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", default="sql,detox", help="comma-separated: sql, detox (default both)")
    p.add_argument("--seeds", help=f"comma-separated seeds, one run per system each (default {DEFAULTS['seeds']})")
    p.add_argument("--rows", type=int, help=f"training rows per task, one epoch (default {DEFAULTS['rows']})")
    p.add_argument("--eval-rows", type=int, help=f"held-out rows scored per task (default {DEFAULTS['eval_rows']})")
    p.add_argument("--out", help="keep runs, configs, eval reports and results.json here (default: a temporary folder)")
    p.add_argument("--time-budget", action="store_true",
                   help="sql: also lorakit with train.time_budget = the TRL run's wall time, per seed")  # fmt: skip
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke run: seeds {QUICK['seeds']}, {QUICK['rows']} rows, {QUICK['eval_rows']} held out",
    )
    p.add_argument("--_one", metavar="SPEC", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for key, value in (QUICK if args.quick else DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    unknown = set(args.tasks.split(",")) - set(TASKS)
    if unknown:
        p.error(f"--tasks: unknown {sorted(unknown)}; choose from {', '.join(TASKS)}")
    per_step = HYPER["batch_size"] * HYPER["grad_accum"]
    if args.rows < per_step or args.rows % per_step or args.eval_rows < 1:
        # Otherwise the last step differs: TRL's is short, lorakit's takes rows of a second epoch's order.
        p.error(f"--rows must be a multiple of {per_step} (one step's rows), --eval-rows at least 1")
    return args


def main() -> int:
    args = parse()
    if not DATA.is_dir():
        print(f"error: the benchmark data is not here: {DATA} (../shared/data beside the repository)", file=sys.stderr)
        return 2
    if args._one:
        return child(args._one)
    if args.time_budget and not budget_supported():
        print("note: this lorakit's config has no train.time_budget: the --time-budget row is left out",
              file=sys.stderr)  # fmt: skip
        args.time_budget = False
    seeds = [int(s) for s in args.seeds.split(",")]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as td:
        work = Path(args.out or td).resolve()
        work.mkdir(parents=True, exist_ok=True)
        records = []
        for task in args.tasks.split(","):
            task_records = run_task(task, args, seeds, work)
            for r in task_records:
                print(json_line(r), flush=True)
            records += task_records
        (work / "results.json").write_text(json.dumps(records, indent=1))
    minutes = (time.perf_counter() - started) / 60
    print(f"\n{args.rows} training rows (one epoch), {args.eval_rows} held-out rows, seeds {args.seeds}; "
          f"{minutes:.1f} min in all. sql: exact match of the query text, sql-normalized (WikiSQL's mlx copy has no "
          f"databases: no execution match); detox: chrF. Wall s/run: model load to saved adapter.\n")  # fmt: skip
    print(table(records))
    return 0


if __name__ == "__main__":
    sys.exit(main())
