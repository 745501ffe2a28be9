"""`lorakit plan`: will a run fit, and how fast will it go, from the model's config alone (no weights).

Memory is counted the way training lays it out: the weights in their precision (4-bit: half a byte a
weight plus its quantization constants), the trained parameters with their gradients and AdamW states,
the activations the backward pass keeps (a layer's input per layer under checkpointing, plus the one
layer being recomputed), one chunk of the trained positions' logits (lorakit runs the head there alone,
a chunk at a time), and the framework's own footprint. Speed is the FLOPs of a token against the device's
measured matmul throughput, at the cost per FLOP measured for each kind of work, plus what does not grow
with the tokens (QLoRA's dequantization of each 4-bit weight at each use, per-layer overheads).
bench/plan_accuracy.py measures both against real steps on a CPU; tests/unit/test_plan.py holds the GPU runs.

`lorakit train` asks the same questions before it starts (check_run): its `batch_size: auto` and its refusal
of a run that does not fit are `fit`'s answers for this machine, which `lorakit plan` prints too.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any

from lorakit import launch
from lorakit.errors import LorakitError

GIB, MIB = 2**30, 2**20
# Common GPUs: memory as nvidia-smi reports its total, the dense bf16 (fp16 on a T4) matmul peak of its data sheet in
# FLOP/s, and its data sheet's memory bandwidth in bytes/s (H100: the SXM card's).
GPUS = {
    "T4 16GB": (15360 * MIB, 65e12, 320e9),
    "L4 24GB": (23034 * MIB, 121e12, 300e9),
    "A10 24GB": (23028 * MIB, 125e12, 600e9),
    "A10G 24GB": (23028 * MIB, 70e12, 600e9),
    "RTX 4090 24GB": (24564 * MIB, 165e12, 1008e9),
    "A100 40GB": (40960 * MIB, 312e12, 1555e9),
    "A100 80GB": (81920 * MIB, 312e12, 2039e9),
    "H100 80GB": (81559 * MIB, 989e12, 3350e9),
    "H200 141GB": (143771 * MIB, 989e12, 4800e9),
}
# A GPU whose bandwidth is not known here (this GPU): the reference H200's bytes/s per measured matmul FLOP/s.
BYTES_PER_FLOP = 4800e9 / 790e12
# Of a data sheet's peak, what a bf16 matmul measures: 790 of the H200's 989 TFLOP/s (the reference H200, 2026-12-04).
# The GPU costs below are in units of the measured peak, so a common GPU is priced at this share of its data sheet.
REACHED = 0.80
AUTO_BATCH_MAX = 64  # train.batch_size: auto never goes past it
# The CPU values are fitted (least worst relative error) to bench/plan_accuracy.py's 48 measured points
# (2-core AMD EPYC, fp32, SmolLM2-135M and a 4-layer model, LoRA/QLoRA/full x 256/1024 x batch 1/4 x
# checkpointing, the chunked head), 2026-11-29. The GPU values are fitted to two runs on the reference H200 (bf16,
# 2026-12-04; tests/unit/test_plan.py holds them): a Llama-3.2-1B-shaped LoRA r16 on packed 8 x 2048 rows, and the
# Llama-2-7B QLoRA recipe (r64, unpacked rows of <= 1024, checkpointing, paged_adamw_8bit) with bf16 LoRA weights
# and no kbit preparation, as adapter.attach now trains it; both with the alias's vocabulary (49,152), as they ran,
# and memory as the allocator's peak. Two runs fit two speed constants (LoRA's cost per FLOP, QLoRA's bytes per
# 4-bit weight and use) and one memory factor: three constants, two points, so no validation; the 7B's memory is the
# one number the fit did not make. Full fine-tuning's and attention's GPU costs keep their ratios to LoRA's from the
# first guesses, unmeasured.
#
# Speed. Seconds per FLOP, in units of 1 / (the device's measured matmul peak), by kind of work: the linear
# layers by method (QLoRA's are the same 16-bit matmuls as LoRA's once its weights are dequantized; full fine-tuning's
# weight gradients are large, efficient matmuls), checkpointing's second forward (no autograd graph: cheaper than a
# training forward on a CPU), attention (on a CPU, SDPA's math path with the packing mask computes every query-key
# pair of the row, masked or not), plus NARROW / hidden for the linear layers: a 576-wide SmolLM2 runs further from
# the peak than a 4096-wide Llama. Then QLoRA's dequantization, the optimizer's step over the trained parameters, and
# Python, hooks and kernel launches per layer and micro-batch.
FLOP_COST = {("cpu", "lora"): 0.896, ("cpu", "qlora"): 0.896, ("cpu", "full"): 0.558, ("cpu", "recompute"): 1.30,
             ("cpu", "attention"): 4.61, ("cuda", "lora"): 3.89, ("cuda", "qlora"): 3.89, ("cuda", "full"): 3.43,
             ("cuda", "recompute"): 3.89, ("cuda", "attention"): 5.14}  # fmt: skip
NARROW = {"cpu": 255.0, "cuda": 0.0}
# QLoRA on a GPU: bitsandbytes dequantizes every 4-bit weight to 16 bits at each use (the forward, the backward's
# input gradient, checkpointing's second forward), once per micro-batch whatever its tokens. That is memory-bound
# work, priced in bytes moved per weight and use at the device's memory bandwidth: the kernel itself reads half a
# byte and its constants and writes 2 bytes, which the matmul reads back (~4.5 bytes); the fitted value is all a
# QLoRA micro-batch costs beyond LoRA's matmuls, measured as one lump on one run, so whether the rest is memory-bound
# too, or grows with the micro-batch's tokens, is not known yet. On a CPU a QLoRA step measures as fast as LoRA's.
DEQUANT_BYTES = {"cpu": 0.0, "cuda": 67.0}
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
# A GPU's peak is what nvidia-smi shows: the allocator's peak, bitsandbytes' paged optimizer states (outside it),
# the CUDA context and what the allocator keeps cached (852 MiB in the 1B run, on rows of one length; rows of
# varying length, unpacked, leave more cached: the old-policy 7B QLoRA run showed 1.7 GiB).
BASE_BYTES = {"cpu": 0.708 * GIB, "cuda": 852 * MIB}
CPU_LOADING = 0.68  # x the fp32 weights
ACTIVATIONS_HELD = {  # (device, method, checkpointing) -> factor
    ("cpu", "lora", False): 1.32, ("cpu", "lora", True): 12.7, ("cpu", "qlora", False): 1.43,
    ("cpu", "qlora", True): 16.3, ("cpu", "full", False): 0.90, ("cpu", "full", True): 6.52,
    **{("cuda", m, c): 1.067 for m in ("lora", "qlora", "full") for c in (False, True)},
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
    context: int | None = None  # the longest row its positions cover (max_position_embeddings); None: no limit
    # Its rows are padded, with a dense (B, 1, L, L) attention mask: it cannot attend row by row (attention.supports:
    # ALiBi's Bloom), so training cannot make its micro-batches padding-free.
    dense_mask: bool = False

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
    batch: int | str = 4  # "auto": train.batch_size: auto, which each device resolves (auto_batch)
    r: int = 16
    targets: list[str] | str = "all-linear"
    checkpointing: bool = False
    nproc: int = 1
    strategy: str = "auto"
    optimizer: str = "adamw"
    trained_share: float = 0.5  # of the tokens, the ones with a label (completions only trains answers)
    device: str = "cuda"  # "cuda" (bf16) or "cpu" (fp32)
    grad_accum: int = 1  # micro-batches per optimizer step
    # sft; dpo and orpo train on pairs (a row of the micro-batch is a pair: two sequences of up to seq_len); kto on
    # rows, with a forward without gradients over each row's KL sequence; dpo and kto score every item once with
    # the reference before the first step (reference_seconds)
    objective: str = "sft"


@dataclass(frozen=True)
class Device:
    """Where a process trains, as the estimate needs it."""

    kind: str  # "cuda" (bf16) or "cpu" (fp32)
    memory_bytes: int  # what one process may hold: a GPU's memory; on a CPU, its share of the RAM
    flops: float  # the matmul FLOP/s it measures
    bandwidth: float = 0.0  # its memory's bytes/s (a GPU's data sheet); 0: unknown (step_seconds estimates it)


@dataclass
class Estimate:
    device: str  # the kind the breakdown is for
    batch: int  # the micro-batch the breakdown is for (auto: the first device of that kind's)
    peak_bytes: int
    breakdown: dict[str, int] = field(default_factory=dict)  # bytes, by what holds them
    flops_per_token: float = 0.0
    tokens_per_s: float = 0.0
    # device name -> {memory_bytes, batch, peak_bytes, fits, largest_batch, tokens_per_s, refused}
    fits: dict[str, dict[str, Any]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def shape_of(config: dict[str, Any]) -> Shape:
    """The Shape of a transformers config.json (llama, mistral, qwen2, gemma 1-3, bloom layouts)."""
    from lorakit.attention import supports_config  # imports transformers: so not at the top

    kind = config.get("model_type", "")
    name = config.get("_name_or_path") or kind
    if kind == "bloom":
        h = config.get("hidden_size") or config["n_embed"]
        heads = config.get("n_head") or config["num_attention_heads"]
        linears = {"query_key_value": (h, 3 * h), "dense": (h, h), "dense_h_to_4h": (h, 4 * h),
                   "dense_4h_to_h": (4 * h, h)}  # fmt: skip
        # BLOOM's ALiBi positions have no table to run past: no context to check a row against.
        return Shape(name, h, config.get("n_layer") or config["num_hidden_layers"], heads, h // heads,
                     config["vocab_size"], config.get("tie_word_embeddings", True), linears, False,
                     dense_mask=not supports_config(config))  # fmt: skip
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
                 kind == "gemma2", config.get("max_position_embeddings"),
                 dense_mask=not supports_config(config))  # fmt: skip


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
    other = shape.params - linear  # embeddings, head, norms: never quantized
    trained_bytes = _trained_bytes(s.method, gpu)
    if s.method == "full":
        weights, trained = 4 * shape.params, shape.params  # fp32 master weights; autocast computes in 16 bits
    elif s.method == "qlora" and gpu:
        weights = int(linear * (0.5 + 1 / 64)) + compute * other  # NF4 and its absmax per block of 64 (double quant)
        trained = _lora_params(shape, s)
    else:
        weights, trained = compute * shape.params, _lora_params(shape, s)
    # AdamW keeps two moments in the trained weights' dtype; the 8-bit ones a byte each.
    state_bytes = 2 if s.optimizer in ("adamw_8bit", "paged_adamw_8bit") else 2 * trained_bytes
    tokens = s.batch * s.seq_len * sequences(s)
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
        "trained_params": trained_bytes * trained // shard if s.method != "full" else 0,
        "gradients": trained_bytes * trained // shard,
        "optimizer_states": state_bytes * trained // shard,
        "activations": int(act * ACTIVATIONS_HELD[kind, s.method, s.checkpointing]),
        "logits": int(logits * LOGITS_HELD[kind]),
    }
    if shape.dense_mask:
        # Rows padded to the longest, and a (B, 1, L, L) mask built once per forward for every layer, additive in the
        # compute dtype (eager attention, as Bloom's); padding-free attention (attention.py) builds none.
        parts["attention_mask"] = compute * s.batch * sequences(s) * s.seq_len * s.seq_len
    if not gpu:
        # Loading reads the fp32 checkpoint into a state dict beside the model it fills: close to twice the
        # weights in RAM for a moment, which for a small adapter run is the peak of the whole process.
        parts["loading"] = max(0, int(CPU_LOADING * 4 * shape.params) // shard - sum(parts.values()))
    parts["framework"] = int(BASE_BYTES[kind])
    return parts


def _trained_bytes(method: str, gpu: bool) -> int:
    """Bytes a trained weight takes: fp32 (full's master weights; peft's LoRA weights), but a QLoRA run's in the dtype
    adapter.qlora_dtype gives it (bf16 on a GPU)."""
    if method != "qlora":
        return 4
    import torch

    from lorakit.adapter import qlora_dtype  # imports peft: so not at the top

    compute = torch.bfloat16 if gpu else torch.float32
    return qlora_dtype(compute, "cuda" if gpu else "cpu").itemsize


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


def common_gpus() -> dict[str, Device]:
    """The GPUs of GPUS as devices, each at the share of its data sheet's peak that a matmul reaches."""
    return {name: Device("cuda", size, peak * REACHED, bandwidth) for name, (size, peak, bandwidth) in GPUS.items()}


