"""Loading rows from every input format and writing a coreset back in the same format."""

from __future__ import annotations

import csv
import gzip
import json
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from speccore.data import data_format, load_rows, write_coreset
from speccore.errors import DataError

# All text (so CSV, which has no types, loads the same values) with the awkward cases: commas,
# quotes, a newline inside a value, non-ASCII, a number-like answer and U+2028 inside a string.
ROWS = [
    {"question": "What is 6 * 7?", "answer": "42", "topic": "math"},
    {"question": 'Say "hi", politely', "answer": "Hello, there.", "topic": "chat"},
    {"question": "Two lines?", "answer": "first\nsecond", "topic": "format"},
    {"question": "Übersetze: cat", "answer": "Katze \u2028 ok", "topic": "lang"},
    {"question": "Empty topic?", "answer": "yes", "topic": ""},
]
KEEP = [3, 0, 2]  # deliberately unsorted: the coreset must come out in original order
KEPT = [ROWS[i] for i in sorted(KEEP)]


def _jsonl_lines(rows: list[dict[str, str]]) -> list[bytes]:
    return [json.dumps(r, ensure_ascii=False).encode() + b"\n" for r in rows]


def _write_jsonl(path: Path, rows: list[dict[str, str]]) -> None:
    lines = _jsonl_lines(rows)
    # a blank line in the middle (no row number) and a last line without its newline
    body = b"".join(lines[:2]) + b"\n   \n" + b"".join(lines[2:])
    path.write_bytes(body.rstrip(b"\n"))


