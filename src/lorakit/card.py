"""The model card: README.md beside an adapter, a merged model or a GGUF, in the layout the Hub reads.

A YAML header (base_model, library_name, tags, license) then what a reader needs to trust and use the
weights: the base, the method and its hyperparameters, the data, the training curve, the `lorakit eval`
table when one exists, the base's license, and how to load it in peft, vLLM, Ollama and llama.cpp.
"""

from __future__ import annotations

import json
import shlex
import shutil
from pathlib import Path
from typing import Any, Literal

import yaml

from lorakit import files
from lorakit.errors import LorakitError
from lorakit.run_folder import RunFolder

Kind = Literal["adapter", "model", "merged", "gguf"]
LICENSES = {"HuggingFaceTB/SmolLM2-135M-Instruct": "apache-2.0"}  # the built-in model's, known offline


def base_license(base: str) -> str | None:
    """The base's license from its own card's header (a local folder or the hub cache), if it says."""
    known = LICENSES.get(base)
    if known:
        return known
    folder = Path(base)
    if not folder.is_dir():
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(base, "README.md")
        except ValueError:  # not a hub id
            return None
        folder = Path(cached).parent if isinstance(cached, str) else folder
    return _header_field(folder, "license")


def recorded_base(folder: Path) -> str | None:
    """The base_model a lorakit card in `folder` records (a merged model's, say), if any."""
    return _header_field(folder, "base_model")


def _header_field(folder: Path, key: str) -> str | None:
    """`key` of the YAML header of folder/README.md (a model card) as huggingface_hub reads it, if it is there."""
    from huggingface_hub import ModelCard

    path = folder / "README.md"
    try:
        text = path.read_text(encoding="utf-8", errors="replace") if path.is_file() else ""
        # ModelCard warns about a card without a header; such a card has no field to give.
        value = ModelCard(text, ignore_metadata_errors=True).data.get(key) if text.startswith("---") else None
    except (OSError, ValueError, yaml.YAMLError):  # unreadable, or a header that is not a YAML mapping
        return None
    return value if isinstance(value, str) else None


def write(folder: Path, kind: Kind, base: str, run: RunFolder | None, extra: str = "", shown_as: str = "") -> Path:
    """Write folder/README.md. base: the base model as the user named it (the alias is shown as its hub id).

    shown_as: the folder's name once in place, when it is written under a temporary one (a merge's).
    """
    from huggingface_hub import ModelCardData

    from lorakit import model

    alias, base = base == model.ALIAS, model.portable(base)

    cfg = run.run_config() if run is not None else None
    summary = _json(run.summary) if run is not None else None
    evals = _json(run.eval_json) if run is not None else None
    license_ = base_license(base)
    shown_as = shown_as or folder.name
    name = run.name if run is not None else shown_as
    method = cfg.method if cfg is not None else None
    tags = ["lorakit", *([method] if method else []), *(["gguf"] if kind == "gguf" else []), "text-generation"]
    library = {"adapter": "peft", "model": "transformers", "merged": "transformers"}.get(kind)
    # huggingface_hub writes the header as the Hub reads it: a path with spaces or colons stays one value.
    header = ModelCardData(
        base_model=base, library_name=library, license=license_ or "other", tags=tags, pipeline_tag="text-generation"
    )
    lines = ["---", header.to_yaml(), "---", "", f"# {name}", ""]
    what = {"adapter": "A LoRA adapter", "model": "A fully fine-tuned model", "merged": "A merged model (base + LoRA)",
            "gguf": "GGUF files for llama.cpp and Ollama"}[kind]  # fmt: skip
    lines += [f"{what} for [{base}]({_link(base)}), trained with [lorakit](https://github.com/lorakit/lorakit).", ""]
    if alias:
        lines += [f"Trained on lorakit's built-in copy of this model: {model.ALIAS_WEIGHTS}.", ""]
    if cfg is not None:
        lines += ["## Training", "", "| setting | value |", "|---|---|", f"| method | {cfg.method} |"]
        if cfg.method != "full":
            a = cfg.adapter
            lines += [f"| LoRA rank / alpha / dropout | {a.r} / {a.alpha} / {a.dropout} |",
                      f"| target modules | {a.target_modules} |"]  # fmt: skip
        t = cfg.train
        # What ran (summary.json) over what was asked: a time budget or epochs leave the steps to the run.
        steps, epochs = (summary or {}).get("steps", t.max_steps or "-"), (summary or {}).get("epochs", t.epochs)
        lines += [
            f"| learning rate, schedule | {t.lr}, {t.scheduler} (warmup {t.warmup_steps}) |",
            f"| batch size × grad accum | {t.batch_size} × {t.grad_accum} |",
            f"| steps / epochs | {steps} / {epochs} |",
            f"| max length, packing | {cfg.data.max_length}, {cfg.data.packing} |",
            f"| precision | {t.precision} |",
            f"| train data | `{cfg.data.train}` |",
        ]
        if summary:
            lines += [
                f"| examples / tokens | {summary.get('examples')} / {summary.get('tokens')} |",
                f"| final train / eval loss | {_num(summary.get('final_train_loss'))} / "
                f"{_num(summary.get('final_eval_loss'))} |",
                f"| wall time, tokens/s | {summary.get('wall_time_s')} s, {summary.get('tokens_per_s')} |",
                f"| device | {summary.get('device')} × {summary.get('processes')} |",
            ]
            if summary.get("time_budget_s") is not None:
                lines.append(f"| time budget | {summary['time_budget_s']:g} s: {summary.get('planned_steps')} steps "
                             f"planned, {summary.get('budget_used_s')} s used |")  # fmt: skip
            if summary.get("best_step") is not None:
                lines.append(f"| published weights | step {summary['best_step']} of {steps}, the best "
                             f"{summary.get('keep_best')} ({_num(summary.get('best_eval_loss'))}); the last step's "
                             "are in checkpoints/ |")  # fmt: skip
        lines.append("")
    if run is not None and run.loss_plot.is_file():
        shutil.copy2(run.loss_plot, folder / "loss.png")
        lines += ["![training and held-out loss](loss.png)", ""]
    if evals:
        lines += ["## Evaluation (`lorakit eval`)", "", *_eval_table(evals), ""]
    if extra:
        lines += [extra.rstrip(), ""]
    # lorakit loads the alias offline; the card's other tools get its hub id.
    lorakit_base = model.ALIAS if alias else base
    lines += ["## Use", "", *_usage(kind, base, lorakit_base, name, shown_as, folder), ""]
    lines += ["## License", "", f"The base model's license applies: {license_ or 'see the base model card'}.", ""]
    path = folder / "README.md"
    files.write_text(path, "\n".join(lines))
    return path