def estimate(shape: Shape, s: Setup, devices: dict[str, Device] | None = None) -> Estimate:
    """Peak memory and speed of `s`, and for each of `devices` (default: the common GPUs for a GPU run) whether
    it fits. The breakdown is for s.device's kind, at the micro-batch of the first such device when the batch is
    auto; each device row has its own kind, micro-batch, peak and speed."""
    if devices is None:
        devices = common_gpus() if s.device != "cpu" else {}
    fits = {name: fit(shape, s, d) for name, d in devices.items()}
    mine = [f for d, f in zip(devices.values(), fits.values()) if d.kind == _kind(s)]
    top = replace(s, batch=max(mine[0]["batch"], 1) if mine else 1) if s.batch == "auto" else s
    parts = memory(shape, top)
    speed = mine[0]["tokens_per_s"] if mine else 0.0
    return Estimate(s.device, top.batch, sum(parts.values()), parts, flops_per_token(shape, top), speed, fits)


def fit(shape: Shape, s: Setup, device: Device) -> dict[str, Any]:
    """`s` on one device: its micro-batch, peak, whether it fits, its largest micro-batch and speed. This is where
    train.batch_size: auto resolves, for `lorakit train` (check_run) and `lorakit plan` alike: the largest micro-batch
    (at most AUTO_BATCH_MAX) whose predicted peak fits the device; 0 when not even one row does."""
    run = replace(s, device=device.kind)
    largest = _largest_batch(shape, run, device.memory_bytes)
    batch = min(largest, AUTO_BATCH_MAX) if s.batch == "auto" else s.batch
    run = replace(run, batch=max(batch, 1))
    peak = sum(memory(shape, run).values())
    return {"memory_bytes": device.memory_bytes, "batch": batch, "peak_bytes": peak,
            "fits": batch > 0 and peak <= device.memory_bytes, "largest_batch": largest,
            "tokens_per_s": round(tokens_per_s(shape, run, device.flops, device.bandwidth), 1),
            "reference_s_per_1000": round(reference_seconds(shape, run, 1000, device.flops, device.bandwidth), 1),
            "refused": None}  # fmt: skip


