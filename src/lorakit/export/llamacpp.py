"""llama.cpp itself: its converter and quantizer write the GGUF, its runtime loads it for the proof.

One pin owns all three: the llama-cpp-python release in the `gguf` extra. Its PyPI source package
vendors the llama.cpp tree it builds from, so the converter (convert_hf_to_gguf.py with its
`conversion` and `gguf-py` packages) is taken from that same source package: the file is written by
the llama.cpp version that then loads it. The sources are unpacked once under $LORAKIT_HOME/llama.cpp;
$LORAKIT_LLAMA_CPP points at a llama.cpp checkout instead (offline machines).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from lorakit import files
from lorakit.errors import LorakitError

PACKAGE = "llama-cpp-python"
INSTALL = "pip install 'lorakit[gguf]' (it builds llama.cpp from source: a C++ compiler and cmake are needed)"
# What the converter needs from the vendored tree; the rest (C++ sources, tests) stays out of the cache.
KEEP = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/", "LICENSE")
# Converter output types; q4_k_m has no converter type, so it is quantized from an f32 file by llama.cpp.
CONVERTER_TYPES = ("f32", "f16", "bf16", "q8_0")
QUANTIZED = {"q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M"}

# Runs the converter in its own interpreter (it puts its own gguf-py first on sys.path). The only change is
# the pre-tokenizer name: the user's --pre wins; a tokenizer whose hash the converter does not know (any
# tokenizer trained locally) gets lorakit's guess instead of an error. The proof in llama.cpp then checks
# that the file tokenizes every prompt as the model does.
RUNNER = r"""
import sys
src, override, fallback = sys.argv[1:4]
sys.path[:0] = [src, src + "/gguf-py"]
from conversion import base
known = base.TextModel.get_vocab_base_pre
def get_vocab_base_pre(self, tokenizer):
    if override:
        return override
    try:
        return known(self, tokenizer)
    except NotImplementedError:
        if not fallback:
            raise
        print(f"lorakit: pre-tokenizer not in llama.cpp's list; using {fallback!r}", file=sys.stderr)
        return fallback
base.TextModel.get_vocab_base_pre = get_vocab_base_pre
import convert_hf_to_gguf
sys.argv = ["convert_hf_to_gguf.py", *sys.argv[4:]]
convert_hf_to_gguf.main()
"""


def version() -> str:
    """The installed llama-cpp-python release; the converter is taken from the same one."""
    try:
        return importlib.metadata.version(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise LorakitError(f"GGUF export runs llama.cpp, which is not installed: {INSTALL}") from None


def sources() -> Path:
    """A folder holding convert_hf_to_gguf.py, conversion/ and gguf-py/ of the installed llama.cpp."""
    env = os.environ.get("LORAKIT_LLAMA_CPP")
    if env:
        folder = Path(env).expanduser()
        if not (folder / "convert_hf_to_gguf.py").is_file():
            raise LorakitError(
                f"LORAKIT_LLAMA_CPP={env}: no convert_hf_to_gguf.py there; point it at a llama.cpp checkout"
            )
        return folder
    from lorakit.model import lorakit_home

    v = version()
    folder = lorakit_home() / "llama.cpp" / f"{PACKAGE}-{v}"
    # Unpacked once, whole or not at all; two exports starting at once keep the first finished copy.
    with files.write_once(folder, "convert_hf_to_gguf.py") as unpacked:
        if unpacked is not None:
            _unpack(v, unpacked)
    return folder


def _unpack(v: str, into: Path) -> None:
    """The converter's files of llama-cpp-python `v`'s source package (pip download, then only those) into `into`."""
    with tempfile.TemporaryDirectory(dir=into.parent, prefix=".fetch-") as tmp:
        got = subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:", f"{PACKAGE}=={v}",
             "-d", tmp],
            capture_output=True, text=True,
        )  # fmt: skip
        archives = list(Path(tmp).glob("*.tar.gz"))
        if got.returncode != 0 or not archives:
            raise LorakitError(
                f"GGUF export needs llama.cpp's converter from the {PACKAGE}=={v} source package, and pip could not "
                f"download it ({(got.stderr.strip().splitlines() or ['no archive'])[-1]}). Fix: run this once with "
                f"network access, or set LORAKIT_LLAMA_CPP to the llama.cpp checkout that {PACKAGE} {v} vendors"
            )
        with tarfile.open(archives[0]) as tar:
            prefix = f"{tar.getnames()[0].split('/')[0]}/vendor/llama.cpp/"
            members = [m for m in tar.getmembers() if m.name.startswith(prefix) and m.isfile()]
            for m in members:
                m.name = m.name[len(prefix) :]
            tar.extractall(into, members=[m for m in members if m.name.startswith(KEEP)], filter="data")


def convert(model_dir: Path, out: Path, outtype: str, pre: str | None = None, fallback: str | None = None) -> str:
    """Run llama.cpp's convert_hf_to_gguf.py; returns its log. pre: forced pre-tokenizer; fallback: for unknown ones."""
    if outtype not in CONVERTER_TYPES:
        raise ValueError(outtype)
    src = sources()
    with tempfile.TemporaryDirectory(prefix="lorakit-convert-") as staging:
        view = staged(Path(model_dir), Path(staging))
        cmd = [sys.executable, "-c", RUNNER, str(src), pre or "", fallback or "", str(view),
               "--outfile", str(out), "--outtype", outtype]  # fmt: skip
        got = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if got.returncode != 0 or not out.is_file():
        tail = "\n".join(got.stderr.strip().splitlines()[-6:])
        raise LorakitError(f"llama.cpp's converter failed on {model_dir} (--outtype {outtype}):\n{tail}")
    return got.stderr


