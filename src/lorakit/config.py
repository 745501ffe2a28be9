"""One YAML file = one run. `load(path, overrides)` validates everything before any work starts.

The key names `model`, `method`, `adapter.*`, `data.*`, `train.*` and `output_dir` are a contract with
outside checks: rename nothing here without a migration.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal, get_origin

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_serializer,
    model_validator,
)

from lorakit import files
from lorakit.errors import LorakitError

# The dtype names every key and option takes (train.precision, --dtype); model.DTYPES maps them to torch's.
Dtype = Literal["auto", "fp32", "bf16", "fp16"]

DEFAULT_MODEL = "smollm2-135m-instruct"
FORMATS = ("auto", "messages", "sharegpt", "alpaca", "prompt_completion", "text", "chat_text", "template")
# The formats of preference data (preference.py): any form of pairs, and unpaired good/bad rows (KTO).
PREFERENCE_FORMATS = ("preference", "kto")
OBJECTIVES = ("sft", "dpo", "orpo", "kto")


class KeyProblem(ValueError):
    """A model validator's error about one of its model's keys (`key`, dotted): the message is labelled with that key
    and its value, as a field validator's is, not as the whole model ("(top level)" and all its input)."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key


class _Strict(BaseModel):
    # Unknown keys are errors, never silently ignored: a typo must not train the wrong thing.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class AdapterConfig(_Strict):
    """LoRA adapter shape (ignored by `method: full`)."""

    r: int = Field(16, ge=1, le=4096, description="LoRA rank: size of the low-rank update.")
    alpha: float = Field(32, gt=0, description="LoRA scaling numerator; the update is scaled by alpha/r.")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA input during training.")
    target_modules: list[str] | str = Field(
        "all-linear",
        description="Module names to adapt (e.g. [q_proj, v_proj]) or 'all-linear' for every linear "
        "layer but the output head.",
    )
    use_rslora: bool = Field(False, description="Rank-stabilized LoRA: scale by alpha/sqrt(r).")
    use_dora: bool = Field(False, description="Weight-decomposed LoRA (DoRA).")
    modules_to_save: list[str] | None = Field(
        None, description="Modules trained in full and saved with the adapter (e.g. [lm_head])."
    )
    init: str | None = Field(
        None,
        description="Start from this adapter's weights instead of a new adapter: an adapter folder or a run folder "
        "of `lorakit train` (its adapter/), trained on this run's base (checked before training). Its own shape "
        "(rank, alpha, targets) is used. For dpo and kto it is also the reference model. lora and qlora only.",
    )

    @model_serializer(mode="wrap")
    def _without_unset_init(self, handler: Any) -> dict[str, Any]:
        # A run without adapter.init writes the config.yaml it wrote before the key existed, so older runs
        # still --resume (checkpoint compares the saved config with this one key by key).
        out = handler(self)
        if self.init is None:
            out.pop("init", None)
        return out


class TemplateConfig(_Strict):
    """Maps arbitrary columns to a chat with Python format strings, e.g. prompt: 'Rewrite: {toxic}'."""

    prompt: str = Field(..., description="User turn, a format string over the row's columns.")
    completion: str = Field(..., description="Assistant turn (the trained part), a format string.")
    system: str | None = Field(None, description="Optional system turn, a format string.")