def _write_csv(path: Path, rows: list[dict[str, str]], opener=open) -> None:
    with opener(path, "wt", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


def _make(tmp_path: Path, kind: str) -> Path:
    """Write ROWS in format ``kind``; returns the path to pass as --data."""
    if kind == "jsonl":
        path = tmp_path / "train.jsonl"
        _write_jsonl(path, ROWS)
    elif kind == "jsonl.gz":
        path = tmp_path / "train.jsonl.gz"
        with gzip.open(path, "wb") as f:
            f.write(b"".join(_jsonl_lines(ROWS)))
    elif kind == "json":
        path = tmp_path / "train.json"
        path.write_text(json.dumps(ROWS, indent=2, ensure_ascii=False), encoding="utf-8")
    elif kind == "json-lines":
        path = tmp_path / "train.json"
        _write_jsonl(path, ROWS)
    elif kind == "csv":
        path = tmp_path / "train.csv"
        _write_csv(path, ROWS)
    elif kind == "csv.gz":
        path = tmp_path / "train.csv.gz"
        _write_csv(path, ROWS, opener=gzip.open)
    elif kind == "parquet":
        path = tmp_path / "train.parquet"
        pq.write_table(pa.Table.from_pylist(ROWS), path)
    elif kind == "saved":
        path = tmp_path / "saved"
        datasets.Dataset.from_list(ROWS).save_to_disk(str(path))
    elif kind == "saved-dict":
        path = tmp_path / "saved_dict"
        other = datasets.Dataset.from_list(ROWS[:1])
        datasets.DatasetDict(
            {"train": datasets.Dataset.from_list(ROWS), "test": other}
        ).save_to_disk(str(path))
    else:
        raise AssertionError(kind)
    return path


EXPECTED_FORMAT = {
    "jsonl": ("jsonl", "coreset.jsonl"),
    "jsonl.gz": ("jsonl", "coreset.jsonl"),
    "json": ("json", "coreset.json"),
    "json-lines": ("json", "coreset.json"),
    "csv": ("csv", "coreset.csv"),
    "csv.gz": ("csv", "coreset.csv"),
    "parquet": ("parquet", "coreset.parquet"),
    "saved": ("dataset", "coreset.jsonl"),
    "saved-dict": ("dataset", "coreset.jsonl"),
}


@pytest.mark.parametrize("kind", list(EXPECTED_FORMAT))
def test_round_trip(tmp_path: Path, kind: str) -> None:
    source = _make(tmp_path, kind)
    fmt, out_name = EXPECTED_FORMAT[kind]
    assert data_format(str(source)) == fmt

    dataset = load_rows(str(source))
    assert dataset.to_list() == ROWS

    out = write_coreset(str(source), dataset, KEEP, tmp_path / "out")
    assert out == tmp_path / "out" / out_name
    assert load_rows(str(out)).to_list() == KEPT
    # nothing but the output itself is left in the folder (no temp files)
    assert sorted(p.name for p in out.parent.iterdir()) == [out_name]


@pytest.mark.parametrize("kind", ["jsonl", "jsonl.gz", "json-lines"])
def test_json_lines_coreset_copies_original_bytes(tmp_path: Path, kind: str) -> None:
    source = _make(tmp_path, kind)
    dataset = load_rows(str(source))
    out = write_coreset(str(source), dataset, KEEP, tmp_path / "out")
    assert out.read_bytes() == b"".join(_jsonl_lines(KEPT))


def test_jsonl_coreset_keeps_formatting_of_lines(tmp_path: Path) -> None:
    # odd spacing and key order must survive: lines are copied, not re-serialised
    lines = [
        b'{ "b" : "1",  "a":"x" }\r\n',
        b'{"a": "y", "b": "2"}\n',
        b'{"b":"3","a":"\\u00e9"}\n',
    ]
    source = tmp_path / "odd.jsonl"
    source.write_bytes(b"".join(lines))
    dataset = load_rows(str(source))
    assert dataset[2]["a"] == "é"
    out = write_coreset(str(source), dataset, [2, 0], tmp_path / "out")
    assert out.read_bytes() == lines[0] + lines[2]


def test_csv_coreset_keeps_header_values_and_line_endings(tmp_path: Path) -> None:
    source = tmp_path / "crlf.csv"
    source.write_bytes(b'id,text\r\n007,"a, b"\r\n8,"x ""q"""\r\n9,plain\r\n')
    dataset = load_rows(str(source))
    # CSV cells stay text: "007" must not become the number 7
    assert dataset.to_list()[0] == {"id": "007", "text": "a, b"}
    out = write_coreset(str(source), dataset, [1, 0], tmp_path / "out")
    assert out.read_bytes() == b'id,text\r\n007,"a, b"\r\n8,"x ""q"""\r\n'


def test_parquet_coreset_keeps_schema(tmp_path: Path) -> None:
    source = tmp_path / "typed.parquet"
    table = pa.table({"n": pa.array([1, 2, 3], pa.int32()), "s": ["a", "b", "c"]})
    pq.write_table(table, source)
    dataset = load_rows(str(source))
    out = write_coreset(str(source), dataset, [2, 0], tmp_path / "out")
    written = pq.read_table(out)
    assert written.schema == table.schema
    assert written.to_pylist() == [{"n": 1, "s": "a"}, {"n": 3, "s": "c"}]


def test_saved_dataset_dict_split(tmp_path: Path) -> None:
    source = _make(tmp_path, "saved-dict")
    assert load_rows(str(source), split="test").to_list() == ROWS[:1]
    with pytest.raises(DataError, match=r"no split 'validation' \(splits: test, train\)"):
        load_rows(str(source), split="validation")


def test_folder_that_is_not_a_saved_dataset(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"not a datasets\.save_to_disk folder"):
        load_rows(str(tmp_path))


def test_malformed_json_line_names_the_line(tmp_path: Path) -> None:
    source = tmp_path / "train.jsonl"
    # line 3 is blank (no row) but still counts as a line of the file
    source.write_text('{"a": "1"}\n{"a": "2"}\n\n{"a": "3",}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"^train\.jsonl line 4: invalid JSON \("):
        load_rows(str(source))


def test_jsonl_line_that_is_not_an_object(tmp_path: Path) -> None:
    source = tmp_path / "train.jsonl"
    source.write_text('{"a": "1"}\n["a", "2"]\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"train\.jsonl line 2: expected a JSON object, got a list"):
        load_rows(str(source))


def test_json_list_item_that_is_not_an_object(tmp_path: Path) -> None:
    source = tmp_path / "train.json"
    source.write_text('[{"a": "1"}, "oops"]', encoding="utf-8")
    with pytest.raises(DataError, match=r"train\.json item 1: expected a JSON object"):
        load_rows(str(source))


def test_json_single_object_is_explained(tmp_path: Path) -> None:
    source = tmp_path / "train.json"
    source.write_text('{\n  "data": [{"a": "1"}]\n}\n', encoding="utf-8")
    with pytest.raises(DataError, match="the file is one JSON object"):
        load_rows(str(source))


def test_mixed_types_in_a_field_name_the_line(tmp_path: Path) -> None:
    source = tmp_path / "train.jsonl"
    source.write_text('{"a": "x"}\n{"a": "y"}\n{"a": 5}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"train\.jsonl line 3: field 'a' is a number"):
        load_rows(str(source))


def test_field_missing_from_some_rows_becomes_null(tmp_path: Path) -> None:
    source = tmp_path / "train.jsonl"
    source.write_text('{"a": "x"}\n{"a": "y", "b": "z"}\n', encoding="utf-8")
    assert load_rows(str(source)).to_list() == [{"a": "x", "b": None}, {"a": "y", "b": "z"}]


def test_missing_file(tmp_path: Path) -> None:
    source = tmp_path / "nope.jsonl"
    with pytest.raises(DataError, match=r"nope\.jsonl: no such file"):
        load_rows(str(source))


@pytest.mark.parametrize(
    ("name", "content"),
    [("empty.jsonl", ""), ("blank.jsonl", "\n\n  \n"), ("header.csv", "a,b\n"), ("e.json", "[]")],
)
def test_empty_data(tmp_path: Path, name: str, content: str) -> None:
    source = tmp_path / name
    source.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=f"no rows in .*{name}"):
        load_rows(str(source))


def test_csv_record_with_wrong_field_count(tmp_path: Path) -> None:
    source = tmp_path / "train.csv"
    source.write_text("a,b\n1,2\n3,4,5\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"train\.csv line 3: 3 fields, the header has 2"):
        load_rows(str(source))


def test_unknown_suffix_of_existing_file(tmp_path: Path) -> None:
    source = tmp_path / "train.txt"
    source.write_text("hello\n", encoding="utf-8")
    assert data_format(str(source)) == "hub"
    with pytest.raises(DataError, match="unknown file type"):
        load_rows(str(source))


def test_hub_failure_is_a_data_error(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def fake_load_dataset(name: str, split: str) -> None:
        calls.append((name, split))
        raise ConnectionError("Couldn't reach the hub")

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert data_format("someone/some-data") == "hub"
    with pytest.raises(
        DataError, match=r"^someone/some-data: no such file .*Couldn't reach the hub"
    ):
        load_rows("someone/some-data", split="validation")
    assert calls == [("someone/some-data", "validation")]


def test_hub_dataset_coreset_is_jsonl(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    hub = datasets.Dataset.from_list(ROWS)
    monkeypatch.setattr(datasets, "load_dataset", lambda name, split: hub)
    dataset = load_rows("someone/some-data")
    out = write_coreset("someone/some-data", dataset, KEEP, tmp_path)
    assert out.name == "coreset.jsonl"
    assert [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()] == KEPT


def test_coreset_index_out_of_range(tmp_path: Path) -> None:
    source = _make(tmp_path, "jsonl")
    dataset = load_rows(str(source))
    with pytest.raises(ValueError, match="index 5 out of range for 5 rows"):
        write_coreset(str(source), dataset, [0, 5], tmp_path / "out")
    assert not (tmp_path / "out" / "coreset.jsonl").exists()


def test_file_that_is_not_gzip(tmp_path: Path) -> None:
    source = tmp_path / "train.jsonl.gz"
    source.write_bytes(b'{"a": "1"}\n')
    with pytest.raises(DataError, match=r"train\.jsonl\.gz: cannot read the file"):
        load_rows(str(source))
