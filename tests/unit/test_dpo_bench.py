"""bench/dpo_vs_trl.py's pure parts (issue 33): lorakit's tokenized pairs become TRL's prompt_ids/chosen_ids/
rejected_ids in lorakit's micro-batch order, TRL's own tokenization is told apart from lorakit's token by token, and
the speed counts only when every TRL arm's losses agree with lorakit's and start at ln 2."""

import math
import sys
from pathlib import Path

import datasets
import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

import dpo_vs_trl as dpo  # noqa: E402 - bench/ is not a package

from lorakit.render import IGNORE  # noqa: E402

LN2 = math.log(2)


def pair(prompt: list[int], chosen: list[int], rejected: list[int], where: str = "f.json:row 1") -> dict:
    """A pair as data.prepare's columns hold it: prompt + answer, the prompt untrained."""
    n = len(prompt)
    return {"chosen_input_ids": prompt + chosen, "chosen_labels": [IGNORE] * n + chosen,
            "rejected_input_ids": prompt + rejected, "rejected_labels": [IGNORE] * n + rejected,
            "prompt_len": n, "where": where}  # fmt: skip


def test_the_bench_ignores_what_lorakit_ignores():
    assert dpo.IGNORE == IGNORE


def test_a_pair_becomes_trl_s_columns_and_one_trl_cannot_hold_is_refused():
    assert dpo.trl_pair(pair([1, 2, 3], [4, 5, 2], [6, 2])) == {
        "prompt_ids": [1, 2, 3], "chosen_ids": [4, 5, 2], "rejected_ids": [6, 2]}  # fmt: skip
    # TRL's collator trains every answer token and none of the prompt: labels saying otherwise cannot be carried over.
    untrained_answer_token = pair([1, 2, 3], [4, 5, 2], [6, 2])
    untrained_answer_token["chosen_labels"][4] = IGNORE
    trained_prompt_token = pair([1, 2, 3], [4, 5, 2], [6, 2])
    trained_prompt_token["rejected_labels"][2] = 3
    other_prompt = pair([1, 2, 3], [4, 5, 2], [6, 2])
    other_prompt["rejected_input_ids"][0] = 9
    no_answer = pair([1, 2, 3], [4, 5, 2], [])
    for bad in (untrained_answer_token, trained_prompt_token, other_prompt, no_answer):
        with pytest.raises(ValueError, match=r"f\.json:row 1"):
            dpo.trl_pair(bad)


def test_trl_reads_the_pairs_in_lorakit_s_micro_batches_and_counts_the_same_tokens():
    ds = datasets.Dataset.from_list([pair([1] * (k + 1), [7] * (k + 2), [8, 2]) for k in range(4)])
    plan = [[[3, 1], [2, 0]], [[0, 2], [1, 3]]]  # steps of micro-batches of pair indices
    rows = dpo.trl_rows(ds, plan)
    assert [len(r["prompt_ids"]) - 1 for r in rows] == [3, 1, 2, 0, 0, 2, 1, 3]
    tokens, trained = dpo.step_tokens(ds, plan)
    # Every pair: prompt (k + 1) + chosen (k + 2) + prompt + rejected (2); trained: both answers (position 0 never).
    assert tokens == [sum(2 * (k + 1) + (k + 2) + 2 for k in range(4))] * 2
    assert trained == [sum((k + 2) + 2 for k in range(4))] * 2