class DataConfig(_Strict):
    """Where the examples come from and how they become token batches."""

    train: str = Field(
        ..., description="File (.json/.jsonl/.csv/.tsv/.parquet), folder of them, or a Hugging Face dataset id."
    )
    eval: str | float | None = Field(
        None, description="Held-out examples: a path/dataset id, or a fraction in (0, 1) of `train`."
    )
    format: Literal[FORMATS + PREFERENCE_FORMATS] = Field(  # type: ignore[valid-type]
        "auto",
        description="Row format; 'auto' detects it from the columns. For objective dpo/orpo: 'preference' (pairs "
        "in any form), for kto: 'kto' (prompt/completion/label or messages/label).",
    )
    template: TemplateConfig | None = Field(None, description="Column mapping for format 'template'.")
    split: str = Field("train", description="Split to read from a Hugging Face dataset id.")
    limit: int | None = Field(None, ge=1, description="Use only the first N rows (after shuffling off).")
    max_length: int = Field(1024, ge=8, description="Tokens per packed row; longer examples are truncated.")
    packing: bool = Field(
        True,
        description="Pack several examples into one row of up to max_length; off: one example a row. Either way a "
        "micro-batch trains as one padding-free row where the model's attention keeps examples apart (Bloom's pads).",
    )
    train_on: Literal["completions", "all"] = Field(
        "completions",
        description="'completions': only assistant turns (and their end token) are trained; 'all': every token.",
    )
    chat_template: str = Field(
        "auto",
        description="'auto' uses the tokenizer's template, else a fallback (chatml, alpaca, "
        "llama2, zephyr) that is also forced when named here.",
    )
    system_prompt: str | None = Field(None, description="System turn added to chats that have none.")
    cache_dir: str | None = Field(
        None,
        description="Tokenization cache (default $LORAKIT_HOME/tokenized, "
        "LORAKIT_HOME defaulting to ~/.cache/lorakit).",
    )
    num_proc: int | None = Field(
        None, ge=1, description="Tokenizer processes (default: 1 for small sets, all cores for large ones)."
    )
    seed: int = Field(0, description="Seed of the eval-fraction split.")

    @field_validator("eval")
    @classmethod
    def _eval_fraction(cls, v: str | float | None) -> str | float | None:
        if isinstance(v, float | int) and not isinstance(v, bool) and not 0 < v < 1:
            raise ValueError(
                f"an eval fraction must be between 0 and 1 (exclusive), got {v}; "
                "use e.g. 0.1 for 10% of the train rows, or a file path"
            )
        return v


class PreferenceConfig(_Strict):
    """Settings of the preference objectives (objective: dpo, orpo or kto); each key applies to some of them only."""

    beta: float = Field(
        0.1, gt=0, description="dpo, kto: temperature of the implicit reward (how far from the reference it may go)."
    )
    loss: Literal["sigmoid", "ipo"] = Field(
        "sigmoid", description="dpo: 'sigmoid' (the DPO paper's loss) or 'ipo' (squared, IPO paper)."
    )
    label_smoothing: float = Field(
        0.0, ge=0, lt=0.5, description="dpo with loss sigmoid: the share of pairs assumed mislabelled (cDPO)."
    )
    orpo_lambda: float = Field(0.1, gt=0, description="orpo: weight of the odds-ratio term beside the answers' NLL.")
    desirable_weight: float = Field(1.0, gt=0, description="kto: loss weight of the rows labelled true.")
    undesirable_weight: float = Field(1.0, gt=0, description="kto: loss weight of the rows labelled false.")
    max_prompt_length: int | None = Field(
        None,
        ge=1,
        description="Tokens a prompt keeps at least when prompt + answer exceed data.max_length: the answers lose "
        "their end only as far as needed to leave the prompt this many (or all of a shorter one), then the prompt "
        "loses its start (its end is kept). Default: half of data.max_length.",
    )


# Which preference keys each objective reads; the others must stay at their defaults.
PREFERENCE_KEYS = {
    "dpo": {"beta", "loss", "label_smoothing", "max_prompt_length"},
    "orpo": {"orpo_lambda", "max_prompt_length"},
    "kto": {"beta", "desirable_weight", "undesirable_weight", "max_prompt_length"},
}


