"""Reading rows from every supported file type, folders, and clear errors for bad files."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lorakit import sources
from lorakit.errors import LorakitError

ROWS = [{"instruction": "Say hi", "input": "", "output": "hi"}, {"instruction": "Add", "input": "1+1", "output": "2"}]


def test_each_file_type_reads_the_same_rows(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps(ROWS))
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in ROWS) + "\n\n")
    (tmp_path / "a.csv").write_text("instruction,input,output\nSay hi,,hi\nAdd,1+1,2\n")
    (tmp_path / "a.tsv").write_text("instruction\tinput\toutput\nSay hi\t\thi\nAdd\t1+1\t2\n")
    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "a.parquet")
    for ext in ("json", "jsonl", "csv", "tsv", "parquet"):
        rows = sources.read(str(tmp_path / f"a.{ext}"))
        assert rows.records == ROWS, ext
    assert sources.read(str(tmp_path / "a.jsonl")).where == [f"{tmp_path / 'a.jsonl'}:1", f"{tmp_path / 'a.jsonl'}:2"]


def test_a_byte_order_mark_is_not_part_of_the_data(tmp_path):
    """Excel's "CSV UTF-8" and many Windows tools start files with a BOM."""
    bom = "\ufeff"
    (tmp_path / "a.csv").write_text(bom + "instruction,input,output\nSay hi,,hi\nAdd,1+1,2\n")
    (tmp_path / "a.json").write_text(bom + json.dumps(ROWS))
    (tmp_path / "a.jsonl").write_text(bom + "\n".join(json.dumps(r) for r in ROWS))
    for ext in ("csv", "json", "jsonl"):
        assert sources.read(str(tmp_path / f"a.{ext}")).records == ROWS, ext


def test_folder_reads_all_files_and_limit_applies(tmp_path):
    for i in range(3):
        (tmp_path / f"part{i}.jsonl").write_text(json.dumps({"text": f"doc {i}"}) + "\n")
    (tmp_path / "notes.md").write_text("ignored")
    assert [r["text"] for r in sources.read(str(tmp_path)).records] == ["doc 0", "doc 1", "doc 2"]
    assert len(sources.read(str(tmp_path), limit=2).records) == 2


def test_fingerprint_follows_contents_not_names_of_folders(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for d in ("a", "b"):
        (tmp_path / d / "x.jsonl").write_text('{"text": "same"}\n')
    assert (
        sources.read(str(tmp_path / "a" / "x.jsonl")).fingerprint
        == sources.read(str(tmp_path / "b" / "x.jsonl")).fingerprint
    )
    (tmp_path / "b" / "x.jsonl").write_text('{"text": "edited"}\n')
    assert (
        sources.read(str(tmp_path / "a" / "x.jsonl")).fingerprint
        != sources.read(str(tmp_path / "b" / "x.jsonl")).fingerprint
    )


def test_missing_file(tmp_path):
    with pytest.raises(LorakitError, match=r"data file not found: .*nope.jsonl"):
        sources.read(str(tmp_path / "nope.jsonl"))


def test_unknown_extension(tmp_path):
    (tmp_path / "data.xlsx").write_text("x")
    with pytest.raises(LorakitError, match=r"unsupported file type '\.xlsx'.*\.jsonl"):
        sources.read(str(tmp_path / "data.xlsx"))


def test_malformed_jsonl_names_the_line(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"text": "ok"}\n{"text": "broken"\n')
    with pytest.raises(LorakitError, match=r"d\.jsonl:2: invalid JSON"):
        sources.read(str(tmp_path / "d.jsonl"))


def test_row_that_is_not_an_object(tmp_path):
    (tmp_path / "d.json").write_text(json.dumps([{"text": "a"}, ["not", "an", "object"]]))
    with pytest.raises(LorakitError, match=r"d\.json:row 2: each row must be an object"):
        sources.read(str(tmp_path / "d.json"))


def test_csv_rows_are_located_by_their_first_line(tmp_path):
    """A record with quoted line breaks was located by its last line."""
    (tmp_path / "d.csv").write_text('a,b\n1,"two\nlines\nhere"\n3,4\n')
    assert sources.read(str(tmp_path / "d.csv")).where == [f"{tmp_path / 'd.csv'}:2", f"{tmp_path / 'd.csv'}:5"]
    (tmp_path / "e.csv").write_text('a,b\n1,"two\nlines"\n5,6,7\n')
    with pytest.raises(LorakitError, match=r"e\.csv:4: row has 3 cells"):
        sources.read(str(tmp_path / "e.csv"))


def test_csv_row_with_extra_cells(tmp_path):
    (tmp_path / "d.csv").write_text("a,b\n1,2\n1,2,3\n")
    with pytest.raises(LorakitError, match=r"d\.csv:3: row has 3 cells but the header has 2"):
        sources.read(str(tmp_path / "d.csv"))


def test_hub_id_offline_is_a_clear_message(monkeypatch):
    import datasets
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    # Both libraries read the variables once, at import: patch the values they already hold.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    with pytest.raises(LorakitError, match=r"could not load dataset 'someorg/somedata'.*offline.*local file"):
        sources.read("someorg/somedata")