def test_trl_s_own_tokens_are_told_apart_from_lorakit_s():
    ours = [{"prompt_ids": [1, 2], "chosen_ids": [3, 2], "rejected_ids": [4, 2]},  # TRL adds a separator
            {"prompt_ids": [1, 2], "chosen_ids": [5], "rejected_ids": [6]},  # the same
            {"prompt_ids": [9, 9, 1], "chosen_ids": [7], "rejected_ids": [8]},  # lorakit kept the prompt's end
            {"prompt_ids": [1, 1], "chosen_ids": [7], "rejected_ids": [8]}]  # fmt: skip
    theirs = [{"prompt_ids": [1, 2], "chosen_ids": [3, 2, 10], "rejected_ids": [4, 2, 10]},
              {"prompt_ids": [1, 2], "chosen_ids": [5], "rejected_ids": [6]},
              {"prompt_ids": [0, 9, 9, 1], "chosen_ids": [7], "rejected_ids": [8]},
              {"prompt_ids": [1, 1, 1, 1, 1], "chosen_ids": [7], "rejected_ids": [8]}]  # fmt: skip
    got = dpo.token_differences(ours, theirs, decode=lambda ids: "".join(f"<{i}>" for i in ids), max_length=5)
    assert got["sequences"] == 8 and got["identical"] == 2
    assert got["trl_trains_after_lorakit_s_end"] == {'"<10>"': 2}
    # TRL keeps a sequence's start (the whole [0, 9, 9, 1] prompt), and drops a pair whose prompt fills max_length.
    assert got["differ_otherwise"] == 4 and got["trl_would_drop_pairs"] == 1
    assert got["trained_tokens"] == {"lorakit": 2 + 2 + 1 + 1 + 1 + 1 + 1 + 1, "trl_own": 3 + 3 + 1 + 1 + 1 + 1}


def test_a_chat_goes_to_trl_with_its_tools_as_json():
    chat = {"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": "a"}],
            "rejected": [{"role": "assistant", "content": "b"}], "tools": [{"type": "function"}]}  # fmt: skip
    row = dpo.trl_chat(chat)
    assert row["prompt"] == chat["prompt"] and row["tools"] == '[{"type": "function"}]'
    assert dpo.trl_chat({**chat, "tools": None})["tools"] is None


def test_the_speed_counts_only_when_the_losses_agree_from_ln2_on():
    good = dpo.agreement([LN2, 0.68, 0.65], [LN2 + 5e-5, 0.681, 0.652])
    assert good["agree"] and good["first_is_ln2"]
    apart = dpo.agreement([LN2, 0.68, 0.60], [LN2, 0.68, 0.65])  # 8% at step 3
    assert not apart["agree"] and "does not count" in apart["verdict"]
    # Within 2% throughout, yet not ln 2 first: the adapter did not start at zero (or the reference is not the base).
    shifted = dpo.agreement([LN2 + 3e-3, 0.68], [LN2 + 3e-3, 0.68])
    assert not shifted["agree"] and not shifted["first_is_ln2"] and "ln 2" in shifted["verdict"]
    assert not dpo.agreement([LN2, 0.68], [LN2])["agree"]
    assert not dpo.agreement([], [])["agree"]


def system(speed: float, rss: float) -> dict:
    return {"trained_tokens_per_s": speed, "peak_rss_gb": rss}


def test_lorakit_is_measured_against_trl_s_faster_arm():
    out = {"systems": {"lorakit": system(300.0, 1.5), "trl": system(100.0, 2.0), "trl_precompute": system(150.0, 2.5)},
           "agreement": {"trl": {"agree": True}, "trl_precompute": {"agree": True}},
           "same_tokens_per_step": {"trl": True, "trl_precompute": True}}  # fmt: skip
    got = dpo.verdict(out)
    assert got["faster_trl_arm"] == "trl_precompute"
    assert got["lorakit_over_trl"]["trl_precompute"] == {"trained_speed": 2.0, "peak_rss": 0.6}
    assert got["targets_met"] == {"trained_speed": True, "peak_rss": True} and got["counts"]
    out["systems"]["lorakit"] = system(200.0, 2.2)  # 1.33x, 0.88x
    got = dpo.verdict(out)
    assert got["targets_met"] == {"trained_speed": False, "peak_rss": False}
    out["agreement"]["trl"]["agree"] = False
    assert not dpo.verdict(out)["counts"] and "does not count" in dpo.verdict(out)["verdict"]
    out["agreement"]["trl"]["agree"], out["same_tokens_per_step"]["trl_precompute"] = True, False
    assert not dpo.verdict(out)["counts"]