def _usage(kind: Kind, base: str, lorakit_base: str, name: str, shown: str, folder: Path) -> list[str]:
    """How to load what `folder` holds: commands to paste into a shell, paths relative to where they run."""
    here = f"./{shown}"
    if kind == "adapter":
        return [
            f"Run these from the folder that holds `{shown}/`.", "",
            "peft (the base is named in adapter_config.json):", "```python",
            "from peft import AutoPeftModelForCausalLM",
            f"model = AutoPeftModelForCausalLM.from_pretrained({json.dumps(shown)})", "```",
            *_vllm(base, {name: here}, {name: folder}),
            "lorakit (OpenAI-compatible server):", "```bash",
            shlex.join(["lorakit", "serve", "--model", lorakit_base, "--adapter", f"{name}={here}"]), "```",
            "Ollama / llama.cpp (merged into the base first):", "```bash",
            shlex.join(["lorakit", "export", here, f"{name}-gguf", "--format", "gguf"]), "```",
        ]  # fmt: skip
    if kind in ("model", "merged"):
        return [f"Run these from the folder that holds `{shown}/`.", "",
                "transformers:", "```python", "from transformers import AutoModelForCausalLM",
                f"model = AutoModelForCausalLM.from_pretrained({json.dumps(shown)})", "```",
                *_vllm(here, {}, {}),
                "lorakit (OpenAI-compatible server):", "```bash", shlex.join(["lorakit", "serve", "--model", here]),
                "```"]  # fmt: skip
    ggufs = sorted(p.name for p in folder.glob("*.gguf"))
    first = ggufs[0] if ggufs else "MODEL.gguf"
    return ["Run these in this folder.", "",
            "Ollama (the Modelfile carries the chat template and stop tokens):", "```bash",
            shlex.join(["ollama", "create", name, "-f", "Modelfile"]), shlex.join(["ollama", "run", name]), "```",
            "llama.cpp:", "```bash", shlex.join(["llama-cli", "-m", first, "-cnv"]), "```",
            "llama-cpp-python:", "```python", "from llama_cpp import Llama",
            f"llm = Llama({json.dumps(first)})",
            'llm.create_chat_completion(messages=[{"role": "user", "content": "Hello"}])', "```"]  # fmt: skip


def _vllm(model: str, shown: dict[str, str], folders: dict[str, Path]) -> list[str]:
    """vLLM's server on `model` with the adapters (shown by their paths relative to the card's reader), built as
    `lorakit serve --engine vllm` builds it; or why vLLM cannot serve the adapter as it is."""
    from lorakit.export import vllm

    try:
        ranks = vllm.check(model, folders, force=True)  # the card names the adapter's own base
    except LorakitError as e:
        return [f"vLLM: {e}", ""]
    return ["vLLM (`python`: the one vLLM is installed for):", "```bash",
            shlex.join(vllm.command("python", model, shown, ranks)), "```"]  # fmt: skip


def _eval_table(evals: dict) -> list[str]:
    from lorakit.report import flat

    models = {n: flat(v) for n, v in (evals.get("models") or {}).items()}
    keys = list(next(iter(models.values()), {}))
    out = ["| model | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    out += [f"| {n} | " + " | ".join(_num(v.get(k)) for k in keys) + " |" for n, v in models.items()]
    data = (evals.get("settings") or {}).get("data")
    return out + (["", f"On `{data}`."] if data else [])


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _num(v: Any) -> str:
    return "-" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)


def _link(base: str) -> str:
    """A hub id's page, or a local folder as a Markdown link target (<...> keeps a space in it)."""
    return f"https://huggingface.co/{base}" if base.count("/") == 1 and not Path(base).exists() else f"<{base}>"
