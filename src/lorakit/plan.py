"""`lorakit plan`: will a run fit, and how fast will it go, from the model's config alone (no weights).

Memory is counted the way training lays it out: the weights in their precision (4-bit: half a byte a
weight plus its quantization constants), the trained parameters with their gradients and AdamW states,
the activations the backward pass keeps (a layer's input per layer under checkpointing, plus the one
layer being recomputed), one chunk of the trained positions' logits (lorakit runs the head there alone,
a chunk at a time), and the framework's own footprint. Speed is the FLOPs of a token against the device's
measured matmul throughput, at the cost per FLOP measured for each kind of work. bench/plan_accuracy.py
measures both against real steps.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any

from lorakit.errors import LorakitError

GIB, MIB = 2**30, 2**20
# Common GPUs: memory as nvidia-smi reports its total, and dense bf16 (fp16 on a T4) matmul peak in FLOP/s.
GPUS = {
    "T4 16GB": (15360 * MIB, 65e12),
    "L4 24GB": (23034 * MIB, 121e12),
    "A10G 24GB": (23028 * MIB, 70e12),
    "A100 40GB": (40960 * MIB, 312e12),
    "A100 80GB": (81920 * MIB, 312e12),
    "H100 80GB": (81559 * MIB, 989e12),
}
# The CPU values are fitted (least worst relative error) to bench/plan_accuracy.py's 48 measured points
# (2-core AMD EPYC, fp32, SmolLM2-135M and a 4-layer model, LoRA/QLoRA/full x 256/1024 x batch 1/4 x
# checkpointing, the chunked head), 2026-11-29. The GPU values are first guesses until a GPU run measures them.
#
# Speed. Seconds per FLOP, in units of 1 / (the device's measured matmul peak), by kind of work: the linear
# layers by method (a QLoRA step on a CPU measures as fast as LoRA's; full fine-tuning's weight gradients are
# large, efficient matmuls), checkpointing's second forward (no autograd graph: cheaper than a training
# forward), attention (on a CPU, SDPA's math path with the packing mask computes every query-key pair of the
# row, masked or not), plus NARROW / hidden for the linear layers: a 576-wide SmolLM2 runs further from the
# peak than a 4096-wide Llama. Then AdamW's step over the trained parameters, and Python, hooks and kernel
# launches per layer and micro-batch.
FLOP_COST = {("cpu", "lora"): 0.896, ("cpu", "qlora"): 0.896, ("cpu", "full"): 0.558, ("cpu", "recompute"): 1.30,
             ("cpu", "attention"): 4.61, ("cuda", "lora"): 2.5, ("cuda", "qlora"): 3.3, ("cuda", "full"): 2.2,
             ("cuda", "recompute"): 2.5, ("cuda", "attention"): 3.3}  # fmt: skip
NARROW = {"cpu": 255.0, "cuda": 0.0}
# On a CPU the optimizer's step measures inside the per-layer cost (a full fine-tune steps every weight of a
# layer: 4x LoRA's); the fit leaves nothing to a per-parameter term.
OPTIMIZER_SECONDS_PER_PARAM = {"cpu": 0.0, "cuda": 2e-11}
LAYER_SECONDS = {("cpu", "lora"): 1.03e-2, ("cpu", "qlora"): 1.03e-2, ("cpu", "full"): 4.48e-2,
                 **{("cuda", m): 3e-4 for m in ("lora", "qlora", "full")}}  # fmt: skip
#
# Memory. A CPU's peak is its resident set: the libraries (torch, transformers, peft, accelerate, datasets, a
# tokenizer) before any model; loading's moment, with the checkpoint read beside the model it fills; and what
# glibc's allocator keeps after freeing. So activations and logits are the counted tensors times what the
# allocator was measured to hold for them: under checkpointing the recomputed layers' temporaries are allocated
# and freed layer after layer, and a LoRA step holds more than a full one. A QLoRA process on a CPU measures
# as LoRA's (the fp32 weights are read before bitsandbytes packs them, and their pages stay with the process).
BASE_BYTES = {"cpu": 0.708 * GIB, "cuda": 0.6 * GIB}  # a GPU's: the CUDA context and the allocator's reserve
CPU_LOADING = 0.68  # x the fp32 weights
ACTIVATIONS_HELD = {  # (device, method, checkpointing) -> factor
    ("cpu", "lora", False): 1.32, ("cpu", "lora", True): 12.7, ("cpu", "qlora", False): 1.43,
    ("cpu", "qlora", True): 16.3, ("cpu", "full", False): 0.90, ("cpu", "full", True): 6.52,
    **{("cuda", m, c): 1.10 for m in ("lora", "qlora", "full") for c in (False, True)},
}  # fmt: skip
# Under checkpointing: each layer's input is held (ACTIVATIONS_HELD) and one layer is recomputed in full at a
# time, whose temporaries the allocator keeps by this factor.
RECOMPUTED_HELD = {"cpu": 0.118, "cuda": 1.0}
LOGITS_HELD = {"cpu": 0.68, "cuda": 1.10}


@dataclass(frozen=True)
class Shape:
    """What the estimate needs of a model: sizes, and the linear layers of one decoder layer (in, out)."""

    name: str
    hidden: int
    layers: int
    heads: int
    head_dim: int
    vocab: int
    tied: bool
    linears: dict[str, tuple[int, int]]  # module name -> (in_features, out_features)
    eager_attention: bool  # keeps the (heads x seq x seq) attention matrix (Gemma 2's soft-capping)

    @property
    def layer_params(self) -> int:
        return sum(i * o for i, o in self.linears.values())

    @property
    def params(self) -> int:
        head = 0 if self.tied else self.vocab * self.hidden
        return self.layers * (self.layer_params + 2 * self.hidden) + self.vocab * self.hidden + head + self.hidden


@dataclass
class Setup:
    """The run: method, the micro-batch each process trains at once, the adapter, the device."""

    method: str = "lora"
    seq_len: int = 1024
    batch: int = 4
    r: int = 16
    targets: list[str] | str = "all-linear"
    checkpointing: bool = False
    nproc: int = 1
    strategy: str = "auto"
    optimizer: str = "adamw"
    trained_share: float = 0.5  # of the tokens, the ones with a label (completions only trains answers)
    device: str = "cuda"  # "cuda" (bf16) or "cpu" (fp32)
    grad_accum: int = 1  # micro-batches per optimizer step


@dataclass
class Estimate:
    device: str
    peak_bytes: int
    breakdown: dict[str, int] = field(default_factory=dict)  # bytes, by what holds them
    flops_per_token: float = 0.0
    tokens_per_s: float = 0.0
    fits: dict[str, dict[str, Any]] = field(default_factory=dict)  # device -> {fits, largest_batch}


def shape_of(config: dict[str, Any]) -> Shape:
    """The Shape of a transformers config.json (llama, mistral, qwen2, gemma 1-3, bloom layouts)."""
    kind = config.get("model_type", "")
    name = config.get("_name_or_path") or kind
    if kind == "bloom":
        h = config.get("hidden_size") or config["n_embed"]
        heads = config.get("n_head") or config["num_attention_heads"]
        linears = {"query_key_value": (h, 3 * h), "dense": (h, h), "dense_h_to_4h": (h, 4 * h),
                   "dense_4h_to_h": (4 * h, h)}  # fmt: skip
        return Shape(name, h, config.get("n_layer") or config["num_hidden_layers"], heads, h // heads,
                     config["vocab_size"], config.get("tie_word_embeddings", True), linears, False)  # fmt: skip
    if "intermediate_size" not in config or "num_attention_heads" not in config:
        raise LorakitError(f"plan: {name} ({kind or 'no model_type'}) is not a layout plan knows (llama, mistral, "
                           "qwen2, gemma, gemma2, gemma3, bloom)")  # fmt: skip
    h, i, heads = config["hidden_size"], config["intermediate_size"], config["num_attention_heads"]
    kv = config.get("num_key_value_heads") or heads
    hd = config.get("head_dim") or h // heads
    linears = {"q_proj": (h, heads * hd), "k_proj": (h, kv * hd), "v_proj": (h, kv * hd), "o_proj": (heads * hd, h),
               "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}  # fmt: skip
    tied = config.get("tie_word_embeddings", kind.startswith("gemma"))
    return Shape(name, h, config["num_hidden_layers"], heads, hd, config["vocab_size"], tied, linears,
                 kind == "gemma2")  # fmt: skip


def load_shape(model: str) -> Shape:
    """A model's Shape from its config alone, under the name given: a config.json, a model folder, the
    built-in alias, a bundled reference model's config, or the hub's config.json (when online)."""
    return replace(shape_of(_config(model)), name=model)


def _config(model: str) -> dict[str, Any]:
    path = Path(model)
    if path.is_file() and path.suffix == ".json":
        return json.loads(path.read_text())
    bundled = _reference(model)
    if bundled is not None:
        return bundled
    from lorakit import model as models

    where = models.resolve(model)
    if where.kind in ("alias", "folder"):
        return json.loads((Path(where.path) / "config.json").read_text())
    try:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(where.path).to_dict()
    except OSError:
        raise LorakitError(
            f"plan: no config for {model} here and the hub cannot be reached; pass its config.json "
            f"(e.g. --model path/to/config.json). Bundled: {', '.join(references())}"
        ) from None


def references() -> list[str]:
    """The hub ids whose config.json ships with lorakit."""
    folder = resources.files("lorakit") / "reference_models"
    return sorted(f.name.removesuffix(".json").replace("--", "/") for f in folder.iterdir()
                  if f.name.endswith(".json") and f.name != "aliases.json")  # fmt: skip


def _reference(model: str) -> dict | None:
    folder = resources.files("lorakit") / "reference_models"
    aliases = json.loads((folder / "aliases.json").read_text())
    f = folder / (aliases.get(model, model).replace("/", "--") + ".json")
    return json.loads(f.read_text()) if f.is_file() else None


def memory(shape: Shape, s: Setup) -> dict[str, int]:
    """Bytes at the peak of a training step, by what holds them (per process)."""
    gpu = s.device != "cpu"
    kind = "cuda" if gpu else "cpu"
    compute = 2 if gpu else 4  # bf16 on a GPU, fp32 on a CPU
    shard = s.nproc if s.strategy == "fsdp" and s.nproc > 1 else 1
    linear = shape.layers * shape.layer_params
    other = shape.params - linear  # embeddings, head, norms: never quantized, and fp32 under QLoRA (peft's prep)
    if s.method == "full":
        weights, trained = 4 * shape.params, shape.params  # fp32 master weights; autocast computes in 16 bits
    elif s.method == "qlora" and gpu:
        weights, trained = int(linear * (0.5 + 1 / 64)) + 4 * other, _lora_params(shape, s)  # NF4 + absmax/block
    else:
        weights, trained = compute * shape.params, _lora_params(shape, s)
    state_bytes = 2 if s.optimizer in ("adamw_8bit", "paged_adamw_8bit") else 8
    tokens = s.batch * s.seq_len
    act = compute * tokens * _saved_per_token_layer(shape, s)
    if s.checkpointing:  # each layer's input, plus one layer recomputed in full during the backward pass
        act = compute * tokens * shape.hidden * shape.layers + int(act // shape.layers * RECOMPUTED_HELD[kind])
    trained_tokens = int(tokens * s.trained_share)
    from lorakit.loss import CHUNK_BYTES  # loss.py owns the chunking (imports torch: so not at the top)

    # The head and its loss run a chunk of trained positions at a time, with the gradient taken at once
    # (loss.LinearCrossEntropy): one chunk's fp32 logits and their 16-bit copy on a GPU, plus the trained
    # positions' hidden states and their gradient.
    chunk = min(trained_tokens, CHUNK_BYTES // (4 * shape.vocab))
    logits = chunk * shape.vocab * (4 + (compute if gpu else 0)) + 2 * compute * trained_tokens * shape.hidden
    parts = {
        "weights": weights // shard,
        "trained_params": 4 * trained // shard if s.method != "full" else 0,
        "gradients": 4 * trained // shard,
        "optimizer_states": state_bytes * trained // shard,
        "activations": int(act * ACTIVATIONS_HELD[kind, s.method, s.checkpointing]),
        "logits": int(logits * LOGITS_HELD[kind]),
    }
    if not gpu:
        # Loading reads the fp32 checkpoint into a state dict beside the model it fills: close to twice the
        # weights in RAM for a moment, which for a small adapter run is the peak of the whole process.
        parts["loading"] = max(0, int(CPU_LOADING * 4 * shape.params) // shard - sum(parts.values()))
    parts["framework"] = int(BASE_BYTES[kind])
    return parts


def _lora_params(shape: Shape, s: Setup) -> int:
    names = shape.linears if s.targets == "all-linear" else [t for t in s.targets if t in shape.linears]
    return shape.layers * sum(s.r * (shape.linears[n][0] + shape.linears[n][1]) for n in names)


def _saved_per_token_layer(shape: Shape, s: Setup) -> int:
    """Values autograd keeps per token for one decoder layer (their inputs, for the backward pass)."""
    ins = sum(i for i, _ in shape.linears.values())  # every linear's input (LoRA's A and full's weight grads)
    outs = max(o for _, o in shape.linears.values())  # the MLP's widest output, kept by its activation
    attention = 4 * shape.heads * shape.head_dim  # q, k, v rotated and the attention output
    per_layer = (ins + 3 * outs + attention + 4 * shape.hidden) * shape.layers
    if shape.eager_attention:  # the attention matrix itself, and its softmax
        per_layer += 2 * shape.heads * s.seq_len * shape.layers
    return per_layer


def flops_per_token(shape: Shape, s: Setup) -> float:
    """Matmul FLOPs to train on one token: forward, backward (weight gradients only where trained), recompute."""
    return sum(flops_parts(shape, s).values())


def flops_parts(shape: Shape, s: Setup) -> dict[str, float]:
    """A token's training FLOPs by kind, as the speed model prices them: the linear layers and the head
    (forward and backward), attention's score and value products (forward, and the backward's dq, dk, dv),
    and checkpointing's second forward of the linear layers."""
    matmul = 2 * shape.layers * shape.layer_params
    head = 2 * shape.vocab * shape.hidden * s.trained_share
    backward = 2 * (matmul + head) if s.method == "full" else matmul + head + 2 * _lora_params(shape, s)
    attention = 2 * shape.layers * shape.heads * shape.head_dim * s.seq_len  # causal: half of 4 s h per layer
    return {
        "linear": matmul + head + backward,
        "attention": attention * (3 + s.checkpointing),
        "recompute": matmul if s.checkpointing else 0,
    }


