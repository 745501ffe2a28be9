"""lorakit against TRL's SFTTrainer + PEFT: same model, tokens, LoRA and hyperparameters; speed, memory, loss.

    python bench/train_vs_peers.py [--setting unpacked|packed|both] [--steps N] [--repeats 2]

Settings, on SmolLM2-135M-Instruct in fp32 (both systems load it with lorakit.model.load_model, so the weights
are identical), LoRA r 16 / alpha 32 / dropout 0 on all linear layers, lr 2e-4 constant, no weight decay,
clipping at 1.0, seed 0, loss on completions only:
  unpacked  the first 240 Alpaca-GPT4 rows, max length 512, batch 4 x grad-accum 2, default 8 steps
  packed    guanaco 1k (OpenAI messages), max length 1024, packed, batch 1 x grad-accum 2, default 4 steps

Both systems train on lorakit's tokenization and rows (TRL gets input_ids and labels, -100 where untrained;
packed rows with their examples' lengths, as TRL's own "bfd" packing hands them to its collator) in lorakit's
order (train.DataOrder) through a sequential sampler, so every step sees the same rows and the per-step losses
must agree within 2%, or the speed comparison does not count. TRL runs them at its best for the attention the
machine has (trl_setting: padding-free only with flash-attention, as its docs require; else padded rows, and
packed rows one per micro-batch), with its chunked NLL loss, and liger-kernel's kernels where lorakit gets them;
the table names the setting.

Runs alternate lorakit, TRL, lorakit, TRL..., each in its own process: peak RSS (ru_maxrss) is per run, and
TRL's imports cannot slow lorakit. Timing leaves out the first optimizer step (lazy initialization), from
per-step timestamps: lorakit's metrics.jsonl `train_s`, a TrainerCallback's on_step_end for TRL. Model FLOPs
utilization uses lorakit.plan's FLOPs per token against this CPU's fp32 matmul peak, measured here first.

Wall time of the default run (`--setting both --repeats 2`): 16.5 minutes on a 2-core AMD EPYC (2026-11-29;
lorakit's runs ~2 min unpacked and ~70 s packed, TRL's ~3.7 min and ~80 s). Run it on an otherwise idle
machine: a CPU shared with another busy process is several times slower, and both systems suffer unevenly.
"""

from __future__ import annotations

import argparse
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
SYSTEMS = ("lorakit", "trl")
SETTINGS = {
    "unpacked": {"train": "alpaca/alpaca_gpt4_en_demo_llamafactory.json", "limit": 240, "max_length": 512,
                 "packing": False, "batch_size": 4, "grad_accum": 2, "steps": 8},
    "packed": {"train": "guanaco/guanaco_1k_messages.jsonl", "limit": None, "max_length": 1024,
               "packing": True, "batch_size": 1, "grad_accum": 2, "steps": 4},
}  # fmt: skip
LOSS_TOLERANCE = 0.02  # per step, unpacked: same rows, same weights; fp32 summation order is all that differs