def step_seconds(shape: Shape, s: Setup, flops: float, bandwidth: float = 0.0) -> float:
    """Seconds of one optimizer step of one process, on a device of `flops` matmul FLOP/s and `bandwidth` bytes/s of
    memory (0: unknown, BYTES_PER_FLOP x flops): the matmuls at the cost per FLOP lorakit measures, QLoRA's
    dequantization of each 4-bit weight at each use (memory-bound), the optimizer's step and the per-layer costs of
    each micro-batch. Every row counts as `s.seq_len` tokens: for padded rows, give the padded length."""
    kind = _kind(s)
    tokens = s.batch * s.seq_len * s.grad_accum * sequences(s)
    trained = shape.params if s.method == "full" else _lora_params(shape, s)
    f = flops_parts(shape, s)
    narrow = NARROW[kind] / shape.hidden
    matmuls = tokens / flops * (f["linear"] * (FLOP_COST[kind, s.method] + narrow)
                                + f["recompute"] * (FLOP_COST[kind, "recompute"] + narrow)
                                + f["attention"] * FLOP_COST[kind, "attention"])  # fmt: skip
    uses = 2 + s.checkpointing  # the forward, the backward's input gradient, checkpointing's second forward
    quantized = shape.layers * shape.layer_params if s.method == "qlora" else 0
    dequant = DEQUANT_BYTES[kind] * quantized * uses * s.grad_accum / (bandwidth or flops * BYTES_PER_FLOP)
    overhead = OPTIMIZER_SECONDS_PER_PARAM[kind] * trained + LAYER_SECONDS[kind, s.method] * shape.layers * s.grad_accum
    kl = forward_seconds(shape, s, s.batch * s.grad_accum, flops, bandwidth) if s.objective == "kto" else 0.0
    return matmuls + dequant + overhead + kl


