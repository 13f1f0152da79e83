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

from speccore.data import (
    Formatting,
    data_format,
    format_rows,
    load_rows,
    prompt_texts,
    row_label,
    write_coreset,
)
from speccore.utils.errors import DataError

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
    # line 3 is blank (no row) but still counts as a line of the file: row 3 sits on line 4
    source.write_text('{"a": "1"}\n{"a": "2"}\n\n{"a": "3",}\n', encoding="utf-8")
    with pytest.raises(
        DataError, match=r"^train\.jsonl row 3 \(1-based, line 4\): invalid JSON \("
    ):
        load_rows(str(source))


def test_jsonl_line_that_is_not_an_object(tmp_path: Path) -> None:
    source = tmp_path / "train.jsonl"
    source.write_text('{"a": "1"}\n["a", "2"]\n', encoding="utf-8")
    with pytest.raises(
        DataError, match=r"^train\.jsonl row 2 \(1-based\): expected a JSON object, got a list"
    ):
        load_rows(str(source))


def test_json_list_item_that_is_not_an_object(tmp_path: Path) -> None:
    source = tmp_path / "train.json"
    source.write_text('[{"a": "1"}, "oops"]', encoding="utf-8")
    with pytest.raises(DataError, match=r"^train\.json row 2 \(1-based\): expected a JSON object"):
        load_rows(str(source))


def test_json_single_object_is_explained(tmp_path: Path) -> None:
    source = tmp_path / "train.json"
    source.write_text('{\n  "data": [{"a": "1"}]\n}\n', encoding="utf-8")
    with pytest.raises(DataError, match="the file is one JSON object"):
        load_rows(str(source))


