"""The quickstart: a synthetic text-to-SQL task generated from a seed, and the base-vs-adapter table of its run.

The task: translate a question about one fixed table, `employees(name, department, salary, city)`, into
one SQL query written in a fixed house style. A 135M instruct model knows some SQL but not this house
style, so it scores near zero zero-shot; a LoRA picks the style up in a few minutes of CPU training.

The eval split uses names, cities, departments and salary thresholds that never appear in the train
split, so a high eval score means the adapter learned the mapping, not the rows.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from lorakit import files, sources
from lorakit.errors import LorakitError
from lorakit.run_folder import RunFolder, find_adapter

SYSTEM = (
    "Translate the question into one SQLite query on the table "
    "employees(name, department, salary, city). Reply with the query only."
)

NAMES = [
    "Alice",
    "Bruno",
    "Chen",
    "Dana",
    "Elif",
    "Farid",
    "Greta",
    "Hugo",
    "Ines",
    "Jonas",
    "Kenji",
    "Lena",
    "Marco",
    "Nadia",
    "Oscar",
    "Priya",
    "Quinn",
    "Rosa",
    "Sven",
    "Tariq",
    "Uma",
    "Viktor",
    "Wen",
    "Ximena",
    "Yusuf",
    "Zara",
    "Amir",
    "Beatriz",
    "Carlos",
    "Dmitri",
    "Emma",
    "Fatima",
    "Gustav",
    "Hana",
    "Ivan",
    "Julia",
    "Kofi",
    "Laura",
    "Mateo",
    "Nora",
    "Olga",
    "Pablo",
    "Rahul",
    "Sofia",
    "Tomas",
    "Yara",
]
CITIES = [
    "Berlin",
    "Paris",
    "Madrid",
    "Rome",
    "Vienna",
    "Prague",
    "Lisbon",
    "Dublin",
    "Oslo",
    "Warsaw",
    "Athens",
    "Zurich",
    "Munich",
    "Lyon",
    "Porto",
    "Seville",
    "Milan",
    "Krakow",
    "Bergen",
    "Tallinn",
    "Riga",
    "Ghent",
    "Leeds",
    "Malmo",
    "Turin",
    "Graz",
    "Bilbao",
    "Geneva",
    "Hamburg",
    "Naples",
]
DEPARTMENTS = [
    "Sales",
    "Marketing",
    "Engineering",
    "Finance",
    "Legal",
    "Support",
    "Research",
    "Operations",
    "Design",
    "Security",
    "Logistics",
    "Procurement",
    "Training",
    "Quality",
    "Facilities",
    "Payroll",
]
# Salary thresholds in steps of 1000; which ones are held out is decided by the seeded split below.
THRESHOLDS = list(range(20000, 150001, 1000))

# (question phrasings, query) pairs. Several phrasings per query teach the mapping, not one sentence.
TEMPLATES: list[tuple[list[str], str]] = [
    (
        ["Who works in {city}?", "List the employees based in {city}.", "Which employees are in {city}?"],
        "SELECT name FROM employees WHERE city = '{city}';",
    ),
    (
        ["Who is in the {dept} department?", "List everyone in {dept}.", "Which employees work in {dept}?"],
        "SELECT name FROM employees WHERE department = '{dept}';",
    ),
    (
        ["How many employees work in {city}?", "Count the employees in {city}."],
        "SELECT COUNT(*) FROM employees WHERE city = '{city}';",
    ),
    (
        ["How many people are in the {dept} department?", "Count the employees in {dept}."],
        "SELECT COUNT(*) FROM employees WHERE department = '{dept}';",
    ),
    (
        ["What is the average salary in {dept}?", "What does {dept} pay on average?"],
        "SELECT AVG(salary) FROM employees WHERE department = '{dept}';",
    ),
    (
        ["What is the highest salary in {city}?", "What is the top salary in {city}?"],
        "SELECT MAX(salary) FROM employees WHERE city = '{city}';",
    ),
    (["How much does {name} earn?", "What is {name}'s salary?"], "SELECT salary FROM employees WHERE name = '{name}';"),
    (
        ["Which city does {name} work in?", "Where is {name} based?"],
        "SELECT city FROM employees WHERE name = '{name}';",
    ),
    (
        ["Which department is {name} in?", "What department does {name} work for?"],
        "SELECT department FROM employees WHERE name = '{name}';",
    ),
    (
        ["Which employees in {city} earn more than {n}?", "Who in {city} makes over {n}?"],
        "SELECT name FROM employees WHERE city = '{city}' AND salary > {n};",
    ),
    (
        ["Who in {dept} earns less than {n}?", "Which {dept} employees make under {n}?"],
        "SELECT name FROM employees WHERE department = '{dept}' AND salary < {n};",
    ),
    (
        ["Who earns more than {n}?", "List the employees with a salary above {n}."],
        "SELECT name FROM employees WHERE salary > {n};",
    ),
]


def make_task(out_dir: Path, n_train: int = 2000, n_eval: int = 50, seed: int = 0) -> tuple[Path, Path]:
    """Write `train.jsonl` and `eval.jsonl` (chat `messages` records) into `out_dir`; return their paths.

    The same seed always writes byte-identical files. Every name, city, department and threshold in
    the eval split is absent from the train split.
    """
    rng = random.Random(seed)
    train_pool, eval_pool = {}, {}
    for key, values in (("name", NAMES), ("city", CITIES), ("dept", DEPARTMENTS), ("n", THRESHOLDS)):
        shuffled = values[:]
        rng.shuffle(shuffled)
        cut = len(shuffled) // 4  # a quarter of each pool is held out for eval
        eval_pool[key], train_pool[key] = shuffled[:cut], shuffled[cut:]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    train_path, eval_path = (out_dir / name for name in sources.QUICKSTART_TASK)
    _write_jsonl(train_path, [_example(rng, train_pool) for _ in range(n_train)])
    _write_jsonl(eval_path, [_example(rng, eval_pool) for _ in range(n_eval)])
    return train_path, eval_path


def _example(rng: random.Random, pool: dict[str, list]) -> dict:
    phrasings, query = rng.choice(TEMPLATES)
    values = {key: rng.choice(options) for key, options in pool.items()}
    return {
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": rng.choice(phrasings).format(**values)},
            {"role": "assistant", "content": query.format(**values)},
        ]
    }


def _write_jsonl(path: Path, records: list[dict]) -> None:
    files.write_text(path, "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records))


def compare(
    cfg: Any, max_new_tokens: int = 48, batch_size: int = 16, device: str = "auto", dtype: str = "auto"
) -> dict:
    """Exact match of the base model and of the run's adapter on the run's held-out chats.

    It is `lorakit eval` of the run with SQL-normalized exact match (one loaded base: the adapter is
    switched off for the base's answers), so it writes the run's eval/eval.json and eval.html too.
    Returns the eval report.
    """
    from lorakit import evaluate

    run = RunFolder.of(cfg)
    if find_adapter(run.root) is None:
        raise LorakitError(
            f"{run.adapter}: no adapter yet; run `lorakit train CONFIG` for {run.root} first "
            "(make quickstart does both)"
        )
    if not isinstance(cfg.data.eval, str):
        raise LorakitError("quickstart compare needs data.eval to be a file of held-out chats")
    opts = evaluate.EvalOptions(
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        device=device,
        dtype=dtype,
        normalize=["sql"],
        metrics=["exact_match"],
        overwrite=True,
    )
    return evaluate.run(cfg, opts)


def print_table(report: dict, n_samples: int = 3) -> None:
    """Exact match of base and adapter, then the first samples side by side."""
    base, tuned = "base", next(name for name in report["models"] if name != "base")
    n = len(report["examples"])
    print(f"\nheld-out questions: {n} (names, cities, departments and thresholds never seen in training)")
    print(f"  {'model':<28}{'exact match':>14}")
    for label, name in (("base SmolLM2-135M-Instruct", base), ("+ lorakit LoRA adapter", tuned)):
        score = report["models"][name]["exact_match"]
        print(f"  {label:<28}{score:>8.1%} ({round(score * n)}/{n})")
    print()
    for i, ex in enumerate(report["examples"][:n_samples], 1):
        print(f"[{i}] {ex['prompt'][-1]['content']}")
        print(f"    reference  {ex['reference']}")
        for label, name in (("base", base), ("adapter", tuned)):
            mark = "✓" if ex["scores"][name]["exact_match"] else "✗"
            text = " ".join(ex["outputs"][name].split())
            print(f"    {label:<10} {mark} {text[:110]}{'…' if len(text) > 110 else ''}")