def staged(model_dir: Path, staging: Path) -> Path:
    """The model folder as the converter expects it: links to every file, tokenizer_config.json completed.

    transformers 5 keeps the added tokens only in tokenizer.json; the converter (written for transformers 4)
    reads their ids and kinds from tokenizer_config.json's added_tokens_decoder, and without it writes a
    sentencepiece model's <start_of_turn> (Gemma) as plain text, which llama.cpp then splits into pieces.
    """
    view = staging / model_dir.name
    view.mkdir()
    for f in model_dir.iterdir():
        (view / f.name).symlink_to(f.resolve())
    config, tokenizer = model_dir / "tokenizer_config.json", model_dir / "tokenizer.json"
    if config.is_file() and tokenizer.is_file():
        cfg = json.loads(config.read_text(encoding="utf-8"))
        if "added_tokens_decoder" not in cfg:
            added = json.loads(tokenizer.read_text(encoding="utf-8")).get("added_tokens") or []
            cfg["added_tokens_decoder"] = {str(t["id"]): {k: v for k, v in t.items() if k != "id"} for t in added}
            (view / config.name).unlink()
            (view / config.name).write_text(json.dumps(cfg, ensure_ascii=False), encoding="utf-8")
    return view


def quantize(src: Path, out: Path, kind: str, threads: int | None = None) -> None:
    """llama.cpp's quantizer (llama-quantize's library call) from an f32/f16 GGUF to `kind`."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, QUANTIZED[kind])
    params.nthread = threads or os.cpu_count() or 1
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(out).encode(), params)
    if rc != 0 or not out.is_file():
        raise LorakitError(f"llama.cpp could not quantize {src.name} to {kind} (return code {rc})")


def load(path: Path, n_ctx: int = 1024):
    """The GGUF in llama.cpp's runtime, every position's logits kept (the proof compares them)."""
    from llama_cpp import Llama

    return Llama(model_path=str(path), n_ctx=n_ctx, logits_all=True, verbose=False, seed=0,
                 n_threads=os.cpu_count(), n_gpu_layers=0)  # fmt: skip