def estimate(shape: Shape, s: Setup, here: tuple[int, float] | None = None) -> Estimate:
    """Peak memory and speed of `s`, and which devices fit it: the common GPUs (for a GPU run), and `here`,
    this machine's device as (memory bytes, measured matmul FLOP/s)."""
    parts = memory(shape, s)
    peak = sum(parts.values())
    per_token = flops_per_token(shape, s)
    devices = {} if s.device == "cpu" else dict(GPUS)
    if here is not None:
        devices = {f"this {s.device.upper()}": here, **devices}
    fits = {
        name: {"memory_bytes": size, "fits": peak <= size, "largest_batch": _largest_batch(shape, s, size),
               "tokens_per_s": round(tokens_per_s(shape, s, flops), 1)}
        for name, (size, flops) in devices.items()
    }  # fmt: skip
    speed = next(iter(fits.values()))["tokens_per_s"] if fits else 0.0
    return Estimate(s.device, peak, parts, per_token, speed, fits)


def tokens_per_s(shape: Shape, s: Setup, flops: float) -> float:
    """Training tokens a second over all processes, on a device of `flops` matmul FLOP/s: the matmuls at the
    utilization lorakit reaches, plus the optimizer's step and the per-layer costs of each micro-batch."""
    kind = "cpu" if s.device == "cpu" else "cuda"
    tokens = s.batch * s.seq_len * s.grad_accum
    trained = shape.params if s.method == "full" else _lora_params(shape, s)
    f = flops_parts(shape, s)
    narrow = NARROW[kind] / shape.hidden
    matmuls = tokens / flops * (f["linear"] * (FLOP_COST[kind, s.method] + narrow)
                                + f["recompute"] * (FLOP_COST[kind, "recompute"] + narrow)
                                + f["attention"] * FLOP_COST[kind, "attention"])  # fmt: skip
    overhead = OPTIMIZER_SECONDS_PER_PARAM[kind] * trained + LAYER_SECONDS[kind, s.method] * shape.layers * s.grad_accum
    seconds = matmuls + overhead
    return tokens / seconds * s.nproc


