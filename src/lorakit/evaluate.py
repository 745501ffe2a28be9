"""`lorakit eval`: the base model and any number of adapters on one held-out set, side by side.

All adapters are loaded into ONE copy of the base through peft's multi-adapter support; the base's
own answers come from the same weights with adapters switched off. Memory is one base plus the
adapters, however many adapters are compared. On preference data (a dpo, orpo or kto run, or a --data file of
pairs) each model also ranks the held-out pairs' answers (evaluate_preference.py), against the same reference.
"""

from __future__ import annotations

import math
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch

from lorakit import adapter, data, evaluate_preference, files, loss, model, packing, render, scoring
from lorakit.config import RunConfig
from lorakit.errors import LorakitError
from lorakit.generate import generate
from lorakit.options import EvalOptions
from lorakit.run_folder import EVAL_HTML, EVAL_JSON, RunFolder, adapter_dir, locate

BASE = "base"
REFERENCE = "adapter.init"  # the name adapter.init's adapter is loaded under while it scores the reference


def run(cfg: RunConfig, opts: EvalOptions) -> dict[str, Any]:
    """Evaluate; write eval.json and eval.html into the output folder; return the eval.json content."""
    eval_files = [opts.data, cfg.data.eval if isinstance(cfg.data.eval, str) else None]
    out = _claim(output_dir(cfg, opts), opts.overwrite, eval_files)
    if opts.adapters:
        adapters, full = {name: adapter_dir(p) for name, p in opts.adapters.items()}, {}
    else:
        adapters, full = _own_result(cfg)
    _check_names(adapters, full, opts, with_init=cfg.adapter.init is not None)
    builtin, user = scoring.resolve(opts.metrics)
    tasks = harness_tasks(opts.harness) if opts.harness else []  # a missing package fails before any work
    objective = evaluate_preference.objective_of(cfg, opts.data)
    conv = data.held_out(cfg.data, opts.data, objective)
    examples = conv.examples[: opts.limit] if opts.limit else conv.examples
    if any("messages" not in ex for ex in examples):
        raise LorakitError(
            "eval compares answers to prompts, but this data is plain text (format text); "
            "give chats (prompt + answer) with --data, or a data.template that splits the text"
        )
    prompts, refs = map(list, zip(*(render.split(ex["messages"]) for ex in examples))) if examples else ([], [])
    has_refs = all(refs)
    tokenizers = tokenizers_of(cfg, {**adapters, **full})
    device = model.pick_device(opts.device)
    dtype = model.pick_dtype(opts.dtype, device)
    # The base its adapters were trained on: each one's own run says (an adapter outside a run: the config's method).
    methods = [adapter.trained_with(path) or cfg.method for path in adapters.values()] or [cfg.method]
    quantization = model.base_quantization(opts.base_precision, methods)
    for name, path in adapters.items():
        if why := adapter.base_mismatch(name, path, quantization):
            print(f"warning: {why}", file=sys.stderr)
    net = load_models(cfg, adapters, opts.force, device=device, dtype=dtype, quantization=quantization)
    pairs = None
    if objective != "sft":
        pairs = evaluate_preference.held_out(cfg, objective, opts.data, opts.limit, opts.batch_size, device)
        net = reference_pass(cfg, pairs, net)
    encoded: dict[str | None, list] = {}  # by chat template: the held-out chats as each template renders them
    results: dict[str, dict] = {}
    outputs: dict[str, list[str]] = {}

    def run_one(net: Any, name: str) -> None:
        tokenizer = tokenizers[name]
        if has_refs and tokenizer.chat_template not in encoded:
            encoded[tokenizer.chat_template] = [
                render.encode(tokenizer, ex, max_length=cfg.data.max_length) for ex in examples
            ]
        enc = encoded.get(tokenizer.chat_template, [])
        results[name], outputs[name] = answer(net, name, tokenizer, prompts, enc, tasks, opts)
        if pairs is not None:
            results[name].update(preference_scores(pairs, net, name, {**adapters, **full}.get(name)))

    for name in [BASE, *adapters]:
        run_one(net, name)
    for name, folder in full.items():  # a full fine-tune is a model of its own: it replaces the base in memory
        del net
        net = model.load_model(str(folder), dtype=dtype, device=device, quantization=quantization).eval()
        run_one(net, name)
    per_example: dict[str, list[dict]] = {}
    for name, preds in outputs.items() if has_refs else ():
        totals, per_example[name] = scoring.score(preds, refs, builtin, user, opts.normalize)
        results[name].update(totals)
    report = {
        "models": results,
        "examples": [
            {
                "id": i,
                "prompt": p,
                "reference": r or None,
                "outputs": {n: outputs[n][i] for n in outputs},
                "scores": {n: per_example[n][i] for n in per_example},
            }
            for i, (p, r) in enumerate(zip(prompts, refs))
        ],
        "settings": {
            "data": opts.data or cfg.data.eval,
            "adapters": {n: str(p) for n, p in {**adapters, **full}.items()},
            "max_new_tokens": opts.max_new_tokens,
            "temperature": opts.temperature,
            "normalize": opts.normalize,
            "base_model": cfg.model,
        },
        "note": None if has_refs else "some examples have no reference answer: generation only, metrics skipped",
    }
    if pairs is not None:
        report["preference"] = evaluate_preference.summary(pairs)
    files.write_json(out / EVAL_JSON, report)
    from lorakit import report as html_report

    html_report.write(out / EVAL_HTML, report)
    return report


