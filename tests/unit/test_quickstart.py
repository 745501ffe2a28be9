"""The quickstart task is deterministic, held out by value, and scored by a forgiving exact match."""

import json
import re

import pytest

from lorakit.quickstart import make_task
from lorakit.scoring import normalize_sql


def exact_match(pred: str, ref: str) -> bool:
    return normalize_sql(pred) == normalize_sql(ref)


def _records(path):
    return [json.loads(line)["messages"] for line in path.read_text(encoding="utf-8").splitlines()]


def _quoted_values(records):
    # Every name, city and department sits in a SQL literal of the answer; thresholds are bare numbers.
    values = set()
    for messages in records:
        answer = messages[-1]["content"]
        values.update(re.findall(r"'([^']*)'", answer))
        values.update(re.findall(r"\b\d{4,}\b", answer))
    return values


def test_same_seed_same_files_other_seed_other_files(tmp_path):
    a = make_task(tmp_path / "a", n_train=200, n_eval=20, seed=3)
    b = make_task(tmp_path / "b", n_train=200, n_eval=20, seed=3)
    c = make_task(tmp_path / "c", n_train=200, n_eval=20, seed=4)
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]
    assert a[0].read_bytes() != c[0].read_bytes()
    assert not list(tmp_path.rglob("*.tmp"))  # atomic writes leave no temp files behind


def test_files_are_chat_records_of_the_requested_size(tmp_path):
    train, eval_ = make_task(tmp_path, n_train=120, n_eval=30)
    assert (train.name, eval_.name) == ("train.jsonl", "eval.jsonl")
    for path, n in ((train, 120), (eval_, 30)):
        records = _records(path)
        assert len(records) == n
        for messages in records:
            assert [m["role"] for m in messages] == ["system", "user", "assistant"]
            assert messages[-1]["content"].startswith("SELECT ")


def test_eval_values_never_appear_in_train(tmp_path):
    train, eval_ = make_task(tmp_path, n_train=2000, n_eval=50)
    train_values, eval_values = _quoted_values(_records(train)), _quoted_values(_records(eval_))
    assert eval_values and not eval_values & train_values
    train_questions = {m[1]["content"] for m in _records(train)}
    assert not train_questions & {m[1]["content"] for m in _records(eval_)}


@pytest.mark.parametrize(
    "pred, ref",
    [
        ("SELECT name FROM employees WHERE city = 'Berlin';", "select name from employees where city='Berlin'"),
        ("  SELECT  COUNT( * )\nFROM employees ;", "SELECT COUNT(*) FROM employees;"),
        (
            "```sql\nSELECT salary FROM employees WHERE name = 'Ana';\n```",
            "SELECT salary FROM employees WHERE name = 'Ana';",
        ),
        ("SELECT name FROM Employees WHERE salary>50000", "SELECT name FROM employees WHERE salary > 50000;"),
    ],
)
def test_exact_match_ignores_layout_and_keyword_case(pred, ref):
    assert exact_match(pred, ref)


@pytest.mark.parametrize(
    "pred, ref",
    [
        # String literals keep their case and spacing: they are data, not SQL.
        ("SELECT name FROM employees WHERE city = 'berlin';", "SELECT name FROM employees WHERE city = 'Berlin';"),
        ("SELECT name FROM employees WHERE city = 'New  York';", "SELECT name FROM employees WHERE city = 'New York';"),
        ("SELECT * FROM employees WHERE city = 'Berlin';", "SELECT name FROM employees WHERE city = 'Berlin';"),
        ("SELECT name FROM employees WHERE salary > 5000;", "SELECT name FROM employees WHERE salary > 50000;"),
        ("The answer is SELECT name FROM employees;", "SELECT name FROM employees;"),
    ],
)
def test_exact_match_rejects_different_queries(pred, ref):
    assert not exact_match(pred, ref)


def test_normalize_sql_keeps_escaped_quotes_in_literals():
    assert normalize_sql("SELECT  x FROM t WHERE n = 'O''Brien' ;") == "select x from t where n='O''Brien'"
