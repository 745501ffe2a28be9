"""Loss masks: exactly the assistant turns and their end token are trained, for every template."""

import pytest
from transformers import GenerationConfig

from lorakit import formats, render, sources
from lorakit.errors import LorakitError
from lorakit.render import IGNORE
from tiny import tiny_tokenizer

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "And 3+3?"},
    {"role": "assistant", "content": "It is 6."},
]


def trained_runs(tok, enc):
    """Decoded text of each maximal run of trained tokens."""
    runs, cur = [], []
    for t, lab in zip(enc.input_ids, enc.labels):
        if lab != IGNORE:
            assert lab == t
            cur.append(t)
        elif cur:
            runs.append(tok.decode(cur))
            cur = []
    if cur:
        runs.append(tok.decode(cur))
    return runs


@pytest.mark.parametrize("template, end", [("chatml", "<|im_end|>"), ("llama2", "</s>")])
def test_every_assistant_turn_and_its_end_token_is_trained(template, end):
    tok = tiny_tokenizer(template)
    enc = render.encode(tok, {"messages": CHAT})
    runs = trained_runs(tok, enc)
    sep = "" if template == "chatml" else " "  # Llama-2 puts a space before </s>
    assert [r.strip() for r in runs] == [f"4{sep}{end}", f"It is 6.{sep}{end}"]
    last_trained = max(i for i, lab in enumerate(enc.labels) if lab != IGNORE)
    assert enc.eos_added == 0 and enc.input_ids[last_trained] == tok.eos_token_id


def test_answer_text_repeated_in_the_prompt_is_not_trained():
    # A string search for the answer would find it in the user turn first; offsets do not.
    tok = tiny_tokenizer("chatml")
    chat = [
        {"role": "user", "content": "Say: the capital of France"},
        {"role": "assistant", "content": "the capital of France"},
    ]
    enc = render.encode(tok, {"messages": chat})
    assert trained_runs(tok, enc) == ["the capital of France<|im_end|>"]


def test_train_on_all_and_text():
    tok = tiny_tokenizer("chatml")
    enc = render.encode(tok, {"messages": CHAT}, train_on="all")
    assert enc.labels == enc.input_ids
    text = render.encode(tok, {"text": "The quick brown fox."})
    assert text.labels == text.input_ids and text.input_ids[-1] == tok.eos_token_id


@pytest.mark.parametrize("name", sorted(render.FALLBACK_TEMPLATES))
def test_fallback_templates_end_each_trained_turn_with_eos(name):
    tok = tiny_tokenizer(None, eos="</s>")  # a base-model tokenizer: no chat template at all
    assert render.setup_template(tok, "auto" if name == "chatml" else name) == name
    enc = render.encode(tok, {"messages": CHAT})
    runs = trained_runs(tok, enc)
    assert len(runs) == 2 and all(r.rstrip().endswith("</s>") for r in runs), runs
    assert "It is 6." in runs[1] and "2+2" not in "".join(runs)
    assert enc.eos_added == 0


def test_template_that_drops_eos_gets_it_appended_and_counted():
    tok = tiny_tokenizer(None)
    tok.chat_template = (
        "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    enc = render.encode(tok, {"messages": CHAT})
    assert enc.eos_added == 2
    # " 4" is one token that straddles the prompt's trailing space: overlapping tokens are trained.
    assert [r.strip() for r in trained_runs(tok, enc)] == ["4<|im_end|>", "It is 6.<|im_end|>"]


def test_truncation_is_flagged():
    tok = tiny_tokenizer("chatml")
    enc = render.encode(tok, {"messages": CHAT}, max_length=10)
    assert enc.truncated and len(enc.input_ids) == 10 == len(enc.labels)


def test_unknown_fallback_name():
    with pytest.raises(LorakitError, match=r"data.chat_template 'vicuna9' is unknown"):
        render.setup_template(tiny_tokenizer("chatml"), "vicuna9")


def test_template_refusing_roles_is_a_clear_error():
    tok = tiny_tokenizer("llama2")  # raises on non-alternating roles
    chat = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}, {"role": "assistant", "content": "c"}]
    with pytest.raises(LorakitError, match=r"chat template refused.*data.chat_template: chatml"):
        render.encode(tok, {"messages": chat})