def run_config(setting: str, steps: int, work: Path, name: str = "run") -> dict:
    """The lorakit config body of a setting; TRL's arguments are read off the same body."""
    s = SETTINGS[setting]
    return {
        "model": "smollm2-135m-instruct", "method": "lora", "output_dir": str(work / name),
        "adapter": {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"},
        "data": {"train": str(DATA / s["train"]), "limit": s["limit"], "max_length": s["max_length"],
                 "packing": s["packing"], "train_on": "completions", "cache_dir": str(work / "tokenized")},
        "train": {"max_steps": steps, "batch_size": s["batch_size"], "grad_accum": s["grad_accum"], "lr": 2e-4,
                  "scheduler": "constant", "warmup_steps": 0, "weight_decay": 0.0, "max_grad_norm": 1.0,
                  "seed": 0, "precision": "fp32", "save_every": None, "eval_every": None, "log_every": 1},
    }  # fmt: skip


def step_plan(cfg, prepared, steps: int) -> list[list[list[int]]]:
    """Per optimizer step, the examples of each row lorakit trains on (its packer and its DataOrder)."""
    from lorakit import train

    rows = train._rows(prepared.train, cfg.data.max_length, cfg.data.packing)  # SmolLM2 reads packed rows
    order = train.DataOrder(len(rows), cfg.train.seed)
    per_step = cfg.train.batch_size * cfg.train.grad_accum
    return [[rows[r] for r in order.rows(s, per_step)] for s in range(steps)]


def trained(labels: list[int]) -> int:
    # Position 0 of an example predicts nothing: both systems mask it and score labels[t + 1] at position t.
    return sum(t != -100 for t in labels[1:])


def one_lorakit(cfg) -> dict:
    from lorakit import tracking, train
    from lorakit.run_folder import RunFolder

    summary = train.run(cfg, progress=False).summary
    records = [r for r in tracking.read(RunFolder.of(cfg).metrics) if "loss" in r]
    return {"losses": [r["loss"] for r in records], "step_end_s": [r["train_s"] for r in records],
            "recorded_tokens": [r["tokens"] for r in records], "loop_s": summary["wall_time_s"],
            "own_tokens_per_s": summary["tokens_per_s"], "padding_share": summary["padding_share"],
            "attention": summary["attention"], "shared_share": summary.get("shared_share", 0.0)}  # fmt: skip


def trl_setting(packed: bool, batch: int, accum: int, flash: bool, liger: bool) -> dict:
    """How TRL 1.16 trains these rows at its best, as its documentation recommends for the attention this machine has.

    Padding-free batches (every row of a micro-batch concatenated into one, positions restarting at each example)
    only with flash-attention: SFTConfig.padding_free "is only supported with the FlashAttention 2 or 3", whose varlen
    kernel keeps the examples apart. On sdpa the same batch is one row of all its tokens under a dense block mask:
    B x the attention work and a (B L)^2 mask, the mode that made GPU.md's packed 1B ratio 4.95x. Without flash, then,
    unpacked rows go padded, TRL's default, and packed rows one per micro-batch (padding-free within the row, which is
    then one mask of one row, as lorakit's own; the accumulation takes the rest, so a step holds the same examples and
    its loss is the same mean). The loss is always TRL's chunked NLL (loss_type "nll": the head in tiles over the
    labelled positions, no logits tensor); liger-kernel's layer kernels when `liger` (TRL keeps its own loss there).

    Returns SFTConfig's keys, the attention implementation the model runs, and the words the tables print.
    """
    if flash:
        how, attention = "padding-free (flash-attention 2)", "flash_attention_2"
        keys = {"padding_free": True, "per_device_train_batch_size": batch, "gradient_accumulation_steps": accum}
    elif packed:
        how, attention = "one packed row per micro-batch (sdpa: no flash-attention)", "sdpa"
        keys = {"padding_free": True, "per_device_train_batch_size": 1, "gradient_accumulation_steps": batch * accum}
    else:
        how, attention = "padded rows (sdpa: no flash-attention)", "sdpa"
        keys = {"padding_free": False, "per_device_train_batch_size": batch, "gradient_accumulation_steps": accum}
    keys |= {"loss_type": "nll", "use_liger_kernel": liger}
    return {"config": keys, "attention": attention, "words": f"{how}, chunked NLL" + (", liger" if liger else "")}


def one_trl(cfg, setting: dict | None = None) -> dict:
    """TRL's run of `cfg`'s rows, as `setting` (trl_setting's) says; by default as on this CPU: no flash, no liger."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from lorakit import data, model

    tok = model.load_tokenizer(cfg.model)
    prepared = data.prepare(cfg.data, tok)  # lorakit's tokens, from the cache the parent filled
    ds = prepared.train.select_columns(["input_ids", "labels"])
    t, packed = cfg.train, cfg.data.packing
    setting = setting or trl_setting(packed, t.batch_size, t.grad_accum, flash=False, liger=False)
    keys = setting["config"]
    plan_rows = [row for step in step_plan(cfg, prepared, t.max_steps) for row in step]
    if packed:  # lorakit's packed rows, each with its examples' lengths: TRL restarts positions at each one
        ids, labels = ds["input_ids"], ds["labels"]
        ds = Dataset.from_list([{"input_ids": [x for i in row for x in ids[i]],
                                 "labels": [x for i in row for x in [-100, *labels[i][1:]]],
                                 "seq_lengths": [len(ids[i]) for i in row]} for row in plan_rows])  # fmt: skip
    else:  # lorakit's rows, in lorakit's order, read front to back by a sequential sampler
        ds = ds.select([i for row in plan_rows for i in row])
    net = model.load_model(cfg.model, dtype=torch.float32)
    net.config.use_cache = False
    if setting["attention"] != "sdpa":
        net.set_attn_implementation(setting["attention"])
    args = SFTConfig(
        output_dir=cfg.output_dir, max_steps=t.max_steps, learning_rate=t.lr, lr_scheduler_type=t.scheduler,
        warmup_steps=t.warmup_steps, weight_decay=t.weight_decay, max_grad_norm=t.max_grad_norm, seed=t.seed,
        # TRL's defaults differ from lorakit's here: it checkpoints activations and trains in bf16 unless told.
        gradient_checkpointing=False, bf16=False, fp16=False, use_cpu=True,
        logging_steps=1, save_strategy="no", report_to=[], dataloader_num_workers=0, disable_tqdm=True,
        # TRL refuses max_length when padding-free without its own packer: lorakit's rows already fit it.
        max_length=None if keys["padding_free"] else cfg.data.max_length, train_sampling_strategy="sequential",
        # The rows are already tokenized, truncated, packed and ordered: TRL's preparation would only drop rows
        # without a trained token, which would shift every later step by a row.
        dataset_kwargs={"skip_prepare_dataset": True}, **keys,
    )  # fmt: skip
    lora = LoraConfig(r=cfg.adapter.r, lora_alpha=cfg.adapter.alpha, lora_dropout=cfg.adapter.dropout,
                      target_modules="all-linear", task_type="CAUSAL_LM")  # fmt: skip
    seen: list[tuple[int, int, int]] = []  # (input tokens, trained tokens, positions) per micro-batch, in order
    out: dict = {"losses": [], "step_end_s": []}

    class Counting(SFTTrainer):  # counts what the loop consumed; the batches themselves go on unchanged
        def training_step(self, model, inputs, *rest, **kw):
            mask = inputs.get("attention_mask")
            n = int(mask.sum()) if mask is not None else inputs["input_ids"].numel()  # padding-free: no padding
            seen.append((n, int((inputs["labels"][:, 1:] != -100).sum()), inputs["input_ids"].numel()))
            return super().training_step(model, inputs, *rest, **kw)

    trainer = Counting(model=net, args=args, train_dataset=ds, processing_class=tok, peft_config=lora,
                       callbacks=[trl_clock(out)])  # fmt: skip
    metrics = trainer.train().metrics
    g = keys["gradient_accumulation_steps"]  # micro-batches a step
    steps = [[sum(x) for x in zip(*seen[k : k + g])] for k in range(0, len(seen), g)]
    return {"losses": out["losses"], "step_end_s": out["step_end_s"], "loop_s": metrics["train_runtime"],
            "step_tokens": [s[0] for s in steps], "step_trained": [s[1] for s in steps],
            "step_positions": [s[2] for s in steps], "setting": setting["words"]}  # fmt: skip


def trl_clock(out: dict):
    """A TrainerCallback that appends to out["step_end_s"] each optimizer step's end (seconds since training began)
    and to out["losses"] each logged loss: TRL's side of the per-step timestamps and losses. On a GPU it waits for
    the step's kernels first, so that a timestamp is a finished step's."""
    import torch
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def on_train_begin(self, *a, **k):
            out["t0"] = time.perf_counter()

        def on_step_end(self, *a, **k):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            out["step_end_s"].append(time.perf_counter() - out["t0"])

        def on_log(self, *a, logs=None, **k):
            if logs and "loss" in logs:
                out["losses"].append(logs["loss"])

    return Clock()


def child(system: str, body_path: str, runners: dict | None = None) -> int:
    """One system's run of the config in `body_path`, in this process: its result and peak RSS as one JSON line.
    `runners`: system -> function(cfg) (default: this bench's lorakit and TRL)."""
    from lorakit import config

    cfg = config.validate(json.loads(Path(body_path).read_text()))
    result = (runners or {"lorakit": one_lorakit, "trl": one_trl})[system](cfg)
    result["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # Linux: KiB
    print(json.dumps(result))
    return 0


def spawn(system: str, body: dict, work: Path, script: str = __file__) -> dict:
    """`script --_one SYSTEM BODY` (its child) in a process of its own: the run's result, with its wall time."""
    path = work / f"{Path(body['output_dir']).name}.json"
    path.write_text(json.dumps(body))
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, script, "--_one", system, str(path)], capture_output=True, text=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})  # fmt: skip
    if out.returncode != 0:
        sys.exit(f"{system} run failed:\n{out.stderr[-3000:]}")
    took = time.perf_counter() - t0
    print(f"  {Path(body['output_dir']).name}: {took:.0f} s", file=sys.stderr, flush=True)
    return json.loads(out.stdout.strip().splitlines()[-1]) | {"process_s": round(took, 1)}


