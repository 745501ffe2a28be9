"""A GGUF proven in llama.cpp itself: same prompt tokens, same greedy answers, stops where the model stops.

For every prompt the chat is rendered twice: by the HF tokenizer (what the model was trained on) and by
llama-cpp-python's chat formatter from the template stored in the GGUF, tokenized by llama.cpp. Then both
runtimes answer greedily for up to MAX_NEW tokens, and llama.cpp is also run teacher-forced on the HF
answer to measure how often its top token agrees and how far its logits are.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lorakit import parity, render
from lorakit.errors import LorakitError
from lorakit.export import llamacpp

MAX_NEW = 32
# Quantized files cannot answer token for token like the source; they must agree on this share of the
# answer positions (llama.cpp's top token vs the merged model's greedy token, teacher-forced). Measured on
# SmolLM2-135M: q8_0 90.7%, q4_k_m 88.0% (llama.cpp also rounds activations to 8 bits in its quantized
# matmuls, so even q8_0 drifts on a small model; its own tables give ~99% / ~94% on 7B models). A broken
# conversion (wrong rope layout, tokenizer or weights) agrees on almost nothing, so these bars, a few
# points under what a sound file measures, separate the two.
EXACT = ("f32", "f16", "bf16")  # must answer token for token (a measured near-tie aside)
MIN_AGREEMENT = {"q8_0": 0.85, "q4_k_m": 0.75}


@dataclass
class Row:
    prompt: str
    prompt_tokens: int
    same_prompt: bool
    hf_tokens: int
    same_answer: str  # "yes", "tie at N" (a near-tie both runtimes round differently), or "no at N"
    agreement: float
    max_logit_diff: float
    stops: str  # "both", "neither" (no end-of-turn within MAX_NEW), or what went wrong


def llama_prompt(llm: Any, chat: list[dict]) -> list[int]:
    """The chat as llama-cpp-python's chat completion renders and tokenizes it from the GGUF's template."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    template = llm.metadata.get("tokenizer.chat_template")
    if not template:
        raise LorakitError("GGUF check FAILED: the file holds no chat template (tokenizer.chat_template)")
    tok_text = llm._model.token_get_text  # the same lookup llama-cpp-python uses for its chat formats
    bos, eos = llm.token_bos(), llm.token_eos()
    fmt = Jinja2ChatFormatter(template, eos_token=tok_text(eos) if eos >= 0 else "",
                              bos_token=tok_text(bos) if bos >= 0 else "")  # fmt: skip
    text = fmt(messages=chat).prompt
    return llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)


def llama_greedy(llm: Any, prompt: list[int], is_end: Any) -> list[int]:
    llm.reset()
    llm.eval(prompt)
    out: list[int] = []
    while len(out) < MAX_NEW:
        out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        if is_end(out[-1]):
            break
        llm.eval([out[-1]])
    return out


