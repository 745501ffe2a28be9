"""Read raw rows from local files, folders of files, or a Hugging Face dataset id.

Rows come back as plain dicts with a `row` label ("file.jsonl:12") so that every later error can
say exactly which line of which file is at fault.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorakit.errors import LorakitError

EXTENSIONS = (".json", ".jsonl", ".csv", ".tsv", ".parquet")
# The files `lorakit quickstart data FOLDER` writes (quickstart.make_task): data that is generated, not shipped,
# so a missing one says how to make it.
QUICKSTART_TASK = ("train.jsonl", "eval.jsonl")


@dataclass
class Rows:
    """Raw records and where each came from."""

    records: list[dict[str, Any]]
    where: list[str]  # "path:line" per record, for error messages
    fingerprint: str  # content hash of the inputs, the key of the tokenization cache
    origin: str  # what the user named
    files: list[str] = field(default_factory=list)


def read(source: str, split: str = "train", limit: int | None = None) -> Rows:
    """Load every row of `source`: a file, a folder of supported files, or a dataset id."""
    path = Path(source).expanduser()
    files = local_files(source)
    if files is None and not _is_local_looking(source):
        return _read_hub(source, split, limit)
    if files is None:
        raise LorakitError(
            f"data file not found: {source}. Check the path (relative paths are taken "
            f"from the current directory: {Path.cwd()}); a Hugging Face dataset is named "
            "as org/name." + _how_to_make(path)
        )
    if not files:
        raise LorakitError(f"{path}: folder has no data files; expected files ending in {', '.join(EXTENSIONS)}")

    records: list[dict] = []
    where: list[str] = []
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.name.encode())
        digest.update(_file_hash(f).encode())
        recs, locs = _read_file(f)
        records += recs
        where += locs
        if limit and len(records) >= limit:
            break
    if not records:
        raise LorakitError(f"{source}: no rows to read: the data set is empty. Point at a file that has rows")
    if limit:
        records, where = records[:limit], where[:limit]
    digest.update(f"limit={limit}".encode())
    return Rows(records, where, digest.hexdigest(), source, [str(f) for f in files])


def local_files(source: str) -> list[Path] | None:
    """The files `read` reads for a local `source`: the file itself, or a folder's data files; None when no such
    file or folder is here (`read` then takes an org/name for a Hugging Face dataset id)."""
    path = Path(source).expanduser()
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.suffix.lower() in EXTENSIONS and p.is_file())
    return [path] if path.is_file() else None


def _is_local_looking(source: str) -> bool:
    """A path the user meant as local: has a data extension, starts like a path, or has no org/name."""
    return (
        Path(source).suffix.lower() in (*EXTENSIONS, ".txt", ".xlsx", ".yaml", ".yml")
        or source.startswith((".", "/", "~"))
        or source.count("/") != 1
    )


def _file_hash(path: Path) -> str:
    # Hash the contents, not the mtime: copying a file must not invalidate the cache, editing must.
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _read_file(path: Path) -> tuple[list[dict], list[str]]:
    ext = path.suffix.lower()
    readers = {
        ".json": _read_json,
        ".jsonl": _read_jsonl,
        ".csv": _read_csv,
        ".tsv": _read_csv,
        ".parquet": _read_parquet,
    }
    if ext not in readers:
        raise LorakitError(
            f"{path}: unsupported file type '{ext or '(none)'}'. Use one of "
            f"{', '.join(EXTENSIONS)}, or convert the file."
        )
    try:
        # utf-8-sig: Excel and Windows tools often start a UTF-8 file with a BOM, which is no part of the data.
        records, where = readers[ext](path)
    except UnicodeDecodeError:
        raw = path.read_bytes()  # the reader's error counts from its buffer: find the place in the file
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as e:
            line = raw.count(b"\n", 0, e.start) + 1
            raise LorakitError(
                f"{path}:{line}: not UTF-8 text ({e.reason} at byte {e.start}). Save the file "
                "as UTF-8 (e.g. iconv -f latin1 -t utf-8)"
            ) from None
        raise
    for rec, loc in zip(records, where):
        if not isinstance(rec, dict):
            raise LorakitError(
                f"{loc}: each row must be an object with named fields, got {type(rec).__name__}: {str(rec)[:60]!r}"
            )
    return records, where


def _read_json(path: Path) -> tuple[list[dict], list[str]]:
    text = path.read_text(encoding="utf-8-sig")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        # Many ".json" files are really JSON Lines; accept them rather than fail.
        if text.lstrip().startswith("{") and "\n" in text.strip():
            return _read_jsonl(path)
        raise LorakitError(
            f"{path}:{e.lineno}: invalid JSON ({e.msg} at column {e.colno}). Fix the file "
            "or save it as JSON Lines (.jsonl), one object per line."
        ) from None
    if isinstance(data, dict):
        # {"data": [...]} or {"train": [...]} wrappers are common in exported sets.
        lists = [k for k, v in data.items() if isinstance(v, list)]
        data = data[lists[0]] if len(lists) == 1 else [data]
    if not isinstance(data, list):
        raise LorakitError(f"{path}: expected a JSON list of rows, got {type(data).__name__}")
    return data, [f"{path}:row {i + 1}" for i in range(len(data))]


def _read_jsonl(path: Path) -> tuple[list[dict], list[str]]:
    records, where = [], []
    with open(path, encoding="utf-8-sig") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise LorakitError(
                    f"{path}:{lineno}: invalid JSON on this line ({e.msg} at column "
                    f"{e.colno}). Each line must hold one complete JSON object."
                ) from None
            where.append(f"{path}:{lineno}")
    return records, where


def _read_csv(path: Path) -> tuple[list[dict], list[str]]:
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    csv.field_size_limit(1 << 30)
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        if not reader.fieldnames:
            raise LorakitError(f"{path}: empty file or no header row; the first line must name the columns")
        records, where = [], []
        # line_num is the last line read: a record with a quoted line break starts before it.
        start = reader.line_num + 1
        for rec in reader:
            extra = rec.pop(None, None)  # more cells than header names
            if extra:
                raise LorakitError(
                    f"{path}:{start}: row has {len(reader.fieldnames) + len(extra)} "
                    f"cells but the header has {len(reader.fieldnames)} columns"
                )
            records.append({k: ("" if v is None else v) for k, v in rec.items()})
            where.append(f"{path}:{start}")
            start = reader.line_num + 1
    return records, where


def _read_parquet(path: Path) -> tuple[list[dict], list[str]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for corrupt files
        raise LorakitError(f"{path}: not a readable parquet file ({e})") from None
    rows = table.to_pylist()
    return rows, [f"{path}:row {i + 1}" for i in range(len(rows))]


def _how_to_make(path: Path) -> str:
    """The command that writes a missing file lorakit generates (the quickstart's task folder), else ""."""
    if path.name in QUICKSTART_TASK and "quickstart" in path.parent.name:
        folder = shlex.quote(str(path.parent))
        return f" It is the quickstart's generated task: `lorakit quickstart data {folder}` writes it."
    return ""


def _read_hub(name: str, split: str, limit: int | None) -> Rows:
    import datasets

    try:
        ds = datasets.load_dataset(name, split=split)
    except (ConnectionError, OSError) as e:
        offline = os.environ.get("HF_DATASETS_OFFLINE") or os.environ.get("HF_HUB_OFFLINE")
        raise LorakitError(
            f"could not load dataset '{name}' (split '{split}') from the Hugging Face hub"
            f"{' (offline mode is on)' if offline else ' (no network?)'}: {str(e).splitlines()[0][:200]}. "
            "Download it on a connected machine (datasets' save_to_disk or the hub's files) and point "
            "data.train at the local file or folder."
        ) from None
    except ValueError as e:  # unknown split
        raise LorakitError(f"dataset '{name}': {e}. Set data.split to one of its splits.") from None
    if limit:
        ds = ds.select(range(min(limit, len(ds))))
    fingerprint = hashlib.sha256(f"{name}:{split}:{ds._fingerprint}:{limit}".encode()).hexdigest()
    records = ds.to_list()
    return Rows(records, [f"{name}[{split}] row {i + 1}" for i in range(len(records))], fingerprint, name)