def _largest_batch(shape: Shape, s: Setup, size: int) -> int:
    """The largest micro-batch (per process) whose peak fits `size` bytes; 0 if not even one row."""
    best, batch = 0, 1
    while batch <= 4096 and sum(memory(shape, Setup(**{**asdict(s), "batch": batch})).values()) <= size:
        best, batch = batch, batch * 2
    return best


def matmul_flops(device: str = "cpu", seconds: float = 0.3) -> float:
    """This device's matmul throughput, measured now (FLOP/s): fp32 on a CPU, bf16 on a GPU."""
    import torch

    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    a = torch.randn(2048, 2048, device=device, dtype=dtype)
    b = torch.randn(2048, 2048, device=device, dtype=dtype)

    def sync() -> None:
        if device != "cpu":
            torch.cuda.synchronize()

    a @ b  # warm-up: thread pool, kernels, caches
    sync()
    runs, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        runs += 1
        sync()
    return 2 * 2048**3 * runs / (time.perf_counter() - start)


def this_device(device: str, seconds: float = 0.3) -> tuple[int, float]:
    """(memory bytes, matmul FLOP/s) of this machine's `device`: RAM for the CPU, the first GPU's memory."""
    import psutil
    import torch

    memory_bytes = (
        psutil.virtual_memory().total if device == "cpu" else torch.cuda.get_device_properties(0).total_memory
    )
    return memory_bytes, matmul_flops(device, seconds)


