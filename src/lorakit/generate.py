"""Batched chat completion with a `transformers` model or a `peft` `PeftModel`, through `model.generate`.

`lorakit eval` (and so the quickstart's comparison) answers with it. The server decodes with its own
engine (serve/engine.py: continuous batching, rows of different adapters in one pass); its greedy
answers are tested to equal these.
"""

from __future__ import annotations

import torch
from accelerate.utils import find_executable_batch_size
from tqdm.auto import tqdm
from transformers import GenerationConfig

from lorakit import render
from lorakit.model import evaluating


def generate(
    model,
    tokenizer,
    chats: list[list[dict]],
    *,
    max_new_tokens: int = 64,
    batch_size: int = 8,
    temperature: float = 0.0,
    top_p: float = 1.0,
    stop: list[str] | None = None,
    seed: int | None = None,
    progress: bool = False,
) -> list[str]:
    """Complete each chat with one assistant turn; return the texts in the order of `chats`.

    Each chat is a list of `{"role", "content"}` messages rendered with the tokenizer's chat template.
    `temperature == 0` decodes greedily (deterministic). A completion ends at one of `render.stop_ids`
    (the template's end of turn, the EOS ids) or after `max_new_tokens`; its text is then cut
    before the first of the `stop` strings. Special tokens are not part of the returned text.
    """
    eos_ids = render.stop_ids(tokenizer, model.generation_config)
    if not eos_ids:
        raise ValueError("neither the tokenizer nor the model's generation_config defines an EOS token")
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        raise ValueError(
            "the tokenizer has no pad token: load it with lorakit.model.load_tokenizer, or pass "
            "lorakit.model.with_pad(tokenizer)"
        )
    prompts = [render.prompt_ids(tokenizer, chat) for chat in chats]
    # A fresh config, not the model's: its sampling defaults (temperature 0.7, repetition penalty…)
    # must not change what the caller asked for. Sampling knobs are only set when sampling, because
    # transformers warns about them under greedy decoding.
    sampling = temperature > 0
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=sampling,
        eos_token_id=eos_ids,
        pad_token_id=pad_id,
        **({"temperature": temperature, "top_p": top_p} if sampling else {}),
    )
    # Sorting by length puts prompts of similar size in one batch, so there is little padding to waste, and
    # puts the longest first: when the first batch fits in memory, every later one does.
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]), reverse=True)
    device = next(model.parameters()).device
    texts: list[str] = [""] * len(prompts)

    # accelerate makes the batch smaller and calls again when it runs out of GPU memory.
    @find_executable_batch_size(starting_batch_size=batch_size)
    def run(size: int) -> None:
        if seed is not None:
            torch.manual_seed(seed)
        batches = [order[i : i + size] for i in range(0, len(order), size)]
        for batch in tqdm(batches, desc="generate", disable=not progress):
            input_ids, attention_mask = _left_pad([prompts[i] for i in batch], pad_id, device)
            out = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config)
            for i, row in zip(batch, out[:, input_ids.shape[1] :].tolist()):
                texts[i] = _decode(tokenizer, row, eos_ids, stop)

    # dropout (LoRA's included) would make greedy decoding random
    with evaluating(model), torch.inference_mode():
        run()
    return texts


def _left_pad(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack token rows padded on the LEFT: input_ids and attention_mask, both (batch, longest)."""
    # Decoder-only generation appends new tokens at the right end of every row, so the padding must
    # sit on the left: right padding would put pad tokens between a prompt and its completion.
    width = max(len(r) for r in rows)
    input_ids = torch.tensor([[pad_id] * (width - len(r)) + r for r in rows], device=device)
    attention_mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
    return input_ids, attention_mask


def _decode(tokenizer, row: list[int], eos_ids: list[int], stop: list[str] | None) -> str:
    # Cut at the first EOS ourselves: rows that finished early are filled with pad ids afterwards,
    # and the pad/EOS token is not always marked special, so skip_special_tokens alone is not enough.
    end = next((k for k, t in enumerate(row) if t in eos_ids), len(row))
    text = tokenizer.decode(row[:end], skip_special_tokens=True)
    cuts = [text.find(s) for s in stop or [] if s and s in text]
    return text[: min(cuts)] if cuts else text