def test_mixed_types_in_a_field_name_the_line(tmp_path: Path) -> None:
    source = tmp_path / "train.jsonl"
    source.write_text('{"a": "x"}\n{"a": "y"}\n{"a": 5}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"^train\.jsonl row 3 \(1-based\): field 'a' is a number"):
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
    # the header is line 1, so data row 2 is line 3
    with pytest.raises(
        DataError, match=r"^train\.csv row 2 \(1-based, line 3\): 3 fields, the header has 2"
    ):
        load_rows(str(source))


def test_unknown_suffix_of_existing_file(tmp_path: Path) -> None:
    source = tmp_path / "train.txt"
    source.write_text("hello\n", encoding="utf-8")
    assert data_format(str(source)) == "hub"
    with pytest.raises(DataError, match="unknown file type"):
        load_rows(str(source))


def _hub_says_it_exists(monkeypatch: pytest.MonkeyPatch) -> None:
    """The one request before loading (tests/test_hostile_input.py) answers "it exists"."""
    import speccore.data.read as load

    monkeypatch.setattr(load, "check_hub_dataset", lambda name, flag="--data": None)


def test_hub_failure_is_a_data_error(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def fake_load_dataset(name: str, split: str) -> None:
        calls.append((name, split))
        raise ConnectionError("Couldn't reach the hub")

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    _hub_says_it_exists(monkeypatch)
    assert data_format("someone/some-data") == "hub"
    with pytest.raises(
        DataError, match=r"^someone/some-data: no such file .*Couldn't reach the hub"
    ):
        load_rows("someone/some-data", split="validation")
    assert calls == [("someone/some-data", "validation")]


def test_hub_dataset_coreset_is_jsonl(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    hub = datasets.Dataset.from_list(ROWS)
    monkeypatch.setattr(datasets, "load_dataset", lambda name, split: hub)
    _hub_says_it_exists(monkeypatch)
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


# --- unreadable files: one line naming the file, never a zlib / pyarrow / codec traceback ------


def _corrupt_gzip(payload: bytes) -> bytes:
    """A gzip file with a valid header whose deflate body is damaged (zlib.error when read)."""
    raw = bytearray(gzip.compress(payload, mtime=0))
    for i in range(20, min(len(raw) - 8, 120)):
        raw[i] ^= 0x5A
    return bytes(raw)


def _many_rows() -> bytes:
    # varied text, so the deflate stream is long enough to damage in the middle
    return b"".join(
        json.dumps({"q": f"question {i} {i * 7919 % 1013}", "a": f"answer {i * i}"}).encode()
        + b"\n"
        for i in range(400)
    )


@pytest.mark.parametrize("kind", ["jsonl", "json", "csv", "parquet"])
def test_corrupt_gzip_body_is_one_line_data_error(tmp_path: Path, kind: str) -> None:
    source = tmp_path / f"train.{kind}.gz"
    source.write_bytes(_corrupt_gzip(_many_rows()))
    with pytest.raises(DataError) as err:
        load_rows(str(source))
    message = str(err.value)
    assert message.startswith(f"{source}: cannot read the file: corrupt or truncated gzip data (")
    assert "\n" not in message


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("trunc.jsonl.gz", gzip.compress(b'{"a": "1"}\n' * 500, mtime=0)[:40], "corrupt or trunc"),
        ("crc.jsonl.gz", gzip.compress(b'{"a": "1"}\n', mtime=0)[:-8] + b"\1" * 8, "corrupt or"),
        ("bad.parquet", b"PAR1 this is not parquet PAR1", "not a readable Parquet file"),
        ("latin1.jsonl", '{"a": "caf\u00e9"}\n'.encode("latin-1"), "not valid UTF-8"),
        ("latin1.csv", "a\ncaf\u00e9\n".encode("latin-1"), "not valid UTF-8"),
        ("latin1.json", '[{"a": "caf\u00e9"}]'.encode("latin-1"), "not valid UTF-8"),
        ("cut.json", b'[{"a": "1"}, {"a": ', "invalid JSON"),
    ],
    ids=[
        "truncated-gzip",
        "bad-crc",
        "bad-parquet",
        "latin1-jsonl",
        "latin1-csv",
        "latin1-json",
        "cut-json",
    ],
)
def test_unreadable_files_name_the_file_on_one_line(
    tmp_path: Path, name: str, content: bytes, expected: str
) -> None:
    source = tmp_path / name
    source.write_bytes(content)
    with pytest.raises(DataError, match=expected) as err:
        load_rows(str(source))
    assert name in str(err.value) and "\n" not in str(err.value)


def test_input_damaged_after_loading_is_a_data_error_when_writing(tmp_path: Path) -> None:
    source = tmp_path / "train.jsonl.gz"
    source.write_bytes(gzip.compress(_many_rows(), mtime=0))
    dataset = load_rows(str(source))
    source.write_bytes(_corrupt_gzip(_many_rows()))
    with pytest.raises(DataError, match="corrupt or truncated gzip data"):
        write_coreset(str(source), dataset, [0, 1], tmp_path / "out")
    assert not (tmp_path / "out" / "coreset.jsonl").exists()


# --- one row numbering in the loader and the formatter ----------------------------------------


def test_loader_and_formatter_name_a_row_the_same_way(tmp_path: Path) -> None:
    # Row 3 (1-based) is the third data row; a blank line before it puts it on line 4.
    lines = ['{"q": "a", "r": "x"}', '{"q": "b", "r": "y"}', "", '{"q": "c", "r": 5}']
    source = tmp_path / "train.jsonl"
    source.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(DataError) as loader_err:
        load_rows(str(source))
    assert str(loader_err.value).startswith("train.jsonl row 3 (1-based, line 4): field 'r'")

    lines[3] = '{"q": "c", "r": null}'  # loads; the formatter refuses the same row
    source.write_text("\n".join(lines) + "\n", encoding="utf-8")
    dataset = load_rows(str(source))
    with pytest.raises(DataError) as formatter_err:
        format_rows(dataset, Formatting(input_field="q", output_field="r"))
    assert str(formatter_err.value).startswith("row 3 (1-based): field 'r' is missing")


def test_row_label() -> None:
    assert row_label(0) == "row 1 (1-based)"
    assert row_label(4, line=5) == "row 5 (1-based)"  # the line adds nothing
    assert row_label(4, line=9) == "row 5 (1-based, line 9)"


# --- empty responses ---------------------------------------------------------------------------


@pytest.mark.parametrize("response", ["", "   ", "\n\t \u00a0"])
def test_empty_or_whitespace_response_is_refused(response: str) -> None:
    dataset = datasets.Dataset.from_list(
        [{"q": "a", "r": "fine"}, {"q": "b", "r": response}, {"q": "c", "r": "ok"}]
    )
    with pytest.raises(DataError) as err:
        format_rows(dataset, Formatting(input_field="q", output_field="r"))
    assert str(err.value).startswith("row 2 (1-based): response is empty (field 'r' is ")
    # a prompt may still be blank-ish; only the response is the training target
    prompts, responses = format_rows(
        datasets.Dataset.from_list([{"q": " ", "r": "x"}]),
        Formatting(input_field="q", output_field="r"),
    )
    assert (prompts, responses) == ([" "], ["x"])


class _ChatTokenizer:
    """Just enough of a tokenizer for chat formatting: the turns joined as ``role: content``."""

    chat_template = "role: content"

    def apply_chat_template(self, turns, tokenize: bool, add_generation_prompt: bool) -> str:  # type: ignore[no-untyped-def]
        return "\n".join(f"{t['role']}: {t['content']}" for t in turns) + "\nassistant:"


def test_whitespace_final_assistant_turn_is_refused() -> None:
    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  \n"}]
    dataset = datasets.Dataset.from_list([{"m": turns}])
    fmt = Formatting(messages_field="m")
    with pytest.raises(DataError, match=r"^row 1 \(1-based\): response is empty \(the last turn"):
        format_rows(dataset, fmt, _ChatTokenizer())
    # generation prompts do not need the answer: a blank one is left out, not refused
    assert prompt_texts(dataset, fmt, _ChatTokenizer()) == ["user: hi\nassistant:"]
