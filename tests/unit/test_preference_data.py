"""Preference data (objective dpo, orpo, kto): every form read from a real file, masks, truncation, cache, and every
refusal as one message naming the file, row and key; the config keys of preference training and adapter.init."""

import csv
import hashlib
import json
from pathlib import Path

import pytest
import yaml
from peft import IA3Config, LoraConfig

from lorakit import cli, config, data, preference, preview, render
from lorakit.adapter import init_adapter
from lorakit.config import DataConfig, PreferenceConfig
from lorakit.errors import LorakitError
from lorakit.run_folder import RunFolder
from tiny import tiny_tokenizer

END = "<|im_end|>"  # the tiny ChatML template's end of turn: trained with every answer
ROLES = {"human": "user", "gpt": "assistant", "system": "system"}


def write_json(path: Path, rows: list) -> Path:
    path.write_text(json.dumps(rows, ensure_ascii=False))
    return path


def prepare(path: Path, tmp_path: Path, objective: str = "dpo", **data_keys):
    data_keys.setdefault("max_length", 4096)
    cfg = DataConfig(train=str(path), cache_dir=str(tmp_path / "cache"), **data_keys)
    return data.prepare(cfg, tiny_tokenizer(), objective=objective)


def trained(tok, ids: list[int], labels: list[int]) -> str:
    return tok.decode([t for t, lab in zip(ids, labels) if lab != render.IGNORE])


def real_pairs(shared: Path, n: int, multi_turn: bool = False) -> list[tuple[list[dict], str, str]]:
    """(prompt messages, chosen, rejected) of the first n rows of the real dpo_en_demo.json: single-turn rows
    without a system turn, or rows whose prompt holds earlier turns."""
    rows = json.loads((shared / "preference" / "dpo_en_demo.json").read_text())
    out = []
    for r in rows:
        turns = r["conversations"]
        if (len(turns) > 1 and turns[0]["from"] == "human") if multi_turn else len(turns) == 1:
            prompt = [{"role": ROLES[t["from"]], "content": t["value"]} for t in turns]
            out.append((prompt, r["chosen"]["value"], r["rejected"]["value"]))
    return out[:n]


def check_pairs(p, expected: list[tuple[list[dict], str, str]], strip: bool = False) -> None:
    """Each prepared pair: one prompt shared by both sequences, untrained, ending with the last user turn and the
    generation prompt; only each answer and its end-of-turn token trained."""
    tok = tiny_tokenizer()
    assert len(p.train) == len(expected)
    for row, (prompt, chosen, rejected) in zip(p.train, expected):
        n = row["prompt_len"]
        assert row["chosen_input_ids"][:n] == row["rejected_input_ids"][:n]
        assert set(row["chosen_labels"][:n]) == set(row["rejected_labels"][:n]) == {render.IGNORE}
        text = tok.decode(row["chosen_input_ids"][:n])
        assert text.endswith(
            f"{prompt[-1]['content'].strip() if strip else prompt[-1]['content']}{END}\n<|im_start|>assistant\n"
        )
        if not row["truncated"]:
            for side, answer in (("chosen", chosen), ("rejected", rejected)):
                answer = answer.strip() if strip else answer
                assert trained(tok, row[f"{side}_input_ids"], row[f"{side}_labels"]) == answer + END
                assert row[f"{side}_input_ids"][-1] == tok.convert_tokens_to_ids(END), "nothing after the answer"
    assert sum(not t for t in p.train["truncated"]) >= len(expected) // 2, "most rows checked whole"


# ---- every form, from real files ----
def test_llamafactory_sharegpt_pairs_real_file(shared_data, tmp_path):
    path = shared_data / "preference" / "dpo_en_demo.json"
    p = prepare(path, tmp_path, limit=8)
    assert p.stats["format"] == "preference (sharegpt)" and p.stats["rows"] == 8 and p.stats["sequences"] == 16
    rows = json.loads(path.read_text())[:8]
    expected = [
        (
            [{"role": ROLES[t["from"]], "content": t["value"]} for t in r["conversations"]],
            r["chosen"]["value"],
            r["rejected"]["value"],
        )
        for r in rows
    ]
    check_pairs(p, expected)
    with_system = next(i for i, r in enumerate(rows) if r["conversations"][0]["from"] == "system")
    assert tiny_tokenizer().decode(p.train[with_system]["chosen_input_ids"]).startswith("<|im_start|>system\n")


