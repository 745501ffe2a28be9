"""What an adapter is: made (a loaded base made trainable by the run's method: LoRA/QLoRA through peft, or in
full), loaded, and described (its own peft config, the run and method it came from, the base it belongs to).
Where its files lie is run_folder.py's."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftConfig, PeftModel, PeftType, get_peft_model

from lorakit import dropout
from lorakit.config import RunConfig
from lorakit.errors import LorakitError
from lorakit.model import base_from_adapter, linear_module_names, same_base_names
from lorakit.run_folder import ADAPTER_CONFIG, Found, adapter_source, locate


def attach(model: Any, cfg: RunConfig) -> Any:
    """Return the model to train: a peft `PeftModel` for lora/qlora, the model itself for full.

    Dtypes: the base keeps the dtype it was loaded in (train.build_model: the run's compute dtype; fp32 masters
    for full), 4-bit weights stay 4-bit, and a QLoRA run's trained weights take `qlora_dtype`. Under fp16 every
    trained weight is fp32 (LoRA A/B, DoRA magnitudes, modules_to_save; full's masters), as the loss scaler needs.
    """
    if cfg.train.gradient_checkpointing:
        # Non-reentrant checkpointing computes the gradients of the weights inside a checkpointed layer even when
        # the layer's input needs none, so frozen embeddings (LoRA, QLoRA) need no enable_input_require_grads
        # (tests/unit/test_dtype_policy.py compares the gradients; transformers 5 hooks the embeddings anyway).
        # transformers 5 renamed it (the old name warns, and goes in v6).
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    # QLoRA without peft's prepare_model_for_kbit_training: it upcasts every weight that is not 4-bit (embeddings,
    # norms, lm_head) to fp32. Llama's RMSNorm then returns fp32, so the residual stream and every checkpointed
    # input are fp32, and the frozen fp32 head is cast back to 16 bits in every loss chunk: a 7B QLoRA run took
    # 1.36x TRL's memory at 0.46x its speed on an H200 (issue 23). The rest of what it does is done anyway:
    # get_peft_model freezes the base, checkpointing is set above, and its input-gradient hook is for reentrant
    # checkpointing only.
    net = _start_from(model, cfg) if cfg.adapter.init is not None else _new_adapter(model, cfg)
    if cfg.method == "qlora":
        train_in(net, qlora_dtype(model.dtype, model.device))
    elif model.dtype == torch.float16:
        # fp32 master weights under fp16, where the loss scaler unscales fp32 gradients only ("Attempting to unscale
        # FP16 gradients"): peft makes LoRA's A/B fp32 but copies modules_to_save in the base's fp16.
        train_in(net, torch.float32)
    dropout.use_on(net)  # the same dropout, sampled ~3x faster on the CPU
    return net


def _start_from(model: Any, cfg: RunConfig) -> Any:
    """adapter.init: the adapter it names, trainable, with its own shape (rank, alpha, targets); peft keeps its
    weights in fp32 as it does a new adapter's."""
    folder = init_adapter(cfg.adapter.init, cfg.model)
    return PeftModel.from_pretrained(model, str(folder), is_trainable=True)


def _new_adapter(model: Any, cfg: RunConfig) -> Any:
    check_targets(model, cfg.adapter.target_modules)
    a = cfg.adapter
    # peft reads a lone string as a regex of full module paths; lorakit means a module name, as in a list.
    targets = (
        [a.target_modules]
        if isinstance(a.target_modules, str) and a.target_modules != "all-linear"
        else a.target_modules
    )
    lora = LoraConfig(
        r=a.r,
        lora_alpha=a.alpha,
        lora_dropout=a.dropout,
        target_modules=targets,
        use_rslora=a.use_rslora,
        use_dora=a.use_dora,
        modules_to_save=a.modules_to_save,
        bias="none",
        task_type="CAUSAL_LM",
    )
    try:
        # peft makes the LoRA weights fp32 whatever the base's dtype (autocast_adapter_dtype): plain LoRA keeps
        # them so, as TRL does; autocast runs their matmuls in 16 bits on a GPU.
        net = get_peft_model(model, lora)
    except ValueError as e:  # peft's own check, e.g. a module type LoRA cannot wrap
        raise LorakitError(
            f"adapter: peft refused the LoRA config: {e}. Linear modules in this model: "
            f"{', '.join(linear_module_names(model))}"
        ) from None
    return net


def qlora_dtype(compute: torch.dtype, device: str | torch.device) -> torch.dtype:
    """The dtype a QLoRA run's trained weights (LoRA A/B, DoRA magnitudes, modules_to_save) live in.

    compute: the model's dtype, that of its weights that are not 4-bit (train.build_model loads it in the run's
    compute dtype, the 4-bit matmuls' too). bf16 where that is bf16 on a GPU, as in the QLoRA paper and TRL: on a
    7B run fp32 ones took 616 MiB more and slowed every step (issue 23, an H200); the optimizer then updates
    bf16 weights (and AdamW keeps bf16 moments; paged_adamw_8bit its 8-bit ones). fp32 otherwise: on the CPU
    (fp32 throughout by default, as before), and under fp16 (GPUs without bf16), where accelerate's loss scaler
    must unscale fp32 gradients (torch refuses "Attempting to unscale FP16 gradients"): fp32 master weights.
    """
    if compute == torch.bfloat16 and torch.device(device).type == "cuda":
        return torch.bfloat16
    return torch.float32


def train_in(net: Any, dtype: torch.dtype) -> None:
    """Cast the parameters `net` trains to `dtype`; the frozen ones stay as they are."""
    for p in net.parameters():
        if p.requires_grad and p.dtype != dtype:
            p.data = p.data.to(dtype)


def check_targets(model: Any, targets: list[str] | str) -> None:
    """Fail before training when a target module name matches nothing, listing the valid names."""
    if isinstance(targets, str):
        if targets == "all-linear":
            return
        targets = [targets]
    names = {n.split(".")[-1] for n, _ in model.named_modules()}
    full = [n for n, _ in model.named_modules()]
    unknown = [t for t in targets if t not in names and not any(n.endswith("." + t) or n == t for n in full)]
    if unknown:
        raise LorakitError(
            f"adapter.target_modules: {unknown} match no module of this model. Its linear "
            f"modules are: {', '.join(linear_module_names(model))} (or use 'all-linear')."
        )


def trainable_state(model: Any, weights: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The parameters being trained, by name: what a checkpoint must hold to resume.

    weights: the model's whole state dict where its parameters are shards (FSDP); default: the parameters.
    """
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    source = weights if weights is not None else dict(model.named_parameters())
    return {n: source[n].detach().cpu().clone() for n in trained}


def count_params(model: Any) -> tuple[int, int]:
    """(trainable, total) parameter counts; 4-bit weights count as their logical size."""
    trainable = total = 0
    for p in model.parameters():
        n = p.numel() * (2 if p.dtype == torch.uint8 else 1)  # bnb packs two 4-bit values per byte
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total


def is_peft(model: Any) -> bool:
    return isinstance(model, PeftModel)


def peft_name(name: str) -> str:
    """The name an adapter takes inside peft, which names modules after it (no "."): a public name like
    llama-3.2-finetome or sql-v1.5 stays the user's everywhere else."""
    return re.sub(r"[^A-Za-z0-9_@-]", "_", name)


def load(net: Any, path: str | Path, name: str = "default") -> PeftModel:
    """Attach the saved adapter at `path` to `net` (a base model, or a PeftModel holding others) as `name`, for
    inference. If that fails, the model is left exactly as it was: a server goes on serving it.

    An adapter of another model's shapes is one message: --force skips the check of the base's name,
    not the laws of matrix multiplication.
    """
    name = peft_name(name)
    try:
        if isinstance(net, PeftModel):
            try:
                net.load_adapter(str(path), adapter_name=name)
            except BaseException:
                if name in net.peft_config:  # the layers were added before the weights failed
                    remove(net, name)
                raise
            return net
        # As PeftModel.from_pretrained, in two steps, so that a failure can take the new layers out again.
        cfg = PeftConfig.from_pretrained(str(path))
        cfg.inference_mode = True
        wrapped = PeftModel(net, cfg, adapter_name=name)
        try:
            wrapped.load_adapter(str(path), adapter_name=name)
        except BaseException:
            wrapped.unload()
            raise
        return wrapped
    except RuntimeError as e:  # torch's load_state_dict: "size mismatch for ...lora_A...: copying a param ..."
        lines = str(e).splitlines() or [type(e).__name__]
        first = next((line.strip() for line in lines if "size mismatch" in line), lines[0])
        raise LorakitError(
            f"{path}: the adapter does not fit this base model ({first}). It was trained on a model "
            "of other shapes: use that base model."
        ) from None


def remove(net: PeftModel, name: str) -> Any:
    """Take adapter `name` out of `net`; returns the model to use: the base itself when it was the last one
    (peft cannot run a PeftModel left with no adapter, so its LoRA layers are taken out instead)."""
    if len(net.peft_config) == 1:
        return net.unload()
    net.delete_adapter(name)
    if net.active_adapter not in net.peft_config:
        # peft leaves a deleted active adapter named active, and then every forward fails.
        net.set_adapter(next(iter(net.peft_config)), inference_mode=True)
    return net


# ---- what an adapter says about itself, and the base it belongs to ----
def trained_with(path: str | Path) -> str | None:
    """The method ("lora", "qlora") of the `lorakit train` run an adapter folder came from; None outside a run."""
    found = locate(path)
    cfg = found.run_config() if found is not None else None
    return cfg.method if cfg is not None else None


def base_mismatch(name: str, path: str | Path, quantization: str | None) -> str | None:
    """Why adapter `name` (at `path`) would not answer as trained on a base loaded as `quantization`, or None."""
    if quantization == "4bit" or trained_with(path) != "qlora":
        return None
    # Measured on SmolLM2: a QLoRA adapter on the unquantized base moves logits by up to 20 (of 39) against the
    # 4-bit model it was trained on; top-1 tokens agree only 64% of the time.
    return (
        f"adapter {name} was trained with QLoRA on the 4-bit base, but the base here is "
        f"{'8-bit' if quantization == '8bit' else 'unquantized'}, where it answers differently. Load the base with "
        "--base-precision 4bit (beside other QLoRA adapters only), or merge it (lorakit merge) and use the merged model"
    )


def read_adapter(folder: str | Path) -> PeftConfig:
    """The adapter's own config as peft reads it (a `LoraConfig` for LoRA): rank, targets, base model…"""
    try:
        return PeftConfig.from_pretrained(str(folder))
    except (ValueError, KeyError, TypeError) as e:  # malformed JSON, an unknown peft_type, a wrong field type
        raise LorakitError(
            f"{Path(folder) / ADAPTER_CONFIG}: not a peft adapter config peft can read "
            f"({type(e).__name__}: {e}); save the adapter again with peft's save_pretrained"
        ) from None


def check_base(
    adapter: Any,
    base: str,
    *,
    force: bool,
    where: str | Path,
    fix: str = "Use the matching base model, or --force if they are the same weights under another name.",
) -> None:
    """Refuse an adapter trained on another base: its weights would be meaningless on this one.

    `adapter` is its `PeftConfig`. The bases match when the adapter's `base_model_name_or_path` is the
    name given, the folder that name resolves to (the built-in alias, a local folder), or for the alias
    its hub id (model.same_base_names). An adapter
    that names no base is accepted; `force` accepts any (the same weights under another name). `fix`: what the
    message tells the user to do.
    """
    declared = getattr(adapter, "base_model_name_or_path", None)
    if not declared or force:
        return
    same = same_base_names(base)
    on_disk = {Path(s).resolve() for s in same if Path(s).exists()}
    if declared not in same and Path(declared).resolve() not in on_disk:
        raise LorakitError(
            f"{where} was trained on '{declared}', not on the base '{base}'; its answers would be "
            f"meaningless on another base. {fix}"
        )


def init_adapter(path: str | Path, base: str) -> Path:
    """The adapter folder that `adapter.init: path` starts a run from (an adapter folder, or a run folder holding
    adapter/), checked to be a LoRA adapter trained on `base` (the run's model); LorakitError saying why not."""
    found = adapter_source(path)
    where = f"adapter.init: {path}"
    declared = read_adapter(found.path)
    if declared.peft_type != PeftType.LORA:
        raise LorakitError(
            f"{where} is a {getattr(declared.peft_type, 'value', declared.peft_type)} adapter; lorakit trains LoRA "
            "adapters only: start from a LoRA adapter, or remove adapter.init to train a new one"
        )
    # A run folder's own config names its base even where the adapter's config does not.
    run = found.run_config()
    if run is not None and not declared.base_model_name_or_path:
        declared.base_model_name_or_path = run.model
    check_base(
        declared,
        base,
        force=False,
        where=where,
        fix="Set model: to the base it was trained on, or adapter.init to an adapter trained on this base.",
    )
    return found.path


def base_of(found: Found, base: str | None = None) -> str:
    """The base model an adapter belongs to: `base` when the user names one, else the model of the run it came
    from, else the base its adapter_config.json names (the alias for the alias's hub id when only the alias is
    on this machine: model.base_from_adapter)."""
    if base:
        return base
    cfg = found.run_config()
    if cfg is not None:
        return cfg.model
    declared = read_adapter(found.path).base_model_name_or_path
    if not declared:
        raise LorakitError(f"{found.path}: the adapter does not name its base model; pass --base MODEL")
    return base_from_adapter(declared)
