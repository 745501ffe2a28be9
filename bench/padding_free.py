"""Padding-free micro-batches: attention candidates against padded rows, side by side, as ratios.

    python bench/padding_free.py [--setting unpacked|packed] [--steps 1] [--repeats 3] [--device cpu|cuda] [--flex]
    python bench/padding_free.py --train [--setting unpacked] [--steps 4] [--repeats 2]

Default: forward and backward of the training loss (lorakit's loss_sum: LoRA r 16 on all linear layers of
SmolLM2-135M-Instruct, fp32 on a CPU, bf16 autocast on a GPU) over the micro-batches of a train_vs_peers setting's
first steps (the same rows, order and grouping as training), once per candidate and round, the rounds alternating
(A B C D, A B C D, ...) so that a machine shared with other work slows every candidate alike. It prints each
candidate's tokens/s (real tokens: padding is not counted) with its range over the rounds, its ratio to padded rows
within each round, and the share of the padded layout's positions that were padding:

  padded    rows padded to the longest of their micro-batch, a (B, 1, L, L) mask (lorakit before issue 32)
  dense     one padding-free row, transformers' block-diagonal (1, 1, T, T) mask (TRL's padding_free on sdpa)
  per-row   one padding-free row, attention row by row (lorakit.attention's sdpa-per-row)
  repad     one padding-free row; the attention gathers q, k and v back into (B, L_max) rows for one causal sdpa
  flex      (--flex, CUDA) one padding-free row, transformers' flex_attention with a document mask (torch.compile;
            torch 2.13 has no flex attention backward on a CPU)
  flash     (CUDA with flash-attn) one padding-free row, flash_attention_2's varlen kernel

--train: whole training runs instead (train.run in a process of its own, the setting's config, --steps steps),
alternating lorakit as it chooses (padding-free) and lorakit forced to pad each micro-batch (as before issue 32);
prints tokens/s from summary.json (the first step left out), the ratio per round, and each one's padding_share.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import train_vs_peers as peers  # noqa: E402  (its settings: the same rows as the speed comparison)


def repad_attention(module, query, key, value, attention_mask, **kwargs):
    """The rows of a one-row micro-batch gathered back into (B, L_max) rows for one causal sdpa call, then
    scattered back: exact for causal attention (each row's padding comes after its tokens); no sliding window."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from lorakit import attention

    if attention_mask is not None or key.shape[2] != query.shape[2] or query.shape[0] != 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    import torch

    spans = attention.rows(kwargs.get("position_ids"), 1, query.shape[2])[0]
    longest = max(e - s for s, e, *_ in spans)  # packed SFT rows: no branches
    index = torch.zeros(len(spans), longest, dtype=torch.long, device=query.device)
    real = torch.zeros(len(spans), longest, dtype=torch.bool, device=query.device)
    for r, (s, e, *_) in enumerate(spans):
        index[r, : e - s] = torch.arange(s, e, device=query.device)
        real[r, : e - s] = True
    rows = [x[0][:, index].transpose(0, 1) for x in (query, key, value)]  # (B, heads, L_max, head_dim)
    out, _ = sdpa_attention_forward(module, *rows, None, **kwargs)  # (B, L_max, heads, head_dim)
    return out[real][None], None


def candidates(device: str, flex: bool) -> dict[str, str]:
    """Candidate -> the attention implementation it sets on the model."""
    from transformers import AttentionInterface, AttentionMaskInterface

    from lorakit import attention

    AttentionInterface.register("bench-repad", repad_attention)
    AttentionMaskInterface.register("bench-repad", attention._mask("sdpa"))
    out = {"padded": "sdpa", "dense": "sdpa", "per-row": "sdpa-per-row", "repad": "bench-repad"}
    if flex:
        out["flex"] = "flex_attention"
    if device == "cuda":
        from transformers.utils import is_flash_attn_2_available

        if is_flash_attn_2_available():
            out["flash"] = "flash_attention_2"
    return out


def micro_batches(setting: str, steps: int, work: Path):
    """The setting's first `steps` steps of micro-batches as training groups them: lists of examples."""
    from lorakit import config, data, model, train

    cfg = config.validate(peers.run_config(setting, steps, work))
    tok = model.load_tokenizer(cfg.model)
    prepared = data.prepare(cfg.data, tok)
    examples = train._examples(prepared.train)
    out = []
    for step in peers.step_plan(cfg, prepared, steps):
        tokens = [sum(len(examples[i]["input_ids"]) for i in row) for row in step]
        for group in train.micro_batches(list(range(len(step))), tokens, cfg.train.batch_size):
            out.append([[examples[i] for i in step[r]] for r in group])
    return cfg, tok, out


def micro(args: argparse.Namespace) -> dict:
    import torch

    from lorakit import adapter, loss, model, packing

    with tempfile.TemporaryDirectory() as td:
        cfg, tok, groups = micro_batches(args.setting, args.steps, Path(td))
    dtype = torch.float32 if args.device == "cpu" else torch.bfloat16
    net = adapter.attach(model.load_model(cfg.model, dtype=dtype, device=args.device), cfg)
    net.train()
    base = net.get_base_model()
    pad = tok.pad_token_id
    packed = cfg.data.packing
    implementations = candidates(args.device, args.flex)
    layouts = {name: [packing.collate(g, pad, packed, flat=name != "padded") for g in groups]
               for name in implementations}  # fmt: skip
    real = sum(len(ex["input_ids"]) for g in groups for row in g for ex in row)
    padded_positions = sum(b["input_ids"].numel() for b in layouts["padded"])
    seconds: dict[str, list[float]] = {k: [] for k in layouts}
    losses: dict[str, float] = {}
    for rnd in range(args.repeats + 1):  # round 0 warms up (allocator, lazy initialization, compilation)
        for name, batches in layouts.items():
            base.set_attn_implementation(implementations[name])
            tic, total = time.perf_counter(), 0.0
            for batch in batches:
                with torch.autocast(args.device, dtype=dtype, enabled=dtype != torch.float32):
                    s, _ = loss.loss_sum(net, {k: v.to(args.device) for k, v in batch.items()})
                s.backward()
                total += s.item()
            if args.device == "cuda":
                torch.cuda.synchronize()
            net.zero_grad(set_to_none=True)
            if rnd:
                seconds[name].append(time.perf_counter() - tic)
                print(f"round {rnd} {name}: {real / seconds[name][-1]:.1f} tokens/s", file=sys.stderr, flush=True)
            losses[name] = total
    return {"setting": args.setting, "device": args.device, "threads": torch.get_num_threads(),
            "micro_batches": len(groups), "real_tokens": real, "padded_positions": padded_positions,
            "padding_share_padded": round(1 - real / padded_positions, 4),
            "candidates": {name: {"tokens_per_s": [round(real / t, 1) for t in ts],
                                  "vs_padded": [round(seconds["padded"][i] / t, 3) for i, t in enumerate(ts)],
                                  "loss_sum": round(losses[name], 4)}
                           for name, ts in seconds.items()}}  # fmt: skip


def one_train(mode: str, body_path: str) -> int:
    """A child: one training run, padding-free (as lorakit chooses) or forced to pad (before issue 32)."""
    from lorakit import attention, config

    if mode == "padded":  # the model's own attention: micro-batches padded to their longest row
        attention.choose = lambda model, device, dtype: attention.name(model)
    print(json.dumps(peers.one_lorakit(config.validate(json.loads(Path(body_path).read_text())))))
    return 0


def whole_runs(args: argparse.Namespace) -> dict:
    out: dict = {"setting": args.setting, "steps": args.steps, "runs": {"padded": [], "padding-free": []}}
    with tempfile.TemporaryDirectory() as td:
        work = Path(td)
        for rep in range(args.repeats):
            for mode in out["runs"]:
                body = peers.run_config(args.setting, args.steps, work, f"{mode}-{rep}")
                path = work / f"{mode}-{rep}.json"
                path.write_text(json.dumps(body))
                done = subprocess.run([sys.executable, __file__, "--_one", mode, str(path)], capture_output=True,
                                      text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})  # fmt: skip
                if done.returncode:
                    sys.exit(f"{mode} run failed:\n{done.stderr[-3000:]}")
                run = json.loads(done.stdout.strip().splitlines()[-1])
                # Steps 2..N: the first pays for lazy initialization (as train_vs_peers times it).
                timed = run["recorded_tokens"][-1] - run["recorded_tokens"][0]
                run["tokens_per_s"] = timed / (run["step_end_s"][-1] - run["step_end_s"][0])
                out["runs"][mode].append({k: run[k] for k in ("tokens_per_s", "padding_share", "attention", "losses")})
                print(f"round {rep + 1} {mode}: {run['tokens_per_s']:.1f} tokens/s", file=sys.stderr, flush=True)
    pf, pad = out["runs"]["padding-free"], out["runs"]["padded"]
    out["ratio_per_round"] = [round(a["tokens_per_s"] / b["tokens_per_s"], 3) for a, b in zip(pf, pad)]
    diffs = [abs(x - y) / abs(y) for a, b in zip(pf, pad) for x, y in zip(a["losses"], b["losses"])]
    out["max_loss_rel_diff"] = max(diffs)
    return out


