"""Training throughput and memory of one config, as JSON.

    python bench/train_throughput.py configs/quickstart.yaml --steps 20 [key.sub=value ...]

Runs the real training loop for a few steps (after one warm-up step that is not timed) in a temporary
output folder and prints tokens/s (all input tokens, as TRL and Unsloth report it), trained tokens/s,
peak memory and the loss, so that changes to the loop can be compared run against run.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time

import torch

from lorakit import config, train
from lorakit.errors import LorakitError


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="YAML run file")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    p.add_argument("--steps", type=int, default=10, help="timed optimizer steps (default 10)")
    args = p.parse_intermixed_args()  # overrides after --steps too
    try:
        with tempfile.TemporaryDirectory() as tmp:
            cfg = config.load(
                args.config,
                [
                    *args.overrides,
                    f"output_dir={tmp}/warm",
                    "train.max_steps=1",
                    "train.save_every=null",
                    "data.eval=null",
                ],
            )
            train.run(cfg, progress=False)  # warm-up: model conversion, tokenization cache, allocator
            cfg = cfg.model_copy(
                update={"output_dir": f"{tmp}/run", "train": cfg.train.model_copy(update={"max_steps": args.steps})}
            )
            t0 = time.perf_counter()
            s = train.run(cfg, progress=False).summary
            wall = time.perf_counter() - t0
    except LorakitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(
        json.dumps(
            {
                "config": args.config,
                "overrides": args.overrides,
                "model": cfg.model,
                "method": cfg.method,
                "device": s["device"],
                "dtype": s["dtype"],
                "threads": torch.get_num_threads(),
                "steps": s["steps"],
                "batch_size": cfg.train.batch_size,
                "grad_accum": cfg.train.grad_accum,
                "max_length": cfg.data.max_length,
                "packing": s["packing"],
                "tokens": s["tokens"],
                "trained_tokens": s["trained_tokens"],
                "tokens_per_s": s["tokens_per_s"],
                "trained_tokens_per_s": round(s["trained_tokens"] / s["wall_time_s"], 1),
                "loop_wall_s": s["wall_time_s"],
                "run_wall_s": round(wall, 2),
                "peak_memory_mb": s["peak_memory_mb"],
                "final_loss": s["final_train_loss"],
                "trainable_params": s["trainable_params"],
            },
            indent=1,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