def timed(run: dict, tokens: list[int], trained_tokens: list[int]) -> dict:
    """Throughput of steps 2..N: the first step pays for lazy initialization in both systems."""
    seconds = run["step_end_s"][-1] - run["step_end_s"][0]
    return {"tokens_per_s": sum(tokens[1:]) / seconds, "trained_tokens_per_s": sum(trained_tokens[1:]) / seconds,
            "timed_s": seconds, "loop_s": run["loop_s"], "peak_rss_gb": run["peak_rss_gb"]}  # fmt: skip


def flops_per_token(cfg, plan_steps: list, examples: list[dict], share: float) -> tuple[float, str]:
    """lorakit.plan's model FLOPs per trained-on token, and its formula in words with this model's numbers."""
    from lorakit import plan

    lengths = [len(examples[i]["input_ids"]) for step in plan_steps[1:] for row in step for i in row]
    seq = sum(n * n for n in lengths) / sum(lengths)  # token-weighted example length: attention stays per example
    shape = plan.load_shape(cfg.model)
    t = cfg.train
    setup = plan.Setup(method="lora", seq_len=round(seq), batch=t.batch_size, r=cfg.adapter.r, checkpointing=False,
                       trained_share=share, device="cpu", grad_accum=t.grad_accum)  # fmt: skip
    parts = plan.flops_parts(shape, setup)
    linear = shape.layers * shape.layer_params
    lora = parts["linear"] / 2 - 2 * linear - 2 * shape.vocab * shape.hidden * share  # its weight gradients' half
    words = (f"per token: 2 x {linear / 1e6:.1f}M decoder linear weights (forward) + 2 x {shape.vocab} x "
             f"{shape.hidden} head x {share:.3f} trained share (forward, trained positions only) + the same again "
             f"(backward: input gradients through the frozen weights) + 2 x {lora / 1e6:.2f}M LoRA weights "
             f"(their weight gradients) + 3 x 2 x {shape.layers} layers x {shape.heads} heads x {shape.head_dim} "
             f"x {round(seq)} tokens (causal attention within each example, forward and backward) = "
             f"{sum(parts.values()) / 1e9:.3f} GFLOP")  # fmt: skip
    return sum(parts.values()), words