def table(result: dict) -> str:
    if "runs" in result:
        lines = [f"{result['setting']}, whole training runs of {result['steps']} steps (steps 2..N timed)"]
        for mode, runs in result["runs"].items():
            speeds = [r["tokens_per_s"] for r in runs]
            lines.append(f"  {mode:<13}{runs[0]['attention']:<16}{statistics.median(speeds):8.1f} tokens/s "
                         f"({min(speeds):.1f}-{max(speeds):.1f}), padding share "
                         f"{runs[0]['padding_share']:.1%}")  # fmt: skip
        ratios = result["ratio_per_round"]
        lines.append(f"  padding-free / padded per round: {', '.join(f'{r:.2f}x' for r in ratios)}; "
                     f"losses agree within {result['max_loss_rel_diff']:.1e}")  # fmt: skip
        return "\n".join(lines)
    lines = [f"{result['setting']} on {result['device']} ({result['threads']} threads): {result['micro_batches']} "
             f"micro-batches, {result['real_tokens']} real tokens; padded rows hold "
             f"{result['padded_positions']} positions, {result['padding_share_padded']:.1%} padding"]  # fmt: skip
    for name, c in result["candidates"].items():
        speeds, ratios = c["tokens_per_s"], c["vs_padded"]
        lines.append(f"  {name:<9}{statistics.median(speeds):8.1f} tokens/s ({min(speeds):.1f}-{max(speeds):.1f}), "
                     f"x padded {min(ratios):.2f}-{max(ratios):.2f}, loss sum {c['loss_sum']}")  # fmt: skip
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--setting", choices=tuple(peers.SETTINGS), default="unpacked")
    p.add_argument("--steps", type=int, default=None, help="steps of micro-batches (default 1; --train: 4)")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds (default 3; a warm-up round comes first)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--flex", action="store_true", help="also flex attention (compiles with torch.compile)")
    p.add_argument("--train", action="store_true", help="whole training runs, padding-free against padded")
    p.add_argument("--_one", nargs=2, metavar=("MODE", "BODY"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if not peers.DATA.is_dir():
        print(f"error: the benchmark data is not here: {peers.DATA}", file=sys.stderr)
        return 2
    if args._one:
        return one_train(*args._one)
    args.steps = args.steps or (4 if args.train else 1)
    if args.flex and args.device == "cpu":
        p.error("--flex needs --device cuda: torch's flex attention has no backward on a CPU")
    if args.train and args.steps < 2:
        p.error("--steps must be at least 2 with --train: the first step is left out of the timing")
    result = whole_runs(args) if args.train else micro(args)
    print(json.dumps(result, indent=1))
    print(table(result), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