def test_kto_messages_real_file(shared_data, tmp_path):
    path = shared_data / "preference" / "kto_en_demo.json"
    p = prepare(path, tmp_path, objective="kto", limit=10)
    rows = json.loads(path.read_text())[:10]
    assert p.stats["format"] == "kto (messages)" and p.train.column_names[:4] == [
        "where",
        "input_ids",
        "labels",
        "label",
    ]
    assert p.train["label"] == [r["label"] for r in rows]
    assert p.stats["desirable"] == sum(r["label"] for r in rows) and p.stats["undesirable"] == 10 - p.stats["desirable"]
    tok = tiny_tokenizer()
    for row, r in zip(p.train, rows):
        if not row["truncated"]:
            # The earlier assistant turns of the chat are prompt: only its last answer is judged and trained.
            assert trained(tok, row["input_ids"], row["labels"]) == r["messages"][-1]["content"] + END


def test_kto_prompt_completion_label_from_real_rows(shared_data, tmp_path):
    rows = json.loads((shared_data / "preference" / "kto_en_demo.json").read_text())
    single = [r for r in rows if len(r["messages"]) == 2][:6]
    path = tmp_path / "kto.jsonl"
    path.write_text(
        "".join(
            json.dumps(
                {"prompt": r["messages"][0]["content"], "completion": r["messages"][1]["content"], "label": r["label"]}
            )
            + "\n"
            for r in single
        )
    )
    p = prepare(path, tmp_path, objective="kto")
    assert p.stats["format"] == "kto (prompt_completion)" and p.train["label"] == [r["label"] for r in single]
    tok = tiny_tokenizer()
    for row, r in zip(p.train, single):
        assert tok.decode(row["input_ids"][: row["prompt_len"]]).endswith(
            r["messages"][0]["content"] + END + "\n<|im_start|>assistant\n"
        )
        if not row["truncated"]:
            assert trained(tok, row["input_ids"], row["labels"]) == r["messages"][1]["content"] + END


def _hh(prompt: list[dict], answer: str) -> str:
    return "".join(f"\n\n{'Human' if m['role'] == 'user' else 'Assistant'}: {m['content']}" for m in prompt) + (
        f"\n\nAssistant: {answer}"
    )


# TRL's and LLaMA-Factory's pair forms, each written in its shape from the real dpo_en_demo.json rows.
DERIVED = {
    "trl_standard": ("prompt", False, lambda p, c, r: {"prompt": p[-1]["content"], "chosen": c, "rejected": r}),
    "trl_conversational": (
        "prompt",
        True,
        lambda p, c, r: {
            "prompt": p,
            "chosen": [{"role": "assistant", "content": c}],
            "rejected": [{"role": "assistant", "content": r}],
        },
    ),
    "implicit_chats": (
        "implicit",
        True,
        lambda p, c, r: {
            "chosen": [*p, {"role": "assistant", "content": c}],
            "rejected": [*p, {"role": "assistant", "content": r}],
        },
    ),
    "implicit_hh_text": ("implicit", False, lambda p, c, r: {"chosen": _hh(p, c), "rejected": _hh(p, r)}),
    "alpaca": (
        "alpaca",
        False,
        lambda p, c, r: {"instruction": p[-1]["content"], "input": "", "chosen": c, "rejected": r},
    ),
}


@pytest.mark.parametrize("shape", DERIVED)
def test_pair_forms_from_real_rows(shared_data, tmp_path, shape):
    form, multi_turn, make = DERIVED[shape]
    pairs = real_pairs(shared_data, 4, multi_turn)
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(make(*pair), ensure_ascii=False) + "\n" for pair in pairs))
    p = prepare(path, tmp_path)
    assert p.stats["format"] == f"preference ({form})"
    check_pairs(p, pairs, strip=shape == "implicit_hh_text")  # HH's text form keeps no edge whitespace
    if multi_turn:  # the earlier answers are context, never trained
        tok = tiny_tokenizer()
        history = pairs[0][0][1]["content"]
        assert history in tok.decode(p.train[0]["chosen_input_ids"])
        assert history not in trained(tok, p.train[0]["chosen_input_ids"], p.train[0]["chosen_labels"])


