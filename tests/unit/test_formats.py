"""Format detection and conversion, on real rows of the shared data sets."""

import json

import pyarrow.parquet as pq
import pytest

from lorakit import formats, sources
from lorakit.config import TemplateConfig
from lorakit.errors import LorakitError


def first_rows(path, n=5):
    rows = sources.read(str(path), limit=n)
    return rows.records, rows.where


def roles(ex):
    return [m["role"] for m in ex["messages"]]


def test_alpaca_with_and_without_input(shared_data):
    records, where = first_rows(shared_data / "alpaca" / "alpaca_5000.json", 50)
    conv = formats.convert(records, where)
    assert conv.format == "alpaca"
    with_input = next(i for i, r in enumerate(records) if r["input"])
    ex = conv.examples[with_input]
    assert roles(ex) == ["user", "assistant"]
    assert ex["messages"][0]["content"] == records[with_input]["instruction"] + "\n\n" + records[with_input]["input"]
    assert ex["messages"][1]["content"] == records[with_input]["output"]


def test_gpteacher_response_column(shared_data):
    records, where = first_rows(shared_data / "gpteacher" / "codegen-instruct.json")
    conv = formats.convert(records, where)
    assert conv.format == "alpaca"
    assert conv.examples[0]["messages"][-1]["content"] == records[0]["response"]


def test_guanaco_three_forms_give_the_same_chats(shared_data):
    g = shared_data / "guanaco"
    by_form = {}
    for name in ("guanaco-llama2-1k-train.parquet", "guanaco_1k_human_assistant.jsonl", "guanaco_1k_messages.jsonl"):
        records, where = first_rows(g / name, 30)
        conv = formats.convert(records, where)
        by_form[name] = conv
    assert by_form["guanaco-llama2-1k-train.parquet"].format == "chat_text"
    assert by_form["guanaco_1k_human_assistant.jsonl"].format == "chat_text"
    assert by_form["guanaco_1k_messages.jsonl"].format == "messages"
    msgs = [[ex["messages"] for ex in c.examples] for c in by_form.values()]
    # The transcripts differ only in whitespace around turns, which the parsers strip.
    strip = lambda chats: [[(m["role"], m["content"].strip()) for m in c] for c in chats]  # noqa: E731
    assert strip(msgs[0]) == strip(msgs[1]) == strip(msgs[2])
    assert any(len(m) > 2 for m in msgs[0]), "multi-turn rows exist in the first 30"


def test_sharegpt_multi_turn(shared_data):
    records, where = first_rows(shared_data / "sharegpt" / "sharegpt_v3_first1000.json", 10)
    conv = formats.convert(records, where)
    assert conv.format == "sharegpt"
    ex = conv.examples[0]
    assert set(roles(ex)) <= {"user", "assistant"} and roles(ex).count("assistant") >= 1
    assert ex["messages"][0]["content"] == records[0]["conversations"][0]["value"]


def test_sharegpt_glaive_tool_calls(shared_data):
    records, where = first_rows(shared_data / "sharegpt" / "glaive_toolcall_en_demo.json", 5)
    conv = formats.convert(records, where)
    ex = conv.examples[0]
    assert ex["tools"] and ex["tools"][0]["name"] == "search_recipes"
    call_turn = next(m for m in ex["messages"] if "<tool_call>" in m["content"])
    assert call_turn["role"] == "assistant"
    call = json.loads(call_turn["content"].removeprefix("<tool_call>\n").removesuffix("\n</tool_call>"))
    assert call["name"] == "search_recipes"
    assert "tool" in roles(ex)  # the observation turn, never trained


def test_paradetox_template(shared_data):
    records, where = first_rows(shared_data / "paradetox" / "paradetox.tsv")
    t = TemplateConfig(prompt="Rewrite politely: {toxic}", completion="{neutral1}", system="You detoxify text.")
    conv = formats.convert(records, where, template=t)
    assert conv.format == "template"
    assert conv.examples[0]["messages"] == [
        {"role": "system", "content": "You detoxify text."},
        {"role": "user", "content": "Rewrite politely: " + records[0]["toxic"]},
        {"role": "assistant", "content": records[0]["neutral1"]},
    ]


def test_template_empty_completion_rows_are_dropped_and_counted(shared_data):
    records, where = first_rows(shared_data / "paradetox" / "paradetox.tsv", 400)
    conv = formats.convert(records, where, template=TemplateConfig(prompt="{toxic}", completion="{neutral3}"))
    empty = sum(1 for r in records if not r["neutral3"].strip())
    assert empty > 0 and conv.dropped["empty completion"] == empty
    assert len(conv.examples) == len(records) - empty


def test_wikisql_text_is_plain_text(shared_data):
    records, where = first_rows(shared_data / "sql" / "wikisql_mlx" / "train.jsonl")
    conv = formats.convert(records, where)
    assert conv.format == "text" and conv.examples[0] == {"text": records[0]["text"]}