def setup_of(cfg: Any, device: str, nproc: int = 1) -> Setup:
    """The Setup of a run config (its micro-batch, length, adapter and optimizer) on `device`."""
    t, a = cfg.train, cfg.adapter
    share = 1.0 if cfg.data.train_on == "all" else 0.5
    return Setup(cfg.method, cfg.data.max_length, t.batch_size, a.r, a.target_modules, t.gradient_checkpointing,
                 nproc, t.strategy, t.optimizer, share, device, t.grad_accum)  # fmt: skip


def check_run(cfg: Any, device: str, nproc: int, force: bool = False) -> tuple[int, str | None]:
    """Before training: the micro-batch to use (resolving `train.batch_size: auto`) and a one-line estimate.

    Refuses a run predicted not to fit this device (unless `force`). A model whose config plan cannot read
    (a hub id offline, an unknown layout) trains without an estimate, unless its batch size is auto.
    """
    auto = cfg.train.batch_size == "auto"
    try:
        shape = load_shape(cfg.model)
    except LorakitError as e:
        if auto:
            raise LorakitError(f"train.batch_size: auto needs the model's size: {e}. Set a number instead") from None
        return cfg.train.batch_size, None
    setup = setup_of(cfg, "cpu" if device == "cpu" else "cuda", nproc)
    memory_bytes, flops = this_device(device, seconds=0.05)
    per_process = memory_bytes // nproc if device == "cpu" else memory_bytes  # CPU processes share the RAM
    if auto:
        setup.batch = min(_largest_batch(shape, setup, per_process), 64)
        if setup.batch == 0:
            raise LorakitError(f"train.batch_size: auto: not even one row of {setup.seq_len} tokens fits this "
                               f"{device} ({per_process / GIB:.1f} GiB); see `lorakit plan`")  # fmt: skip
    est = estimate(shape, setup, (per_process, flops))
    line = (f"plan: peak ~{est.peak_bytes / GIB:.1f} GiB of {per_process / GIB:.1f} GiB per process ("
            + ", ".join(f"{k} {v / GIB:.1f}" for k, v in est.breakdown.items() if v >= GIB / 20)
            + f"); ~{est.tokens_per_s:.0f} tokens/s at batch {setup.batch}")  # fmt: skip
    if est.peak_bytes > per_process and not force:
        raise LorakitError(
            f"{line}: it does not fit this {device}. {_levers(cfg, setup.batch)}, or pass --force to try anyway"
        )
    return setup.batch, line