def prove(path: Path, model: Any, tokenizer: Any, outtype: str, chats: list[list[dict]]) -> dict:
    """Check the GGUF at `path` against the HF `model`; returns {"rows", "ok", "problems", ...}."""
    import llama_cpp

    llm = llamacpp.load(path)
    vocab = llama_cpp.llama_model_get_vocab(llm._model.model)

    def is_end(i: int) -> bool:
        return bool(llama_cpp.llama_vocab_is_eog(vocab, i))

    problems = []
    ends = render.stop_ids(tokenizer, model.generation_config)
    for i in ends:
        if not is_end(i):
            problems.append(
                f"the model ends its turns with {tokenizer.convert_ids_to_tokens(i)!r} (id {i}), which the GGUF does "
                f"not mark as end-of-generation (its EOS is id {llm.token_eos()}): llama.cpp would run past the turn"
            )
    rows = []
    for chat, want in parity.rendered(tokenizer, chats):
        got = llama_prompt(llm, chat)
        label = chat[-1]["content"][:40]
        if got != want:
            at = _first_difference(got, want)
            problems.append(
                f"prompt {label!r}: llama.cpp renders the GGUF's chat template and tokenizes it differently from "
                f"position {at}: {tokenizer.decode(got[at : at + 8])!r} vs the model's "
                f"{tokenizer.decode(want[at : at + 8])!r} (chat template or tokenizer mismatch)"
            )
            rows.append(Row(label, len(want), False, 0, "-", 0.0, float("nan"), "-"))
            continue
        with torch.no_grad():
            ids = torch.tensor([want], device=model.device)
            hf = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_NEW, do_sample=False,
                                eos_token_id=ends, pad_token_id=ends[0])[0, len(want) :].tolist()  # fmt: skip
            forced = want + hf[:-1]
            ref = model(torch.tensor([forced], device=model.device)).logits[0, len(want) - 1 :].float().cpu().numpy()
        llm.reset()
        llm.eval(forced)
        mine = np.asarray(llm.scores[len(want) - 1 : len(forced)], dtype=np.float32)
        diff = np.abs(mine - ref[:, : mine.shape[1]]).max(axis=1)
        agree = float((mine.argmax(-1) == np.array(hf)).mean()) if hf else 1.0
        lc = llama_greedy(llm, want, is_end)
        same = "yes"
        exact = outtype in EXACT
        if lc != hf:
            at = _first_difference(lc, hf)
            same = f"no at {at}"
            if exact and at < len(lc) and at < len(hf) and ref[at, hf[at]] - ref[at, lc[at]] <= 2 * diff[at]:
                # A near-tie: the model's own margin between the two tokens is within the measured difference
                # of the two runtimes' logits at that step (16-bit rounding), so either is the greedy answer.
                same = f"tie at {at}"
        hf_stops, lc_stops = bool(hf) and hf[-1] in ends, bool(lc) and is_end(lc[-1])
        stops = "both" if hf_stops and lc_stops else "neither" if not (hf_stops or lc_stops) else (
            "llama.cpp did not stop" if hf_stops else "llama.cpp stopped early")  # fmt: skip
        rows.append(Row(label, len(want), True, len(hf), same, agree, float(diff.max()), stops))
    exact = outtype in EXACT
    for r in rows:
        if not r.same_prompt:
            continue
        if exact and r.same_answer.startswith("no") and r.same_answer != f"no at {r.hf_tokens}":
            problems.append(f"prompt {r.prompt!r}: llama.cpp's greedy answer differs from the model's "
                            f"({r.same_answer})")  # fmt: skip
        if r.stops == "llama.cpp did not stop" and r.same_answer == f"no at {r.hf_tokens}":
            problems.append(f"prompt {r.prompt!r}: llama.cpp gave the model's answer but did not stop at its "
                            "end-of-turn token")  # fmt: skip
    answered = [r for r in rows if r.same_prompt]
    agreement = sum(r.agreement * r.hf_tokens for r in answered) / max(1, sum(r.hf_tokens for r in answered))
    if not exact and agreement < MIN_AGREEMENT[outtype]:
        problems.append(
            f"{outtype}: llama.cpp's top token agrees with the model on {agreement:.1%} of answer positions, "
            f"below the {MIN_AGREEMENT[outtype]:.0%} accepted for {outtype}; use a wider type (q8_0, f16)"
        )
    del llm
    return {"rows": [asdict(r) for r in rows], "agreement": agreement, "problems": problems, "ok": not problems}


def _first_difference(a: list[int], b: list[int]) -> int:
    """The first position where the two token lists differ (the shorter one's length if one extends the other)."""
    return next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def table(result: dict) -> str:
    """The proof as a Markdown table, one row per prompt."""
    lines = ["| prompt | tokens | same prompt tokens | answer tokens | same greedy answer | top-1 agreement "
             "| max abs logit diff | stops at end-of-turn |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in result["rows"]:
        lines.append(
            f"| {r['prompt']} | {r['prompt_tokens']} | {'yes' if r['same_prompt'] else 'NO'} | {r['hf_tokens']} "
            f"| {r['same_answer']} | {r['agreement']:.0%} | {r['max_logit_diff']:.3g} | {r['stops']} |"
        )
    return "\n".join(lines)


def require(result: dict, path: Path) -> None:
    if not result["ok"]:
        raise LorakitError(
            f"GGUF check in llama.cpp FAILED for {path.name}; nothing was kept:\n- "
            + "\n- ".join(result["problems"])
            + "\n"
            + table(result)
            + "\n(--no-check keeps the file without this check)"
        )