def test_wikisql_qa_text_is_a_question_and_its_sql_under_chat_text(shared_data):
    """mlx-lm's WikiSQL rows (the bloom-1b1-sql twin's data) parse into the table and question, then the SQL."""
    records, where = first_rows(shared_data / "sql" / "wikisql_mlx" / "train.jsonl", 300)
    conv = formats.convert(records, where, fmt="chat_text")
    assert len(conv.examples) == len(records) and not conv.dropped, "every row is a Q/A transcript"
    user, answer = conv.examples[0]["messages"]
    preamble, question = records[0]["text"].split("\nQ: ")
    assert user == {"role": "user", "content": f"{preamble}\n{question.split(chr(10) + 'A: ')[0].strip()}"}
    assert answer["role"] == "assistant" and answer["content"] == records[0]["text"].rsplit("A: ", 1)[1].strip()
    assert answer["content"].startswith("SELECT ")


def test_qa_transcripts_must_alternate_and_answer():
    assert formats.parse_transcript("Q: 2+2?\nA: 4\nQ: and 3+3?\nA: 6", qa=True) == [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "and 3+3?"},
        {"role": "assistant", "content": "6"},
    ]
    for text in ("Q: no answer", "A: no question\nQ: x", "Q: a\nQ: b\nA: c", "Q: empty answer\nA: "):
        assert formats.parse_transcript(text, qa=True) is None, text
    assert formats.parse_transcript("Q: 2+2?\nA: 4") is None, "only when asked: auto keeps such text plain"


def test_a_missing_quickstart_file_says_how_to_make_it(tmp_path):
    missing = tmp_path / "quickstart-data" / "train.jsonl"
    with pytest.raises(LorakitError, match=f"`lorakit quickstart data {tmp_path / 'quickstart-data'}` writes it"):
        sources.read(str(missing))
    with pytest.raises(LorakitError, match="data file not found") as other:
        sources.read(str(tmp_path / "mine" / "train.jsonl"))
    assert "lorakit quickstart data" not in str(other.value), "only the quickstart's own folder gets that hint"


def test_prompt_completion_and_messages_with_system():
    recs = [{"prompt": "2+2?", "completion": "4"}]
    assert formats.convert(recs, ["r:1"]).examples[0]["messages"] == [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
    ]
    msgs = [
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello"},
            ]
        }
    ]
    assert roles(formats.convert(msgs, ["r:1"]).examples[0]) == ["system", "user", "assistant"]
    added = formats.convert([{"prompt": "a", "completion": "b"}], ["r:1"], system_prompt="S")
    assert added.examples[0]["messages"][0] == {"role": "system", "content": "S"}


def test_undetectable_format_lists_columns_and_formats():
    with pytest.raises(LorakitError) as e:
        formats.convert([{"question": "q", "answer": "a"}], ["f.jsonl:1"])
    msg = str(e.value)
    assert "f.jsonl:1" in msg and "['answer', 'question']" in msg
    for accepted in ("messages", "conversations", "Alpaca", "prompt+completion", "text", "template"):
        assert accepted in msg


@pytest.mark.parametrize(
    "rows, pattern",
    [
        ([{"instruction": "a", "output": "b"}, {"instruction": "c"}], r"f:2: missing field 'output'"),
        ([{"instruction": "a", "output": "b"}, {"instruction": "c", "output": 3}], r"f:2: field 'output' must be str"),
        (
            [{"messages": [{"role": "user", "content": "x"}, {"role": "robot", "content": "y"}]}],
            r"f:1: messages\[1\]\.role 'robot'",
        ),
        ([{"messages": "hello"}], r"f:1: field 'messages' must be list"),
        ([{"conversations": [{"from": "alien", "value": "x"}]}], r"f:1: conversations\[0\]\.from 'alien' is unknown"),
    ],
)
def test_malformed_rows_name_the_row(rows, pattern):
    with pytest.raises(LorakitError, match=pattern):
        formats.convert(rows, [f"f:{i + 1}" for i in range(len(rows))])


def test_template_naming_a_missing_column():
    t = TemplateConfig(prompt="{question} {contxt}", completion="{answer}")
    with pytest.raises(LorakitError, match=r"data.template.prompt names column\(s\) \['contxt'\].*columns found"):
        formats.convert([{"question": "q", "context": "c", "answer": "a"}], ["f:1"], template=t)


def test_rows_without_an_answer_are_dropped():
    conv = formats.convert([{"prompt": "a", "completion": ""}, {"prompt": "b", "completion": "c"}], ["f:1", "f:2"])
    assert len(conv.examples) == 1 and conv.dropped == {"no assistant answer": 1}


def test_llama2_parquet_transcript_with_system(tmp_path):
    import pyarrow as pa

    text = "<s>[INST] <<SYS>>\nBe kind.\n<</SYS>>\n\nHi [/INST] Hello! </s><s>[INST] Bye [/INST] Bye! </s>"
    pq.write_table(pa.Table.from_pylist([{"text": text}]), tmp_path / "d.parquet")
    rows = sources.read(str(tmp_path / "d.parquet"))
    ex = formats.convert(rows.records, rows.where).examples[0]
    assert ex["messages"] == [
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Bye!"},
    ]
