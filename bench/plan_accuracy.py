"""How close `lorakit plan` comes to real training steps on this machine, as JSON lines and a table.

    python bench/plan_accuracy.py [--steps 3] [--models tiny,smollm2] [--quick]

Each grid point (model x method x sequence length x batch x checkpointing) trains in a fresh process for
--steps steps on rows that fill the sequence length, and reports its peak RSS (ru_maxrss) and its tokens/s
(the steps after the first: the first one pays for lazy initialization) against the planner's prediction
for the same setup on this CPU (its fp32 matmul peak measured here). Targets: memory within 15%, speed
within 25%. A point is one process, so imports and model loading are inside the measured peak, as they
are in a user's run.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, resource, sys, time
from lorakit import config, train
cfg = config.validate(json.loads(sys.argv[1]))
t0 = time.perf_counter()
result = train.run(cfg, progress=False)
records = [json.loads(l) for l in open(cfg.output_dir + "/metrics.jsonl")]
first, last = records[0], records[-1]
print(json.dumps({"peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "tokens_per_s_after_first": (last["tokens"] - first["tokens"]) / (last["train_s"] - first["train_s"]),
                  "summary": result.summary}))
"""


def tiny_model(folder: Path) -> Path:
    """A random llama of SmolLM2's vocabulary and tokenizer: hidden 256, 4 layers."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from lorakit import model

    if (folder / "config.json").is_file():
        return folder
    tok = model.load_tokenizer("smollm2-135m-instruct")
    cfg = AutoConfig.for_model("llama", hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                               num_attention_heads=4, num_key_value_heads=2, vocab_size=len(tok),
                               max_position_embeddings=4096, tie_word_embeddings=True)  # fmt: skip
    AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def rows(path: Path, n: int = 400) -> Path:
    """Prompt/completion rows of ~120 tokens, half of them answer: packed rows fill any length."""
    words = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "seven", "stars", "watch"]
    with open(path, "w") as f:
        for i in range(n):
            text = " ".join(words[(i + k) % len(words)] for k in range(50))
            f.write(json.dumps({"prompt": text, "completion": text[::-1][: len(text)]}) + "\n")
    return path


def run_point(model: str, method: str, seq: int, batch: int, ckpt: bool, steps: int, tmp: Path, data: Path) -> dict:
    body = {
        "model": model, "method": method, "output_dir": str(tmp / "run"),
        "adapter": {"r": 16, "alpha": 32, "dropout": 0.0},
        "data": {"train": str(data), "max_length": seq, "packing": True, "cache_dir": str(tmp / "cache")},
        "train": {"max_steps": steps, "batch_size": batch, "gradient_checkpointing": ckpt, "save_every": None},
    }  # fmt: skip
    out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(body)], capture_output=True, text=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})  # fmt: skip
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1][:300]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    from lorakit import config, data, model, plan

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=3, help="steps per point (the first is not timed; short rows get more)")
    p.add_argument("--models", default="tiny,smollm2", help="comma-separated: tiny, smollm2")
    p.add_argument("--quick", action="store_true", help="only batch 1 and sequence length 256")
    args = p.parse_args()
    here = plan.here("cpu", nproc=1, seconds=3.0)  # the peak every prediction scales with: measured long
    grid = list(itertools.product(args.models.split(","), ("lora", "qlora", "full"), (256,) if args.quick else
                                  (256, 1024), (1,) if args.quick else (1, 4), (False, True)))  # fmt: skip
    results = []
    with tempfile.TemporaryDirectory() as td:
        tmp = Path(td)
        names = {"tiny": str(tiny_model(tmp / "tiny")), "smollm2": "smollm2-135m-instruct"}
        data_file = rows(tmp / "rows.jsonl")
        tok = model.load_tokenizer("smollm2-135m-instruct")
        share = data.prepare(config.validate({"data": {"train": str(data_file), "cache_dir": str(tmp / "c")}}).data,
                             tok).stats["trained_share"]  # fmt: skip
        for name, method, seq, batch, ckpt in grid:
            shape = plan.load_shape(names[name])
            setup = plan.Setup(method=method, seq_len=seq, batch=batch, checkpointing=ckpt, trained_share=share,
                               device="cpu")  # fmt: skip
            predicted = plan.estimate(shape, setup, {"this CPU": here})
            point = tmp / f"{name}-{method}-{seq}-{batch}-{int(ckpt)}"
            # At least 4,096 timed tokens: two steps of one short row last a fraction of a second, too noisy.
            steps = max(args.steps, 1 + -(-4096 // (seq * batch)))
            measured = run_point(names[name], method, seq, batch, ckpt, steps, point, data_file)
            row = {"model": name, "method": method, "seq_len": seq, "batch": batch, "checkpointing": ckpt,
                   "predicted_peak_gib": round(predicted.peak_bytes / 2**30, 3),
                   "predicted_tokens_per_s": round(predicted.tokens_per_s, 1)}  # fmt: skip
            if "error" in measured:
                row["error"] = measured["error"]
            else:
                peak, speed = measured["peak_rss"], measured["tokens_per_s_after_first"]
                row.update(measured_peak_gib=round(peak / 2**30, 3), measured_tokens_per_s=round(speed, 1),
                           memory_error=round(predicted.peak_bytes / peak - 1, 3),
                           speed_error=round(predicted.tokens_per_s / speed - 1, 3))  # fmt: skip
            results.append(row)
            print(json.dumps(row), flush=True)
    ok = [r for r in results if "error" not in r]
    print(json.dumps({
        "cpu_fp32_matmul_gflops": round(here.flops / 1e9, 1), "points": len(results), "failed": len(results) - len(ok),
        "memory_within_15pct": sum(abs(r["memory_error"]) <= 0.15 for r in ok),
        "speed_within_25pct": sum(abs(r["speed_error"]) <= 0.25 for r in ok),
        "max_memory_error": max((abs(r["memory_error"]) for r in ok), default=None),
        "max_speed_error": max((abs(r["speed_error"]) for r in ok), default=None),
    }))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