def answer(
    net: Any, name: str, tokenizer: Any, prompts: list, encoded: list, tasks: list[str], opts: EvalOptions
) -> tuple[dict[str, Any], list[str]]:
    """One model's held-out loss (when there are references), harness scores and answers to `prompts`."""
    scores: dict[str, Any] = {}
    with active(net, name):
        if encoded:
            nll = held_out_loss(net, encoded, tokenizer, opts.batch_size)
            scores.update(loss=nll, perplexity=math.exp(min(nll, 50)))
        texts = generate(
            net,
            tokenizer,
            prompts,
            max_new_tokens=opts.max_new_tokens,
            batch_size=opts.batch_size,
            temperature=opts.temperature,
            top_p=opts.top_p,
            stop=opts.stop or None,
            seed=0 if opts.temperature else None,
            progress=True,
        )
    if tasks:
        scores["harness"] = harness(net, tokenizer, name, tasks, opts.batch_size, opts.limit)
    return scores, texts


def reference_pass(cfg: RunConfig, pairs: evaluate_preference.Pairs, net: Any) -> Any:
    """Score the held-out pairs with the reference a DPO run of `cfg` compares with: the base (adapters switched
    off), or adapter.init's adapter, loaded into `net` for the pass and taken out again. Returns the model to go on
    with (loading made a plain base a peft model; taking the last adapter out makes it plain again)."""
    if cfg.adapter.init is None:
        with active(net, BASE):
            pairs.reference_logps = evaluate_preference.log_probs(pairs, net)
        return net
    folder = adapter.init_adapter(cfg.adapter.init, cfg.model)
    net = adapter.load(net, folder, REFERENCE)
    with active(net, REFERENCE):
        pairs.reference_logps = evaluate_preference.log_probs(pairs, net)
    pairs.reference, pairs.reference_folder = f"adapter.init: {folder}", folder.resolve()
    return adapter.remove(net, adapter.peft_name(REFERENCE))


def preference_scores(
    pairs: evaluate_preference.Pairs, net: Any, name: str, folder: Path | None
) -> dict[str, float | None]:
    """Model `name`'s preference columns (`folder`: its adapter or model folder; None for the base); the reference
    itself (the base, or the adapter from adapter.init's folder) from the reference pass."""
    if pairs.is_reference(folder):
        return evaluate_preference.scores(pairs, pairs.reference_logps, is_reference=True)
    with active(net, name):
        return evaluate_preference.scores(pairs, evaluate_preference.log_probs(pairs, net), is_reference=False)


def output_dir(cfg: RunConfig, opts: EvalOptions) -> Path:
    """Where eval.json and eval.html go: --output, else the run folder's eval/."""
    return Path(opts.output) if opts.output else RunFolder.of(cfg).eval_dir


def load_models(
    cfg: RunConfig,
    adapters: dict[str, Path],
    force: bool,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    quantization: str | None = None,
) -> Any:
    """One base model with every adapter attached under its own name (peft multi-adapter).

    quantization "4bit" loads the base as a QLoRA run trained on it (bitsandbytes NF4, `dtype` compute).
    """
    net = model.load_model(
        cfg.model, dtype=dtype, device=device, quantization=quantization, trust_remote_code=cfg.trust_remote_code
    )
    for name, path in adapters.items():
        adapter.check_base(adapter.read_adapter(path), cfg.model, force=force, where=f"adapter '{name}' ({path})")
        net = adapter.load(net, path, name)
    return net.eval()


@contextmanager
def active(net: Any, name: str) -> Iterator[None]:
    """Run the base (adapters switched off) or one named adapter."""
    from peft import PeftModel

    # Not hasattr(net, "set_adapter"): transformers models have one too (their own adapter integration).
    if not isinstance(net, PeftModel):
        with nullcontext():
            yield
    elif name == BASE:
        with net.disable_adapter():
            yield
    else:
        net.set_adapter(adapter.peft_name(name))
        yield


def held_out_loss(net: Any, encoded: list[render.Encoded], tokenizer: Any, batch_size: int) -> float:
    """Mean negative log-likelihood per trained (answer) token."""
    examples = [{"input_ids": e.input_ids, "labels": e.labels} for e in encoded]
    total, count = loss.eval_sums(
        net,
        examples,
        packing.unpacked(len(examples)),
        batch_size,
        tokenizer.pad_token_id,
        use_positions=False,
        device=next(net.parameters()).device,
    )
    return total / max(count, 1)