# ---- masks and truncation ----
def test_only_the_answer_and_its_end_token_are_trained(tmp_path):
    row = {
        "prompt": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "What is the capital of France?"},
            {"role": "assistant", "content": "Paris."},
            {"role": "user", "content": "And how many days are in a week?"},
        ],
        "chosen": [{"role": "assistant", "content": "There are seven days in a week."}],
        "rejected": [{"role": "assistant", "content": "The weather is sunny."}],
    }
    p = prepare(write_json(tmp_path / "p.json", [row]), tmp_path)
    tok, r = tiny_tokenizer(), p.train[0]
    assert trained(tok, r["chosen_input_ids"], r["chosen_labels"]) == "There are seven days in a week." + END
    assert trained(tok, r["rejected_input_ids"], r["rejected_labels"]) == "The weather is sunny." + END
    # Labels are unshifted (the target of each position is its own token) and start right after the prompt.
    assert r["chosen_labels"][r["prompt_len"] :] == r["chosen_input_ids"][r["prompt_len"] :]
    assert r["chosen_input_ids"][: r["prompt_len"]] == render.prompt_ids(tok, row["prompt"])
    assert p.stats["trained_tokens"] == sum(len(r[f"{s}_input_ids"]) - r["prompt_len"] for s in ("chosen", "rejected"))


def long_pair(prompt_words: int, answer_words: int, rejected: str = "No.") -> dict:
    words = ["the", "quick", "brown", "fox", "jumps", "over", "the", "lazy", "dog"]
    prompt = "START " + " ".join(words[i % 9] for i in range(prompt_words)) + " What is the capital of France?"
    answer = "Paris. " + " ".join(words[i % 9] for i in range(answer_words)) + " END"
    return {"prompt": prompt, "chosen": answer, "rejected": rejected}


def test_truncation_keeps_the_prompt_end_and_counts(tmp_path):
    rows = [
        long_pair(2, 2),  # fits
        long_pair(200, 200),  # both too long: answer cut to 64 - 24, the prompt to 24 tokens, its end kept
        long_pair(2, 200),  # a short prompt leaves its room to the answer
        long_pair(2, 200, rejected=long_pair(2, 200)["chosen"].replace("END", "FIN")),  # differ past the cut
    ]
    p = prepare(write_json(tmp_path / "p.json", rows), tmp_path, max_length=64)
    assert p.stats["max_prompt_length"] == 32  # default: half of max_length
    tok = tiny_tokenizer()
    fits, cut, short_prompt = p.train[0], p.train[1], p.train[2]
    assert not fits["truncated"] and cut["truncated"] and short_prompt["truncated"]
    assert p.stats["truncated_rows"] == 2
    assert p.stats["dropped"] == {"chosen and rejected identical within data.max_length": 1} and p.stats["rows"] == 3
    for r in (cut, short_prompt):
        assert len(r["chosen_input_ids"]) == 64 and len(r["rejected_input_ids"]) <= 64
    prompt = tok.decode(cut["chosen_input_ids"][: cut["prompt_len"]])
    assert cut["prompt_len"] == 32 and "START" not in prompt
    assert prompt.endswith(f"What is the capital of France?{END}\n<|im_start|>assistant\n"), prompt
    answer = trained(tok, cut["chosen_input_ids"], cut["chosen_labels"])
    assert answer.startswith("Paris.") and not answer.endswith(END), "an answer loses its end"
    assert trained(tok, cut["rejected_input_ids"], cut["rejected_labels"]) == "No." + END
    whole_prompt = tok.decode(short_prompt["chosen_input_ids"][: short_prompt["prompt_len"]])
    assert whole_prompt.startswith("<|im_start|>user\nSTART") and short_prompt["prompt_len"] < 32
    assert len(short_prompt["chosen_input_ids"]) - short_prompt["prompt_len"] > 64 - 32


def test_max_prompt_length_setting(tmp_path):
    path = write_json(tmp_path / "p.json", [long_pair(200, 200)])
    cfg = DataConfig(train=str(path), max_length=64, cache_dir=str(tmp_path / "c"))
    p = data.prepare(cfg, tiny_tokenizer(), objective="dpo", preference=PreferenceConfig(max_prompt_length=10))
    assert p.train[0]["prompt_len"] == 10 and p.stats["max_prompt_length"] == 10
    assert len(p.train[0]["chosen_input_ids"]) == 64