def compare(cfg, prepared, runs: dict[str, list[dict]], peak_flops: float) -> dict:
    examples = [{"input_ids": a, "labels": b} for a, b in zip(prepared.train["input_ids"], prepared.train["labels"])]
    steps = step_plan(cfg, prepared, cfg.train.max_steps)
    lk_tokens = [sum(len(examples[i]["input_ids"]) for row in s for i in row) for s in steps]
    lk_trained = [sum(trained(examples[i]["labels"]) for row in s for i in row) for s in steps]
    share = sum(lk_trained[1:]) / sum(lk_tokens[1:])
    per_token, words = flops_per_token(cfg, steps, examples, share)
    measured = {
        "lorakit": [timed(r, lk_tokens, lk_trained) for r in runs["lorakit"]],
        "trl": [timed(r, r["step_tokens"], r["step_trained"]) for r in runs["trl"]],
    }
    out: dict = {"steps": cfg.train.max_steps, "timed_steps": cfg.train.max_steps - 1, "flops_per_token": per_token,
                 "flops_formula": words, "systems": {}}  # fmt: skip
    for system, ms in measured.items():
        med = {k: statistics.median(m[k] for m in ms) for k in ms[0]}
        out["systems"][system] = {**{k: round(v, 3) for k, v in med.items()},
                                  "mfu": round(med["tokens_per_s"] * per_token / peak_flops, 4),
                                  "losses": [round(x, 5) for x in runs[system][0]["losses"]],
                                  "timed_s_each": [round(m["timed_s"], 2) for m in ms]}  # fmt: skip
    lk, trl = out["systems"]["lorakit"], out["systems"]["trl"]
    out["ratios"] = {
        "speed_lorakit_over_trl": round(lk["tokens_per_s"] / trl["tokens_per_s"], 3),
        "trained_speed_lorakit_over_trl": round(lk["trained_tokens_per_s"] / trl["trained_tokens_per_s"], 3),
        "memory_trl_over_lorakit": round(trl["peak_rss_gb"] / lk["peak_rss_gb"], 3),
    }
    # lorakit's own count of input tokens, against the examples its steps held (a check on step_plan).
    recorded = runs["lorakit"][0]["recorded_tokens"]
    out["lorakit_recorded_tokens_match"] = recorded[-1] == sum(lk_tokens)
    out["lorakit_own_tokens_per_s"] = runs["lorakit"][0]["own_tokens_per_s"]
    out["same_tokens_per_step"] = (
        lk_tokens == runs["trl"][0]["step_tokens"] and lk_trained == runs["trl"][0]["step_trained"]
    )
    out["agreement"] = agreement(lk["losses"], trl["losses"])
    out["trl_setting"] = runs["trl"][0]["setting"]
    # Of the positions each system's micro-batches held, the padding (lorakit's as its summary.json counts it).
    trl_run = runs["trl"][0]
    trl_padding = round(1 - sum(trl_run["step_tokens"]) / sum(trl_run["step_positions"]), 4)
    out["padding_share"] = {"lorakit": runs["lorakit"][0]["padding_share"], "trl": trl_padding}
    out["lorakit_attention"] = runs["lorakit"][0]["attention"]
    return out