class TrainConfig(_Strict):
    """The optimization loop."""

    max_steps: int | None = Field(None, ge=1, description="Optimizer steps; overrides `epochs` when set.")
    epochs: float = Field(
        1.0, gt=0, description="Passes over the training set (when neither max_steps nor time_budget is set)."
    )
    time_budget: float | None = Field(
        None,
        description="Train for this long, setup, evaluation and saving included: a duration such as 90s, 20m, 1h or "
        "1h30m (a number alone is seconds; the config holds seconds). The run then sets its own number of steps, "
        "and so of epochs (fractional or several), from the speed it measures over its first steps, with its "
        "learning-rate schedule (warmup and decay) fitted to that length; `epochs` is unused and `max_steps` may "
        "not be set with it. A resumed run finishes the steps its checkpoint planned.",
    )

    @field_validator("time_budget", mode="before")
    @classmethod
    def _duration(cls, v: Any) -> Any:
        # Seconds in the config and its config.yaml, so that a resume compares "1h" and "60m" as the same budget.
        if v is None:
            return v
        if isinstance(v, bool):
            raise ValueError("must be a duration such as 90s, 20m, 1h or 1h30m, not true or false")
        text = str(v).replace(" ", "").lower()
        if isinstance(v, int | float) or re.fullmatch(r"\d+(\.\d+)?", text):
            seconds = float(v)
        else:
            number = r"(\d+(?:\.\d+)?)"
            parts = re.fullmatch(rf"(?:{number}h)?(?:{number}m)?(?:{number}s)?", text)
            if parts is None or not any(parts.groups()):
                raise ValueError("must be a duration such as 90s, 20m, 1h or 1h30m (a number alone is seconds)")
            h, m, s = (float(x or 0) for x in parts.groups())
            seconds = 3600 * h + 60 * m + s
        if not seconds > 0:
            raise ValueError("must be a positive duration such as 90s, 20m, 1h or 1h30m")
        return seconds

    @field_validator("time_budget")
    @classmethod
    def _one_length(cls, v: float | None, info: ValidationInfo) -> float | None:
        if v is not None and info.data.get("max_steps") is not None:
            raise ValueError(
                "time_budget and max_steps both set the run's length: set one of them (time_budget plans the "
                "steps itself; remove max_steps, or time_budget to train a fixed number of steps)"
            )
        return v

    batch_size: int | Literal["auto"] = Field(
        4,
        description="Rows per forward pass (packed rows when packing), 1 to 4096; 'auto': the largest that "
        "`lorakit plan` predicts fits this device (at most 64).",
    )

    @field_validator("batch_size", mode="before")
    @classmethod
    def _batch_range(cls, v: Any) -> int | str:
        # One message for any wrong value, not one per member of the int-or-"auto" union.
        if v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 4096):
            return v
        raise ValueError("must be a whole number from 1 to 4096, or auto")

    grad_accum: int = Field(1, ge=1, description="Forward passes per optimizer step.")
    lr: float = Field(2e-4, gt=0, lt=1, description="Peak learning rate.")
    seed: int = Field(42, description="Seed for weights init, dropout and data order.")
    warmup_steps: int = Field(0, ge=0, description="Linear warmup steps.")
    scheduler: Literal["cosine", "linear", "constant"] = Field("cosine", description="LR schedule after warmup.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Gradient clipping norm (null: off).")
    optimizer: Literal["adamw", "adamw_8bit", "paged_adamw_8bit"] = Field(
        "adamw", description="AdamW (fused where the device has it) or bitsandbytes 8-bit variants."
    )
    precision: Dtype = Field(
        "auto",
        description="'auto': fp32 on CPU, bf16 on GPUs with native bf16 (compute capability 8.0+: A100, A10, L4, "
        "H100), else fp16 with loss scaling (T4, V100).",
    )
    gradient_checkpointing: bool = Field(False, description="Recompute activations to save memory.")
    kernels: Literal["auto", "liger", "none"] = Field(
        "auto",
        description="Fused GPU kernels: 'auto' patches Liger-Kernel's RMSNorm, RoPE and SwiGLU (GeGLU for Gemma) "
        "into every architecture the installed liger-kernel has them for (llama, mistral, mixtral, qwen2/3, phi3, "
        "gemma 1-3...) on CUDA when it is installed (pip install 'lorakit[gpu]'), else nothing, saying why; "
        "'liger' requires them (an error where they cannot run); 'none' never.",
    )
    strategy: Literal["auto", "ddp", "fsdp"] = Field(
        "auto",
        description="How several processes (--nproc, torchrun) share a run: 'ddp' (each holds the whole model) "
        "or 'fsdp' (weights, gradients and optimizer states sharded, for a model that does not fit one device; "
        "lora and full); 'auto' is ddp.",
    )
    eval_every: int | None = Field(None, ge=1, description="Eval loss every N steps (and always at the end).")
    keep_best: Literal["eval_loss"] | None = Field(
        None,
        description="Publish the best evaluation instead of the last step: with 'eval_loss' (the one criterion "
        "accepted) the run's adapter/ (model/ for full) holds the weights of the step whose eval loss was lowest, "
        "and summary.json and the model card name that step and its loss. Needs data.eval and eval_every. The last "
        "step is then always checkpointed, so --resume continues from the last weights, not the best; the best "
        "is kept on disk as it happens (checkpoints/best), full fine-tuning included.",
    )

    @field_validator("keep_best")
    @classmethod
    def _best_of_several(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v is not None and "eval_every" in info.data and info.data["eval_every"] is None:
            raise ValueError(
                "keep_best picks among the run's evaluations, and without eval_every there is one, at the end: "
                "set train.eval_every (e.g. 50)"
            )
        return v

    save_every: int | None = Field(None, ge=1, description="Checkpoint every N steps.")
    keep_checkpoints: int = Field(2, ge=1, description="How many newest checkpoints to keep.")
    log_every: int = Field(1, ge=1, description="Write metrics every N steps.")


class RunConfig(_Strict):
    """One complete run: base model, method, data, training and where results go."""

    model: str = Field(
        DEFAULT_MODEL, description=f"Hugging Face id, local folder, .gguf file, or the alias '{DEFAULT_MODEL}'."
    )
    method: Literal["lora", "qlora", "full"] = Field("lora", description="lora, qlora (4-bit base) or full.")
    objective: Literal[OBJECTIVES] = Field(  # type: ignore[valid-type]
        "sft",
        description="What training optimizes: 'sft' (next-token loss on the answers), 'dpo' or 'orpo' (pairs of a "
        "chosen and a rejected answer), 'kto' (answers labelled good or bad). Settings in `preference:`.",
    )
    preference: PreferenceConfig | None = Field(
        None, description="Settings of objective dpo, orpo or kto (defaults filled in for those; unset for sft)."
    )
    adapter: AdapterConfig = Field(default_factory=AdapterConfig)
    data: DataConfig
    train: TrainConfig = Field(default_factory=TrainConfig)
    output_dir: str = Field("runs/latest", description="Run folder: adapter, checkpoints, metrics.")
    track: list[Literal["tensorboard", "wandb", "mlflow", "trackio"]] = Field(
        default_factory=list, description="Experiment trackers (through accelerate), besides metrics.jsonl."
    )
    trust_remote_code: bool = Field(False, description="Run a hub model's own Python code (off by default).")

    @model_validator(mode="before")
    @classmethod
    def _preference_defaults(cls, raw: Any) -> Any:
        # A preference run always has its settings (the training code reads cfg.preference.beta...), written out in
        # its config.yaml; an sft run has none.
        if isinstance(raw, dict) and raw.get("objective") in PREFERENCE_KEYS and raw.get("preference") is None:
            return {**raw, "preference": {}}
        return raw

    @model_serializer(mode="wrap")
    def _sft_as_before(self, handler: Any) -> dict[str, Any]:
        # An sft run writes the config.yaml it wrote before objectives existed: older runs still --resume.
        out = handler(self)
        if self.objective == "sft":
            out.pop("objective", None)
            out.pop("preference", None)
        return out

    @model_validator(mode="after")
    def _preference_fits_objective(self) -> RunConfig:
        if self.objective == "sft":
            if self.preference is not None:
                raise KeyProblem(
                    "preference",
                    "these settings are for preference training; set objective: dpo, orpo or kto, or remove "
                    "the preference: block",
                )
            if self.data.format in PREFERENCE_FORMATS:
                raise KeyProblem(
                    "data.format",
                    f"{self.data.format} data trains with a preference objective: set objective: "
                    f"{'kto' if self.data.format == 'kto' else 'dpo or orpo'}, or pick an sft format",
                )
            return self
        assert self.preference is not None  # _preference_defaults
        default = PreferenceConfig()
        for key in PreferenceConfig.model_fields.keys() - PREFERENCE_KEYS[self.objective]:
            if getattr(self.preference, key) != getattr(default, key):
                users = sorted(o for o, keys in PREFERENCE_KEYS.items() if key in keys)
                raise KeyProblem(
                    f"preference.{key}",
                    f"applies to objective {' and '.join(users)}, not {self.objective}: remove it (or set "
                    f"objective: {' or '.join(users)})",
                )
        if self.preference.label_smoothing and self.preference.loss != "sigmoid":
            raise KeyProblem(
                "preference.label_smoothing",
                f"applies to loss: sigmoid, not {self.preference.loss}: remove it, or set preference.loss: sigmoid",
            )
        prompt = self.preference.max_prompt_length
        if prompt is not None and prompt >= self.data.max_length:
            raise KeyProblem(
                "preference.max_prompt_length",
                f"must be below data.max_length ({self.data.max_length}), which holds the prompt and the answer: "
                "lower it, or raise data.max_length",
            )
        return self

    @model_validator(mode="after")
    def _preference_data(self) -> RunConfig:
        if self.objective == "sft":
            return self
        wanted = "kto" if self.objective == "kto" else "preference"
        if self.data.format not in ("auto", wanted):
            raise KeyProblem(
                "data.format",
                f"objective {self.objective} reads {'rows labelled good or bad' if wanted == 'kto' else 'pairs'}: "
                f"use auto (detected from the columns) or {wanted}",
            )
        if self.data.train_on != "completions":
            raise KeyProblem(
                "data.train_on",
                f"objective {self.objective} compares the answers only; remove data.train_on (or set completions)",
            )
        return self

    @model_validator(mode="after")
    def _init_fits_method(self) -> RunConfig:
        if self.adapter.init is not None and self.method == "full":
            raise KeyProblem(
                "adapter.init",
                "full fine-tuning trains the model itself, not an adapter: merge the adapter into its base first "
                "(lorakit merge ADAPTER OUT) and set model: OUT, or use method lora or qlora",
            )
        return self

    @model_validator(mode="after")
    def _strategy_fits_method(self) -> RunConfig:
        if self.train.strategy == "fsdp" and self.method == "qlora":
            raise KeyProblem(
                "train.strategy",
                "fsdp shards 16/32-bit weights, not QLoRA's 4-bit ones; use ddp for qlora (its 4-bit base fits one "
                "device), or method lora or full with fsdp",
            )
        return self

    @model_validator(mode="after")
    def _best_needs_eval(self) -> RunConfig:
        if self.train.keep_best and self.data.eval is None:
            raise KeyProblem(
                "train.keep_best",
                f"{self.train.keep_best} is measured on held-out data and there is none: set data.eval (a file, or "
                "a fraction such as 0.1 of the train rows), or remove train.keep_best",
            )
        return self


def load(path: str | Path, overrides: list[str] | tuple[str, ...] = (), local: bool = False) -> RunConfig:
    """Read a YAML run file, apply `key.sub=value` overrides and validate.

    A file may hold a `local:` block of keys: the same recipe shrunk to run offline on a CPU (the built-in
    model, data from ../shared/data, fewer steps). `local` applies it, before the overrides.
    Relative paths (data, model, output_dir) are taken from the current directory, as in the shell.
    """
    path = Path(path)
    if not path.is_file():
        raise LorakitError(
            f"config file not found: {path}. Give the path of a YAML run file (see configs/ for examples)."
        )
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise LorakitError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise LorakitError(
            f"{path}: the top level must be a mapping of keys (model, data, train, ...), got {type(raw).__name__}"
        )
    twin = raw.pop("local", None)
    if local:
        if not isinstance(twin, dict):
            raise LorakitError(
                f"{path}: --local needs a `local:` block of keys in the file (the recipe's CPU "
                "twin: model, data, train...); this file has none"
            )
        raw = merged(raw, twin)
    for item in overrides:
        apply_override(raw, item)
    return validate(raw, source=f"{path} (with its local: block)" if local else str(path))


def merged(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """`base` with the keys of `over` set in it, section by section (a value, list or null replaces)."""
    out = dict(base)
    for key, value in over.items():
        out[key] = merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def validate(raw: dict[str, Any], source: str = "config") -> RunConfig:
    """Validate a plain dict into a RunConfig; errors name each key's dotted path."""
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as e:
        raise LorakitError(format_validation_error(e, source)) from None


def format_validation_error(e: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid config ({e.error_count()} problem{'s' if e.error_count() > 1 else ''}):"]
    for err in e.errors():
        loc, value = err["loc"], err.get("input")
        problem = err.get("ctx", {}).get("error")
        if isinstance(problem, KeyProblem):  # a model validator's: its input is the model's, the key one of its own
            parts = tuple(problem.key.split("."))
            loc, value = loc + parts, _value_at(value, parts)
        key = ".".join(str(p) for p in loc) or "(top level)"
        if err["type"] == "extra_forbidden":
            parent = _model_at(loc[:-1])
            known = ", ".join(parent.model_fields) if parent else ""
            lines.append(f"  {key}: unknown key. Known keys here: {known}")
        elif err["type"] == "missing":
            lines.append(f"  {key}: required key is missing")
        else:
            msg = err["msg"].removeprefix("Value error, ")
            got = f" (got {json.dumps(value, default=str)[:80]})" if loc else ""  # not the whole config
            lines.append(f"  {key}: {msg}{got}")
    return "\n".join(lines)


def _value_at(raw: Any, parts: tuple[str, ...]) -> Any:
    """The value at dotted `parts` in a raw config dict (None where it is not given)."""
    for part in parts:
        raw = raw.get(part) if isinstance(raw, dict) else None
    return raw


def _model_at(loc: tuple) -> type[BaseModel] | None:
    model: type[BaseModel] = RunConfig
    for part in loc:
        field = model.model_fields.get(str(part))
        ann = getattr(field, "annotation", None)
        candidates = [ann, *getattr(ann, "__args__", ())]
        nxt = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if nxt is None:
            return None
        model = nxt
    return model


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Set `a.b.c=value` in a nested dict; the value is parsed as YAML (so 20 is an int, x.jsonl a str)."""
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise LorakitError(f"override '{item}' is not of the form key.sub=value (e.g. train.max_steps=20)")
    parts = key.strip().split(".")
    node = raw
    for part in parts[:-1]:
        nxt = node.setdefault(part, {})
        if not isinstance(nxt, dict):
            raise LorakitError(f"override '{item}': '{part}' is a value, not a section")
        node = nxt
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError:
        parsed = value
    # YAML reads `{a}` as a mapping and `[x]` as a list; for a key that holds text (a template, a path)
    # the user meant the text itself.
    if isinstance(parsed, dict | list) and _text_only(tuple(parts)):
        parsed = value
    node[parts[-1]] = parsed


def _text_only(loc: tuple) -> bool:
    """Whether the key at `loc` takes neither a mapping, a list nor a section (e.g. data.template.prompt)."""
    parent = _model_at(loc[:-1])
    field = parent.model_fields.get(str(loc[-1])) if parent else None
    if field is None:
        return False
    kinds = [field.annotation, *getattr(field.annotation, "__args__", ())]
    return not any(
        get_origin(k) in (list, dict) or (isinstance(k, type) and issubclass(k, BaseModel | list | dict)) for k in kinds
    )


def dump(cfg: RunConfig, path: str | Path) -> None:
    """Write the resolved config (what actually ran) as YAML beside a stage's outputs."""
    files.write_text(path, yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