# ---- the cache ----
def test_second_prepare_is_a_cache_hit(tmp_path, monkeypatch):
    rows = [long_pair(3, 3), long_pair(4, 1), long_pair(1, 6)]
    cfg = DataConfig(train=str(write_json(tmp_path / "p.json", rows)), cache_dir=str(tmp_path / "c"), max_length=64)
    first = data.prepare(cfg, tiny_tokenizer(), objective="dpo")
    assert not first.cache_hit

    def boom(*a, **k):
        raise AssertionError("tokenized again")

    monkeypatch.setattr(preference, "encode", boom)
    second = data.prepare(cfg, tiny_tokenizer(), objective="dpo")
    assert second.cache_hit and second.stats == first.stats
    assert second.train["chosen_input_ids"] == first.train["chosen_input_ids"]
    assert data.prepare(cfg, tiny_tokenizer(), objective="orpo").cache_hit, "the same tokens as dpo"
    monkeypatch.undo()
    assert not data.prepare(cfg, tiny_tokenizer(), "dpo", PreferenceConfig(max_prompt_length=8)).cache_hit


def test_sft_cache_key_is_unchanged(tmp_path):
    # Existing caches of sft runs stay valid: the key is the one computed before objectives existed.
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n")
    cfg = DataConfig(train=str(f), cache_dir=str(tmp_path / "c"))
    tok = tiny_tokenizer()
    p = data.prepare(cfg, tok)
    settings = cfg.model_dump(mode="json", exclude={"train", "cache_dir", "num_proc"})
    rows = data.sources.read(cfg.train)
    h = hashlib.sha256(json.dumps([data.CACHE_VERSION, settings, rows.fingerprint, None], sort_keys=True).encode())
    h.update(data.tokenizer_fingerprint(tok).encode())
    assert p.cache_path.name == h.hexdigest()[:24]


# ---- held-out pairs ----
def test_held_out_pairs_are_prepare_s_eval_split(tmp_path):
    rows = [long_pair(i % 4, i % 5) for i in range(10)]
    for i, r in enumerate(rows):
        r["prompt"] += f" ({i})"
    cfg = DataConfig(train=str(write_json(tmp_path / "p.json", rows)), eval=0.3, cache_dir=str(tmp_path / "c"))
    p = data.prepare(cfg, tiny_tokenizer(), objective="dpo")
    held = data.held_out_preference(cfg, tiny_tokenizer(), "dpo", None)
    assert held["where"] == p.eval["where"] and held["chosen_input_ids"] == p.eval["chosen_input_ids"]
    chats = data.held_out(cfg, objective="dpo")
    assert chats.where == p.eval["where"]
    prompt, reference = render.split(chats.examples[0]["messages"])
    index = int(p.eval["where"][0].rsplit(" ", 1)[1]) - 1
    assert prompt[-1]["content"] == rows[index]["prompt"] and reference == rows[index]["chosen"]


# ---- refusals: one message naming the file, row and key ----
def test_identical_chosen_and_rejected(tmp_path):
    rows = [long_pair(1, 1), {"prompt": "Hi", "chosen": "Same.", "rejected": "Same."}]
    path = write_json(tmp_path / "p.json", rows)
    with pytest.raises(LorakitError, match=r"p\.json:row 2: 'chosen' and 'rejected' are the same answer"):
        prepare(path, tmp_path)


@pytest.mark.parametrize(
    "row, key",
    [
        ({"prompt": "", "chosen": "a", "rejected": "b"}, "prompt"),
        ({"prompt": [], "chosen": "a", "rejected": "b"}, "prompt"),
        (
            {"conversations": [], "chosen": {"from": "gpt", "value": "a"}, "rejected": {"from": "gpt", "value": "b"}},
            "conversations",
        ),
        ({"instruction": " ", "chosen": "a", "rejected": "b"}, "instruction"),
    ],
)
def test_a_row_with_no_prompt(tmp_path, row, key):
    path = write_json(tmp_path / "p.json", [row])
    with pytest.raises(LorakitError, match=rf"p\.json:row 1: no prompt: '{key}' is missing or empty"):
        prepare(path, tmp_path)