def sequences(s: Setup) -> int:
    """Sequences of up to s.seq_len tokens that a row of the micro-batch holds: a preference pair's two."""
    return 2 if s.objective in ("dpo", "orpo") else 1


def forward_seconds(shape: Shape, s: Setup, rows: int, flops: float, bandwidth: float = 0.0) -> float:
    """Seconds of a forward pass without gradients over `rows` sequences of s.seq_len tokens, in micro-batches of
    s.batch items (the reference pass, KTO's KL sequences): the forward's share of a step's matmuls and per-layer
    costs, and QLoRA's dequantization once per micro-batch."""
    kind, tokens = _kind(s), rows * s.seq_len
    narrow = NARROW[kind] / shape.hidden
    matmul = 2 * shape.layers * shape.layer_params + 2 * shape.vocab * shape.hidden * s.trained_share
    attention = 2 * shape.layers * shape.heads * shape.head_dim * s.seq_len
    batches = max(1, -(-rows // max(int(s.batch) if s.batch != "auto" else 1, 1)))
    quantized = shape.layers * shape.layer_params if s.method == "qlora" else 0
    dequant = DEQUANT_BYTES[kind] * quantized * batches / (bandwidth or flops * BYTES_PER_FLOP)
    return (tokens / flops * (matmul * (FLOP_COST[kind, s.method] + narrow) + attention * FLOP_COST[kind, "attention"])
            + dequant + LAYER_SECONDS[kind, s.method] * shape.layers * batches)  # fmt: skip


def reference_seconds(shape: Shape, s: Setup, items: int, flops: float, bandwidth: float = 0.0) -> float:
    """The reference pass of a dpo or kto run over `items` pairs (KTO rows): each one's two sequences scored without
    gradients (a pair's chosen and rejected; a KTO row's answer and its KL sequence); 0 for the other objectives."""
    return forward_seconds(shape, s, 2 * items, flops, bandwidth) if s.objective in ("dpo", "kto") else 0.0


def tokens_per_s(shape: Shape, s: Setup, flops: float, bandwidth: float = 0.0) -> float:
    """Training tokens a second over all processes: each GPU process on its own GPU; CPU processes share the cores
    whose throughput `flops` measured, so more of them do not add speed."""
    per_process = s.batch * s.seq_len * s.grad_accum * sequences(s) / step_seconds(shape, s, flops, bandwidth)
    return per_process * (s.nproc if _kind(s) == "cuda" else 1)


def _kind(s: Setup) -> str:
    return "cpu" if s.device == "cpu" else "cuda"


def _largest_batch(shape: Shape, s: Setup, size: int) -> int:
    """The largest micro-batch (per process, a power of two) whose peak fits `size` bytes; 0 if not even one row."""
    best, batch = 0, 1
    while batch <= 4096 and sum(memory(shape, replace(s, batch=batch)).values()) <= size:
        best, batch = batch, batch * 2
    return best


def matmul_flops(device: str = "cpu", seconds: float = 0.3) -> float:
    """This device's matmul throughput, measured now (FLOP/s), in the dtype `train.precision: auto` computes in there
    (model.pick_dtype): fp32 on a CPU, bf16 on a GPU that has it natively, fp16 on one that does not (a T4)."""
    import torch

    from lorakit.model import pick_dtype  # imports transformers: so not at the top

    # On a GPU a 2048-square product lasts ~20 us, about what the sync after it costs: it measured half the peak.
    n, dtype = 2048 if device == "cpu" else 8192, pick_dtype("auto", device)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)

    def sync() -> None:
        if device != "cpu":
            torch.cuda.synchronize(device)

    a @ b  # warm-up: thread pool, kernels, caches
    sync()
    runs, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        runs += 1
        sync()
    return 2 * n**3 * runs / (time.perf_counter() - start)


def this_device(device: str, seconds: float = 0.3) -> tuple[int, float]:
    """(memory bytes, matmul FLOP/s) of this machine's `device`: a GPU's memory; on a CPU, the RAM this process
    may grow into (what is free now, plus what it holds: its libraries are the estimate's framework share)."""
    import psutil
    import torch

    if device == "cpu":
        memory_bytes = psutil.virtual_memory().available + psutil.Process().memory_info().rss
    else:
        memory_bytes = torch.cuda.get_device_properties(torch.device(device)).total_memory
    return memory_bytes, matmul_flops(device, seconds)


def here(device: str, nproc: int, seconds: float = 0.3) -> Device:
    """This machine's `device` as each of `nproc` processes of a run sees it: CPU processes share the RAM, each GPU
    process has a GPU of its own."""
    memory_bytes, flops = this_device(device, seconds=seconds)
    kind = "cpu" if device == "cpu" else "cuda"
    return Device(kind, memory_bytes // nproc if kind == "cpu" else memory_bytes, flops)


def setup_of(cfg: Any, device: str, nproc: int = 1) -> Setup:
    """The Setup of a run config (its micro-batch, length, adapter and optimizer) on `device`."""
    t, a = cfg.train, cfg.adapter
    share = 1.0 if cfg.data.train_on == "all" else 0.5
    return Setup(cfg.method, cfg.data.max_length, t.batch_size, a.r, a.target_modules, t.gradient_checkpointing,
                 nproc, t.strategy, t.optimizer, share, device, t.grad_accum, cfg.objective)  # fmt: skip


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
    this = here(device, nproc, seconds=0.05)
    setup = setup_of(cfg, this.kind, nproc)
    row = fit(shape, setup, this)
    if row["batch"] == 0:
        raise LorakitError(f"train.batch_size: auto: not even one row of {setup.seq_len} tokens fits this "
                           f"{device} ({this.memory_bytes / GIB:.1f} GiB); see `lorakit plan`")  # fmt: skip
    breakdown = memory(shape, replace(setup, batch=row["batch"]))
    line = (f"plan: peak ~{row['peak_bytes'] / GIB:.1f} GiB of {this.memory_bytes / GIB:.1f} GiB per process ("
            + ", ".join(f"{k} {v / GIB:.1f}" for k, v in breakdown.items() if v >= GIB / 20)
            + f"); ~{row['tokens_per_s']:.0f} tokens/s at batch {row['batch']}")  # fmt: skip
    if not row["fits"] and not force:
        raise LorakitError(
            f"{line}: it does not fit this {device}. {_levers(cfg, row['batch'])}, or pass --force to try anyway"
        )
    return row["batch"], line


def _levers(cfg: Any, batch: int) -> str:
    """What lowers a run's peak memory, leaving out what the run already does."""
    levers = ["Lower train.batch_size or data.max_length" if batch > 1 else "Lower data.max_length"]
    if not cfg.train.gradient_checkpointing:
        levers.append("turn on train.gradient_checkpointing")
    if cfg.method != "qlora":
        levers.append("use method qlora")
    return ", ".join(levers)


# Each of plan's options is the override of one config key: `--batch 8` is `train.batch_size=8`.
OPTION_KEYS = {"model": "model", "method": "method", "seq_len": "data.max_length", "batch": "train.batch_size",
               "r": "adapter.r", "strategy": "train.strategy"}  # fmt: skip
NO_DATA = "(none: lorakit plan --model)"  # data.train of a run --model describes: plan never reads data


def run_config(cfg: Any, opts: Any) -> Any:
    """The run to plan: the run config (its overrides already applied, as `lorakit train` applies them) with each
    option given set as its key, or the run --model and the options describe; validated as `lorakit train`
    validates a config, so that plan refuses what train refuses."""
    from lorakit import config

    if cfg is None and not opts.model:
        raise LorakitError("plan: give a run config (lorakit plan run.yaml [key.sub=value ...]) or a model "
                           "(--model ID|folder|config.json)")  # fmt: skip
    raw = cfg.model_dump(mode="json") if cfg is not None else {"data": {"train": NO_DATA}}
    given = [f"{key}={getattr(opts, name)}" for name, key in OPTION_KEYS.items() if getattr(opts, name) is not None]
    for item in given + (["train.gradient_checkpointing=true"] if opts.gradient_checkpointing else []):
        config.apply_override(raw, item)
    return config.validate(raw, source="plan (the run config with the options given)")


def plan(cfg: Any, opts: Any) -> tuple[Shape, Setup, Estimate]:
    """The estimate `lorakit plan` prints for a run config (None: the run --model describes) and its options:
    on this machine's device, as `lorakit train` would run it here (its auto batch, its processes' share of the RAM,
    its refusals), and on the common GPUs, also on a machine without one."""
    import torch

    from lorakit import model

    run = run_config(cfg, opts)
    # The device `lorakit train` would use here (model.pick_device decides auto for both), or --device: it leads
    # the estimate (the breakdown, the JSON's top level), being the first of its kind in `devices`.
    device = model.pick_device(opts.device, present=False)
    kind = "cpu" if device == "cpu" else "cuda"
    if kind == "cpu":  # without a GPU here, auto also lists the GPUs the run could go to
        devices = {"this CPU": here("cpu", opts.nproc), **(common_gpus() if opts.device == "auto" else {})}
    else:
        devices = {**({"this GPU": here(device, opts.nproc)} if torch.cuda.is_available() else {}), **common_gpus()}
    shape = load_shape(run.model)
    setup = setup_of(run, kind, opts.nproc)
    check_context(shape, setup.seq_len)
    est = estimate(shape, setup, devices)
    for name, row in est.fits.items():
        if (why := refusal(run, devices[name].kind, opts.nproc)) is not None:
            row.update(fits=False, refused=why)
            est.notes.append(f"{name}: {why}")
        if run.train.max_steps and row["tokens_per_s"] and row["batch"]:
            tokens = run.train.max_steps * row["batch"] * setup.grad_accum * opts.nproc * setup.seq_len
            row["run_s"] = round(tokens * sequences(setup) / row["tokens_per_s"], 1)
    if all(row["refused"] for row in est.fits.values()):
        raise LorakitError(next(iter(est.fits.values()))["refused"])
    if (note := _objective_note(setup, est)) is not None:
        est.notes.append(note)
    if not run.data.packing:
        est.notes.append(f"data.packing is off: the speed is for full rows of {setup.seq_len} tokens; shorter rows, "
                         "and each micro-batch's padding to its longest, give fewer tokens/s")  # fmt: skip
    return shape, setup, est


def _objective_note(setup: Setup, est: Estimate) -> str | None:
    """What a preference objective adds to the run: two sequences a pair, and the reference pass before step 1."""
    if setup.objective == "sft":
        return None
    first = next(iter(est.fits.items()), None)
    if setup.objective == "kto":
        line = (f"objective kto: the micro-batch is {est.batch} rows of up to {setup.seq_len} tokens, and each step "
                "also runs a forward without gradients over each row's KL sequence (in the speed)")  # fmt: skip
    else:
        line = (f"objective {setup.objective}: the micro-batch is {est.batch} pairs, each two sequences (chosen, "
                f"rejected) of up to {setup.seq_len} tokens, trained in one forward and backward; tokens/s counts "
                "both (where the attention runs the prompt they share once, sdpa or eager on a model that reads "
                "packed rows, a step costs less than counted here)")  # fmt: skip
    if setup.objective == "orpo":
        return line + "; no reference pass (ORPO needs none)"
    if first is None:
        return line
    name, row = first
    return (line + f"; before step 1 the reference pass scores every {'row' if setup.objective == 'kto' else 'pair'}"
            f" once without gradients: ~{row['reference_s_per_1000']:.0f} s per 1,000 on {name}, then never again "
            "(cached with the tokenized data)")  # fmt: skip


def check_context(shape: Shape, seq_len: int) -> None:
    """Refuse rows longer than the model's positions cover: its estimate would be of a run that cannot train."""
    if shape.context and seq_len > shape.context:
        raise LorakitError(
            f"plan: rows of {seq_len:,} tokens (data.max_length, --seq-len) are longer than {shape.name} reads: its "
            f"context is {shape.context:,} tokens (max_position_embeddings in its config). Plan at most "
            f"--seq-len {shape.context}"
        )


def refusal(cfg: Any, kind: str, nproc: int) -> str | None:
    """Why `lorakit train --nproc` refuses the run on a device of this kind (launch.check_strategy), or None."""
    if nproc == 1:  # a single process has nothing to shard: train never checks its strategy
        return None
    try:
        launch.check_strategy(cfg, kind == "cuda")
    except LorakitError as e:
        return str(e)
    return None


def table(shape: Shape, setup: Setup, est: Estimate) -> str:
    """The human table: the breakdown, then each device with whether it fits, at which micro-batch, its peak, its
    largest micro-batch, its speed (and the run's time where train.max_steps fixes it), then the notes."""
    precision = "bf16 on a GPU" if setup.device != "cpu" else "fp32 on this CPU"
    auto = f"auto (each device's largest that fits; the breakdown at {est.batch})"
    batch = setup.batch if setup.batch != "auto" else auto
    lines = [f"plan for {shape.name} ({shape.params / 1e9:.2f}B parameters): {setup.method}"
             + (f" r {setup.r}" if setup.method != "full" else "")
             + f", micro-batch {batch} x {setup.seq_len} tokens, {setup.nproc} process(es)"
             + (f" ({setup.strategy})" if setup.nproc > 1 else "")
             + f", checkpointing {'on' if setup.checkpointing else 'off'}; {precision}:"]  # fmt: skip
    # Columns as wide as their widest cell: a run of a million GiB stays aligned.
    parts = [(key.replace("_", " "), value / GIB, "GiB") for key, value in est.breakdown.items()]
    parts += [("peak", est.peak_bytes / GIB, "GiB per process"), ("FLOPs per token", est.flops_per_token / 1e9, "G")]
    cells = _columns([[f"  {name}", f"{value:.2f}"] for name, value, _ in parts])
    lines += [f"{line} {unit}" for line, (_, _, unit) in zip(cells, parts)]
    timed = any("run_s" in f for f in est.fits.values())
    header = ["device", "GiB", "fits", "batch", "peak GiB", "largest batch", "tokens/s"] + ["run time"] * timed
    rows = [[name, f"{f['memory_bytes'] / GIB:.1f}", "yes" if f["fits"] else "no", str(f["batch"]),
             f"{f['peak_bytes'] / GIB:.2f}", str(f["largest_batch"]), f"{f['tokens_per_s']:.0f}"]
            + ([f"{f['run_s'] / 60:.0f} m" if "run_s" in f else ""] if timed else [])
            for name, f in est.fits.items()]  # fmt: skip
    lines += _columns([header, *rows])
    lines += [f"note: {n}" for n in est.notes]
    return "\n".join(lines)


def _columns(rows: list[list[str]]) -> list[str]:
    """Rows of cells as lines: the first column left-aligned, the others right-aligned, each as wide as its widest
    cell, two spaces apart."""
    widths = [max(len(row[k]) for row in rows) for k in range(len(rows[0]))]
    return ["  ".join(cell.ljust(w) if k == 0 else cell.rjust(w) for k, (cell, w) in enumerate(zip(row, widths)))
            .rstrip() for row in rows]  # fmt: skip