def test_tools_go_into_the_system_turn_for_templates_without_tools(shared_data):
    rows = sources.read(str(shared_data / "sharegpt" / "glaive_toolcall_en_demo.json"), limit=3)
    ex = formats.convert(rows.records, rows.where).examples[0]
    tok = tiny_tokenizer("chatml")
    enc = render.encode(tok, ex)
    text = tok.decode(enc.input_ids)
    assert text.startswith("<|im_start|>system\nYou can call these tools:") and "search_recipes" in text
    runs = trained_runs(tok, enc)
    # The tool call is trained, the tool's observation is not.
    assert any(r.startswith("<tool_call>") for r in runs)
    obs = next(m["content"] for m in ex["messages"] if m["role"] == "tool")
    assert all(obs[:40] not in r for r in runs)


@pytest.mark.parametrize(
    "path",
    [
        "alpaca/alpaca_5000.json",
        "gpteacher/roleplay-simple-deduped-roleplay-instruct.json",
        "guanaco/guanaco_1k_messages.jsonl",
        "sharegpt/sharegpt_v3_first1000.json",
    ],
)
def test_trained_text_is_exactly_the_answers_on_real_rows(shared_data, path):
    tok = tiny_tokenizer("chatml")
    rows = sources.read(str(shared_data / path), limit=20)
    for ex in formats.convert(rows.records, rows.where).examples:
        enc = render.encode(tok, ex)
        answers = [m["content"] + "<|im_end|>" for m in ex["messages"] if m["role"] == "assistant"]
        assert trained_runs(tok, enc) == answers


def test_prompt_ids_are_the_training_render_up_to_the_answer():
    """What generate, eval and serve feed the model is exactly the prefix training put before the answer."""
    tok = tiny_tokenizer("chatml")
    prompt, reference = render.split(CHAT)
    assert reference == "It is 6." and prompt == CHAT[:4]
    ids = render.prompt_ids(tok, prompt)
    trained = render.encode(tok, {"messages": CHAT})
    last = max(i for i, lab in enumerate(trained.labels) if lab != IGNORE)  # the last answer's end token
    start = max(i for i, lab in enumerate(trained.labels[:last]) if lab == IGNORE) + 1  # its first token
    assert ids == trained.input_ids[:start]
    assert tok.decode(ids).endswith("<|im_start|>assistant\n")


def test_split_without_an_answer_is_all_prompt():
    chat = [{"role": "user", "content": "hi"}]
    assert render.split(chat) == (chat, None)
    assert render.split([*chat, {"role": "assistant", "content": ""}]) == (chat, None)


def test_stop_ids_put_the_templates_end_of_turn_first_and_keep_every_eos():
    tok = tiny_tokenizer("chatml", eos="<|endoftext|>")  # a base-model EOS; turns still end with <|im_end|>
    im_end, eot, close = tok.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>", "</s>"])

    generation = GenerationConfig(eos_token_id=[eot, close])
    assert render.stop_ids(tok, generation) == [im_end, eot, close]
    render.setup_template(tok, "alpaca")  # ends an answer with EOS itself: nothing else to stop at
    assert render.stop_ids(tok) == [eot]
    assert render.end_of_turn_id(tiny_tokenizer(None)) is None  # no template: only EOS ids
    assert render.stop_ids(tiny_tokenizer(None)) == [im_end]


def test_template_names():
    tok = tiny_tokenizer("chatml")
    base = tok.chat_template
    assert render.template_name(tok, base) == "base" and render.template_name(tok) == "custom"
    render.setup_template(tok, "llama2")
    assert render.template_name(tok, base) == "llama2"
    assert render.template_name(tiny_tokenizer(None)) is None