def test_implicit_chats_sharing_no_prompt(tmp_path):
    row = {
        "chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
        "rejected": [{"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}],
    }
    with pytest.raises(LorakitError, match=r"row 1: no prompt: 'chosen' and 'rejected' share no turn"):
        prepare(write_json(tmp_path / "p.json", [row]), tmp_path)
    text = {"chosen": "Paris.", "rejected": "Rome."}
    with pytest.raises(LorakitError, match=r"row 1: no prompt: the row has no 'prompt' column and 'chosen' is text"):
        prepare(write_json(tmp_path / "t.json", [text]), tmp_path)


def test_kto_data_with_a_pair_objective_and_pairs_with_kto(shared_data, tmp_path):
    kto = shared_data / "preference" / "kto_en_demo.json"
    with pytest.raises(LorakitError, match=r"kto_en_demo\.json:row 1: .*'label'.*Set objective: kto") as e:
        prepare(kto, tmp_path, objective="dpo", limit=2)
    assert "objective dpo" in str(e.value)
    pairs = shared_data / "preference" / "dpo_en_demo.json"
    with pytest.raises(LorakitError, match=r"dpo_en_demo\.json:row 1: this data holds pairs.*objective: dpo or orpo"):
        prepare(pairs, tmp_path, objective="kto", limit=2)
    # Without an objective, the pairs are not sft data: the message says what to set.
    with pytest.raises(LorakitError, match=r"set objective: dpo or orpo"):
        prepare(pairs, tmp_path, objective="sft", limit=2)


def test_kto_label_must_be_true_or_false(tmp_path):
    path = tmp_path / "k.csv"
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerows([["prompt", "completion", "label"], ["Hi", "Hello!", "True"], ["Hi", "Go away.", "maybe"]])
    with pytest.raises(LorakitError, match=r"k\.csv:3: field 'label' must be true .* got \"maybe\""):
        prepare(path, tmp_path, objective="kto")
    with path.open("w", newline="") as f:
        csv.writer(f).writerows([["prompt", "completion", "label"], ["Hi", "Hello!", "True"], ["Hi", "No.", "false"]])
    assert prepare(path, tmp_path, objective="kto").train["label"] == [True, False], "CSV values are text"


def test_a_prompt_ending_with_the_assistant_and_a_chosen_user_turn(tmp_path):
    row = {
        "prompt": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
        "chosen": "c",
        "rejected": "d",
    }
    with pytest.raises(LorakitError, match=r"row 1: the prompt \('prompt'\) ends with a assistant turn"):
        prepare(write_json(tmp_path / "p.json", [row]), tmp_path)
    row = {"prompt": "a", "chosen": [{"role": "user", "content": "c"}], "rejected": "d"}
    with pytest.raises(LorakitError, match=r"row 1: chosen\[0\] is a user turn"):
        prepare(write_json(tmp_path / "q.json", [row]), tmp_path)


def config_error(raw: dict) -> str:
    raw.setdefault("data", {"train": "x.jsonl"})
    with pytest.raises(LorakitError) as e:
        config.validate(raw, source="run.yaml")
    return str(e.value)


def test_preference_keys_in_the_config():
    cfg = config.validate({"objective": "orpo", "data": {"train": "x"}, "preference": {"orpo_lambda": 0.2}})
    assert cfg.preference.orpo_lambda == 0.2 and cfg.preference.beta == 0.1
    assert config.validate({"objective": "dpo", "data": {"train": "x"}}).preference == PreferenceConfig()
    assert "preference.beta: applies to objective dpo and kto, not orpo" in config_error(
        {"objective": "orpo", "preference": {"beta": 0.5}}
    )
    assert "preference.desirable_weight: applies to objective kto, not dpo" in config_error(
        {"objective": "dpo", "preference": {"desirable_weight": 2}}
    )
    assert "preference.label_smoothing: applies to loss: sigmoid, not ipo" in config_error(
        {"objective": "dpo", "preference": {"loss": "ipo", "label_smoothing": 0.1}}
    )
    assert "preference.max_prompt_length: must be below data.max_length (64)" in config_error(
        {"objective": "dpo", "data": {"train": "x", "max_length": 64}, "preference": {"max_prompt_length": 64}}
    )
    assert "preference.bta: unknown key" in config_error({"objective": "dpo", "preference": {"bta": 0.5}})
    assert "preference: these settings are for preference training" in config_error({"preference": {"beta": 0.5}})
    assert "data.format: objective kto reads rows labelled good or bad" in config_error(
        {"objective": "kto", "data": {"train": "x", "format": "preference"}}
    )
    assert "data.train_on: objective dpo compares the answers only" in config_error(
        {"objective": "dpo", "data": {"train": "x", "train_on": "all"}}
    )
    assert "objective: Input should be 'sft', 'dpo', 'orpo' or 'kto'" in config_error({"objective": "ppo"})


def test_config_yaml_round_trip_and_sft_as_before(tmp_path):
    cfg = config.validate({"objective": "kto", "data": {"train": "x"}, "preference": {"undesirable_weight": 1.5}})
    config.dump(cfg, tmp_path / "kto.yaml")
    assert config.load(tmp_path / "kto.yaml") == cfg
    # An sft run's config.yaml has no key it did not have before objectives: older runs still --resume.
    config.dump(config.validate({"data": {"train": "x"}}), tmp_path / "sft.yaml")
    saved = yaml.safe_load((tmp_path / "sft.yaml").read_text())
    assert "objective" not in saved and "preference" not in saved and "init" not in saved["adapter"]


def test_bad_combination_is_exit_2_in_the_cli(tmp_path, tiny_llama_dir, shared_data, capsys):
    run = tmp_path / "run.yaml"
    kto = str(shared_data / "preference" / "kto_en_demo.json")
    run.write_text(
        yaml.safe_dump(
            {"model": str(tiny_llama_dir), "objective": "dpo", "data": {"train": kto, "cache_dir": str(tmp_path / "c")}}
        )
    )
    assert cli.main(["data", "preview", str(run)]) == 2
    err = capsys.readouterr().err
    assert "kto_en_demo.json:row 1" in err and "Set objective: kto" in err and "Traceback" not in err


# ---- preview ----
def test_preview_shows_a_pair_with_its_trained_tokens(tmp_path, tiny_llama_dir, capsys):
    rows = [{"prompt": "What is the capital of France?", "chosen": "Paris.", "rejected": "Rome."}] * 2
    run = tmp_path / "run.yaml"
    run.write_text(
        yaml.safe_dump(
            {
                "model": str(tiny_llama_dir),
                "objective": "dpo",
                "data": {"train": str(write_json(tmp_path / "p.json", rows)), "cache_dir": str(tmp_path / "c")},
            }
        )
    )
    assert cli.main(["data", "preview", str(run), "-n", "1", "--no-color"]) == 0
    out = capsys.readouterr().out
    assert out.count("──── pair") == 1
    assert f"── chosen ──\n[[Paris.{END}]]\n── rejected ──\n[[Rome.{END}]]" in out
    assert "What is the capital of France?" in out.split("── chosen")[0]
    for line in ("objective       dpo", "pairs           2", "truncated pairs 0", "pairs dropped   none"):
        assert line in out
    stats = data.prepare(
        DataConfig(train=str(tmp_path / "p.json"), cache_dir=str(tmp_path / "c")), tiny_tokenizer(), "dpo"
    ).stats
    assert preview.warnings({**stats, "truncated_rows": 1})[-1].startswith("1 pairs are longer than max_length")


# ---- adapter.init ----
def test_adapter_init_is_checked_against_the_base(tmp_path):
    LoraConfig(r=4, target_modules=["q_proj"], base_model_name_or_path="some/base").save_pretrained(tmp_path / "a")
    assert init_adapter(tmp_path / "a", "some/base") == tmp_path / "a"
    with pytest.raises(
        LorakitError,
        match=r"adapter\.init: .*a was trained on 'some/base', not on the base 'other/"
        r"model'.*Set model: to the base it was trained on",
    ):
        init_adapter(tmp_path / "a", "other/model")
    run = RunFolder(tmp_path / "run")
    run.root.mkdir()
    run.config.write_text(yaml.safe_dump({"model": "some/base", "data": {"train": "x"}}))
    LoraConfig(r=4, target_modules=["q_proj"]).save_pretrained(run.adapter)  # names no base: its run does
    assert init_adapter(run.root, "some/base") == run.adapter
    with pytest.raises(LorakitError, match="not on the base 'other/model'"):
        init_adapter(run.root, "other/model")
    IA3Config(target_modules=["q_proj"], feedforward_modules=[]).save_pretrained(tmp_path / "ia3")
    with pytest.raises(LorakitError, match="is a IA3 adapter; lorakit trains LoRA adapters only"):
        init_adapter(tmp_path / "ia3", "some/base")
    with pytest.raises(LorakitError, match=r"no adapter_config\.json there"):
        init_adapter(tmp_path / "nothing", "some/base")
    assert "adapter.init: full fine-tuning trains the model itself" in config_error(
        {"method": "full", "adapter": {"init": str(run.root)}}
    )
    cfg = config.validate({"data": {"train": "x"}, "adapter": {"init": "runs/sft"}})
    assert cfg.adapter.init == "runs/sft" and cfg.model_dump()["adapter"]["init"] == "runs/sft"