def _levers(cfg: Any, batch: int) -> str:
    """What lowers a run's peak memory, leaving out what the run already does."""
    levers = ["Lower train.batch_size or data.max_length" if batch > 1 else "Lower data.max_length"]
    if not cfg.train.gradient_checkpointing:
        levers.append("turn on train.gradient_checkpointing")
    if cfg.method != "qlora":
        levers.append("use method qlora")
    return ", ".join(levers)


def plan(opts: Any) -> tuple[Shape, Setup, Estimate, int | None]:
    """The estimate `lorakit plan` prints: the run config's values, overridden by the options given; and the
    run's token count where the config fixes it (train.max_steps)."""
    import torch

    from lorakit import config, model

    cfg = config.load(opts.config) if opts.config else None
    if cfg is None and not opts.model:
        raise LorakitError("plan: give a run config (lorakit plan run.yaml) or a model (--model ID|folder|config.json)")
    gpu = model.pick_device(opts.device, present=False) != "cpu"  # cuda: the common GPUs, also on a laptop
    setup = setup_of(cfg, "cuda" if gpu else "cpu", opts.nproc) if cfg else Setup(device="cuda" if gpu else "cpu")
    setup.nproc = opts.nproc
    for key, value in (("method", opts.method), ("seq_len", opts.seq_len), ("batch", opts.batch), ("r", opts.r),
                       ("strategy", opts.strategy)):  # fmt: skip
        if value is not None:
            setattr(setup, key, value)
    setup.checkpointing = setup.checkpointing or opts.gradient_checkpointing
    if setup.batch == "auto":
        setup.batch = 4
    shape = load_shape(opts.model or cfg.model)
    here = this_device("cuda") if gpu and torch.cuda.is_available() else None if gpu else this_device("cpu")
    tokens = None
    if cfg is not None and cfg.train.max_steps:
        tokens = cfg.train.max_steps * setup.batch * cfg.train.grad_accum * setup.nproc * setup.seq_len
    return shape, setup, estimate(shape, setup, here), tokens