def agreement(a: list[float], b: list[float]) -> dict:
    """The same rows every step in both systems: the losses must agree step by step."""
    diffs = [abs(x - y) / abs(x) for x, y in zip(a, b)]
    ok = len(a) == len(b) and max(diffs) <= LOSS_TOLERANCE
    verdict = (f"losses agree within {LOSS_TOLERANCE:.0%} per step: the speed counts" if ok else
               f"losses differ by more than {LOSS_TOLERANCE:.0%} at a step: the speed does not count")  # fmt: skip
    return {"per_step_rel_diff": [round(d, 5) for d in diffs], "max_rel_diff": round(max(diffs), 5), "agree": ok,
            "verdict": verdict}  # fmt: skip


def table(results: dict, peak_flops: float) -> str:
    lines = [f"CPU fp32 matmul peak {peak_flops / 1e9:.1f} GFLOP/s; medians of the timed steps (2..N)"]
    lines.append(f"{'setting':<10}{'system':<9}{'trained tok/s':>14}{'tok/s':>8}{'peak GB':>9}{'MFU':>7}  losses")
    for setting, r in results.items():
        for system, s in r["systems"].items():
            losses = " ".join(f"{x:.3f}" for x in s["losses"])
            lines.append(f"{setting:<10}{system:<9}{s['trained_tokens_per_s']:>14.1f}{s['tokens_per_s']:>8.1f}"
                         f"{s['peak_rss_gb']:>9.2f}{s['mfu']:>7.1%}  {losses}")  # fmt: skip
            if system == "trl":
                lines.append(f"{'':<10}TRL as: {r['trl_setting']}")
        q = r["ratios"]
        lines.append(f"{'':<10}lorakit/trl speed {q['speed_lorakit_over_trl']:.2f}x (trained tokens "
                     f"{q['trained_speed_lorakit_over_trl']:.2f}x), trl/lorakit memory "
                     f"{q['memory_trl_over_lorakit']:.2f}x; {r['agreement']['verdict']}")  # fmt: skip
        pad = r["padding_share"]
        lines.append(f"{'':<10}padding share of the positions: lorakit {pad['lorakit']:.1%} (attention "
                     f"{r['lorakit_attention']}), TRL {pad['trl']:.1%}")  # fmt: skip
        lines.append(f"{'':<10}MFU = tokens/s x FLOPs per token / peak; FLOPs {r['flops_formula']}")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--setting", choices=("unpacked", "packed", "both"), default="both")
    p.add_argument("--steps", type=int, help="optimizer steps per run, at least 2 (default: 8 unpacked, 4 packed)")
    p.add_argument("--repeats", type=int, default=2, help="runs per system, alternating lorakit and TRL (default 2)")
    p.add_argument("--_one", nargs=2, metavar=("SYSTEM", "BODY"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if not DATA.is_dir():
        print(f"error: the benchmark data is not here: {DATA} (../shared/data beside the repository)", file=sys.stderr)
        return 2
    if args._one:
        return child(*args._one)
    if args.steps is not None and args.steps < 2:
        p.error("--steps must be at least 2: the first step is left out of the timing")
    if args.repeats < 1:
        p.error("--repeats must be at least 1")
    import torch

    from lorakit import config, data, model, plan

    peak_flops = plan.this_device("cpu", seconds=3.0)[1]  # before any run, with the CPU to itself
    tok = model.load_tokenizer("smollm2-135m-instruct")
    results = {}
    with tempfile.TemporaryDirectory() as td:
        work = Path(td)
        for setting in SETTINGS if args.setting == "both" else (args.setting,):
            steps = args.steps or SETTINGS[setting]["steps"]
            cfg = config.validate(run_config(setting, steps, work))
            prepared = data.prepare(cfg.data, tok)  # tokenize once: every run then reads this cache
            runs: dict[str, list[dict]] = {s: [] for s in SYSTEMS}
            for rep in range(args.repeats):
                for system in SYSTEMS:
                    runs[system].append(spawn(system, run_config(setting, steps, work, f"{setting}-{system}-{rep}"),
                                              work))  # fmt: skip
            results[setting] = compare(cfg, prepared, runs, peak_flops)
    print(json.dumps({"cpu_fp32_matmul_gflops": round(peak_flops / 1e9, 1), "threads": torch.get_num_threads(),
                      "repeats": args.repeats, "settings": results}, indent=1))  # fmt: skip
    print(table(results, peak_flops), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
