"""bench/preference_quality.py's pure parts (issue 33 item 8): ParaDetox rows become pairs lorakit reads as the detox
prompt with the polite rewrite chosen over the toxic input, near-copies are left out and held-out rows never train,
an output repeating the toxic input is told from a rewrite, and lorakit's DPO is checked against TRL's within the
larger spread."""

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

import preference_quality as pq  # noqa: E402 - bench/ is not a package
import quality_vs_trl as qv  # noqa: E402

from lorakit import preference  # noqa: E402

TOXIC = "im not gonna sell the fucking picture , i just want to contribute to the fucking article ."
POLITE = "I'm not gonna sell the picture, i just want to contribute to the article."


def row(toxic: str, neutral: str) -> dict:
    return {"toxic": toxic, "neutral1": neutral, "neutral2": "", "neutral3": ""}


def test_a_row_becomes_a_pair_lorakit_reads_as_the_detox_prompt_with_the_rewrite_chosen_over_the_input():
    pair = pq.to_pair(row(TOXIC, POLITE))
    conv = preference.convert([pair], ["pairs.jsonl:row 1"], "dpo")
    assert conv.format == "preference (prompt)"
    (got,) = conv.examples
    # The prompt quality_vs_trl's detox SFT trains on, so that SFT, DPO and ORPO see the same prompts.
    assert got["prompt"] == [{"role": "user", "content": f"Rewrite politely: {TOXIC}"}]
    assert got["prompt"] + got["chosen"] == qv.paradetox_chat(row(TOXIC, POLITE))["prompt"] + [
        {"role": "assistant", "content": POLITE}
    ]
    assert got["rejected"] == [{"role": "assistant", "content": TOXIC}]


def test_an_output_repeating_the_toxic_input_is_told_from_a_rewrite():
    assert pq.repeats(TOXIC, TOXIC)
    # Case and the data set's spaces before punctuation do not make a copy polite; nor does a preamble before it.
    assert pq.repeats("Im not gonna sell the fucking picture, i just want to contribute to the fucking article.", TOXIC)
    assert pq.repeats(f"Sure! Here is a polite rewrite: {TOXIC}", TOXIC)
    assert not pq.repeats(POLITE, TOXIC)  # two words out of a long sentence
    assert not pq.repeats("he was brave too!", "he had steel balls too !")
    assert not pq.repeats("", TOXIC)


def test_near_copies_are_left_out_and_held_out_rows_are_the_last_never_trained_on():
    table = [row(f"toxic text number {i} you idiot", f"text number {i}") for i in range(10)]
    table[1] = row("you are a stupid idiot", "You are a stupid idiot.")  # the annotator copied: a pair of one answer
    table[8] = row(table[2]["toxic"], "another rewrite")  # the same toxic text as a training row
    train, held_out, left_out = pq.split_rows(table, sft_rows=3, eval_rows=2)
    assert left_out == 1
    assert [r["toxic"] for r in train] == [table[i]["toxic"] for i in (0, 2, 3)]
    assert [r["toxic"] for r in held_out] == [table[i]["toxic"] for i in (7, 9)]
    assert len(pq.split_rows(table, sft_rows=3, eval_rows=5)[1]) == 5  # rows 4..9 but 8
    with pytest.raises(SystemExit, match="held-out rows must not train"):
        pq.split_rows(table, sft_rows=3, eval_rows=6)


def test_lorakit_s_dpo_is_checked_against_trl_s_within_the_larger_spread():
    # Means 52 and 56; spreads 4 (lorakit's) and 2: 52 >= 56 - 4 holds, at the edge.
    assert pq.larger_spread_check([50, 52, 54], [55, 56, 57])["holds"]
    got = pq.larger_spread_check([50, 51, 52], [55, 56, 57])  # 51 < 56 - 2
    assert not got["holds"] and got["larger_spread"] == 2 and got["lorakit_mean"] == 51
    # Lower is better (repeats): at most TRL's mean plus the larger spread.
    assert pq.larger_spread_check([3, 3, 3], [1, 2, 3], higher_is_better=False)["holds"]
    assert not pq.larger_spread_check([5, 5, 5], [1, 2, 3], higher_is_better=False)["holds"]
    assert pq.larger_spread_check([5, 5, 5], [1, 2, 3], higher_is_better=True)["holds"]


def test_the_check_compares_lorakit_s_dpo_with_trl_s_and_the_table_shows_each_system_over_seeds():
    def record(system: str, seed: int, reward: float | None, chrf: float, shared: float) -> dict:
        scores = {"reward_accuracy": reward, "preference_accuracy": 0.5, "chrf": chrf, "repeats": shared}
        return {"system": system, "seed": seed, "scores": scores, "losses": [0.7, 0.5], "wall_s": 10.0, "steps": 2}

    records = [record("dpo", 0, 0.5, 60.0, 0.25), record("dpo", 1, 0.75, 62.0, 0.0),
               record("trl-dpo", 0, 1.0, 70.0, 0.0), record("trl-dpo", 1, 1.0, 70.0, 0.0),
               record("orpo", 0, 1.0, 10.0, 1.0), record("sft", 0, None, 65.0, 0.0)]  # fmt: skip
    found = pq.checks(records)
    assert found["reward_accuracy"] == {"lorakit_mean": 0.625, "trl_mean": 1.0, "larger_spread": 0.25, "holds": False}
    assert not found["chrf"]["holds"] and found["repeats"]["holds"]  # 0.125 <= 0 + 0.25
    assert "reward acc. %: lorakit's DPO mean 62.5 >= TRL's DPO mean 100.0 - the larger spread 25.0: does not hold" in (
        pq.check_lines(found)
    )
    rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ") for line in pq.table(records).splitlines()[2:]}
    assert rows["SFT->DPO (lorakit)"][1:4] == ["2", "62.5", "50.0..75.0"]
    assert rows["SFT (lorakit)"][2:4] == ["-", "-"]  # the reference itself has no reward accuracy