def harness_tasks(spec: str) -> list[str]:
    """lm-evaluation-harness tasks: names from its registry (most download their data from the hub), or
    paths of task YAML files (lm-eval's format; `dataset_path: json` with local `data_files` runs offline)."""
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise LorakitError(
            "--harness needs EleutherAI's lm-evaluation-harness: pip install 'lorakit[harness]' "
            "(or pip install lm-eval)"
        ) from None
    tasks = [t.strip() for t in spec.split(",") if t.strip()]
    if not tasks:
        raise LorakitError("--harness: name at least one task (comma-separated), e.g. --harness arc_easy,hellaswag")
    return tasks


def harness(
    net: Any, tokenizer: Any, name: str, tasks: list[str], batch_size: int, limit: int | None
) -> dict[str, dict]:
    """lm-evaluation-harness scores of `name` (the base or an adapter), on the already loaded model.

    The harness gets our model object, so it shares the one base copy and adapter switch of this eval
    instead of loading the base again per adapter.
    """
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    try:
        with active(net, name):
            res = lm_eval.simple_evaluate(
                model=HFLM(pretrained=net, tokenizer=tokenizer, batch_size=batch_size), tasks=tasks, limit=limit
            )
    except Exception as e:  # noqa: BLE001 - the harness raises many kinds; one clear message instead
        raise LorakitError(
            f"lm-evaluation-harness failed on {name}: {type(e).__name__}: {e}. Its built-in tasks "
            "download their data from the Hugging Face hub; offline, give a task YAML file with local "
            "data (dataset_path: json)"
        ) from None
    return {
        task: {k: v for k, v in vals.items() if isinstance(v, int | float) and not isinstance(v, bool)}
        for task, vals in res["results"].items()
    }


def print_table(report: dict) -> None:
    from lorakit.report import flat

    models = {name: flat(v) for name, v in report["models"].items()}
    keys = list(next(iter(models.values())))
    width = max(len(n) for n in models) + 2
    cols = {k: max(13, len(k) + 2) for k in keys}  # preference_accuracy is wider than the other names
    print(f"{'model':<{width}}" + "".join(f"{k:>{cols[k]}}" for k in keys))
    for name, vals in models.items():
        print(f"{name:<{width}}" + "".join(f"{_fmt(k, vals.get(k)):>{cols[k]}}" for k in keys))
    if report.get("note"):
        print(f"note: {report['note']}")
    if report.get("preference"):
        print(report["preference"]["explained"])


def _fmt(key: str, v: Any) -> str:
    if v is None:
        return "-"
    if key in ("exact_match", "contains", "token_f1", "rouge_l", "preference_accuracy", "reward_accuracy"):
        return f"{v:.1%}"
    return f"{v:.3f}" if key in ("loss", "perplexity", "reward_margin") or ":" in key else f"{v:.1f}"


def tokenizers_of(cfg: RunConfig, models: dict[str, Path]) -> dict[str, Any]:
    """Each model's tokenizer, holding the chat template it answers with (the server renders the same way).

    An adapter (or a full fine-tune) answers with the template saved with it at training; the base with its
    own. Where there is none (a base model, an adapter saved without its tokenizer), the run's
    data.chat_template is applied as training did, so every model answers the same chats.
    """
    base = model.load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code)
    out = {BASE: base}
    for name, path in models.items():  # one saved without its tokenizer answers as the base does: the same object
        saved = model.saved_tokenizer(path, cfg.trust_remote_code)
        out[name] = saved if saved is not None else base
    for tokenizer in out.values():
        if not getattr(tokenizer, "chat_template", None):
            render.setup_template(tokenizer, cfg.data.chat_template)
    return out


def _own_result(cfg: RunConfig) -> tuple[dict[str, Path], dict[str, Path]]:
    """The run's own result under the run's name: its adapter (lora, qlora), or its model (full); none yet: ({}, {})."""
    found = locate(RunFolder.of(cfg).root)
    if found is None or found.run is None:
        return {}, {}
    return ({found.name: found.path}, {}) if found.kind == "adapter" else ({}, {found.name: found.path})


def _check_names(adapters: dict[str, Path], full: dict[str, Path], opts: EvalOptions, with_init: bool) -> None:
    """Refuse an adapter named as the base (its rows would be the base's: adapters are switched off for that name)
    or, where the run has an adapter.init, as the reference (peft would hold two adapters under one name)."""
    reserved = [(BASE, "the base model's")] + ([(REFERENCE, "adapter.init's, the reference")] if with_init else [])
    for taken, what in reserved:
        clash = next((n for n in [*adapters, *full] if adapter.peft_name(n) == adapter.peft_name(taken)), None)
        if clash is None:
            continue
        hint = f"--adapter NAME={adapters[clash]}" if clash in adapters and not opts.adapters else "--adapter NAME=PATH"
        raise LorakitError(f"an adapter named '{clash}': that name is {what} in eval; name it otherwise with {hint}")


def _claim(out: Path, overwrite: bool, data: list[str | None]) -> Path:
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise LorakitError(f"output folder {out} exists; pass --overwrite to replace it or --output another/folder")
        if why := files.why_not_deletable(out, EVAL_JSON, data):
            raise LorakitError(
                f"--overwrite: output folder {out} {why}; lorakit only replaces its own eval "
                "folders. Pass --output another/folder."
            )
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return out