def table(shape: Shape, setup: Setup, est: Estimate, run_tokens: int | None) -> str:
    """The human table: the breakdown, then each device with whether it fits, its largest batch and speed."""
    precision = "bf16 on a GPU" if setup.device != "cpu" else "fp32 on this CPU"
    lines = [f"plan for {shape.name} ({shape.params / 1e9:.2f}B parameters): {setup.method}"
             + (f" r {setup.r}" if setup.method != "full" else "")
             + f", micro-batch {setup.batch} x {setup.seq_len} tokens, {setup.nproc} process(es)"
             + (f" ({setup.strategy})" if setup.nproc > 1 else "")
             + f", checkpointing {'on' if setup.checkpointing else 'off'}, {precision}"]  # fmt: skip
    for key, value in est.breakdown.items():
        lines.append(f"  {key.replace('_', ' '):<18} {value / GIB:8.2f} GiB")
    lines.append(f"  {'peak':<18} {est.peak_bytes / GIB:8.2f} GiB per process")
    lines.append(f"  {'FLOPs per token':<18} {est.flops_per_token / 1e9:8.2f} G")
    lines.append(f"{'device':<16}{'fits':>6}{'largest batch':>15}{'tokens/s':>11}"
                 + (f"{'run time':>11}" if run_tokens else ""))  # fmt: skip
    for name, f in est.fits.items():
        when = f"{run_tokens / f['tokens_per_s'] / 60:9.0f} m" if run_tokens and f["tokens_per_s"] else ""
        lines.append(f"{name:<16}{'yes' if f['fits'] else 'no':>6}{f['largest_batch']:>15}{f['tokens_per_s']:>11.0f}"
                     + (f"{when:>11}" if run_tokens else ""))  # fmt: skip
    return "\n".join(lines)
