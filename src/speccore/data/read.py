"""Load training rows from a file, a saved dataset or the hub, and write a coreset back out.

Files are read by speccore itself rather than by ``datasets``' loaders so that a bad row gets a
one-line error naming it, CSV cells stay text (a CSV has no types: an answer ``"42"`` must not
turn into an int), and nothing is written to the ``datasets`` cache. A file that cannot be read
at all (corrupt gzip, bad Parquet, not UTF-8) is a one-line :class:`DataError` naming the file.

Rows are indexed 0, 1, 2, ... in file order in code, the coreset and the scores; blank lines
(JSONL, JSON lines) and blank records (CSV) are skipped and get no index. :func:`write_coreset`
indexes rows the same way, so index ``i`` always means the same row.

Messages to people count rows from 1, as a text editor counts lines: index ``i`` is
``row i+1 (1-based)`` (:func:`row_label`), in this loader and in the formatter alike. Where the
row's line in the file differs (blank lines skipped, a CSV header, a multi-line CSV record),
the line is named too: ``train.csv row 2 (1-based, line 3)``.
"""

from __future__ import annotations

import csv
import datetime as dt
import gzip
import io
import json
import logging
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..utils.errors import DataError
from ..utils.io import atomic_path, first_line

logger = logging.getLogger(__name__)

FORMATS = ("jsonl", "json", "csv", "parquet", "dataset", "hub")
_SUFFIXES = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".csv": "csv",
    ".parquet": "parquet",
}
# Files ``datasets.save_to_disk`` writes: a Dataset folder has the first two, a DatasetDict the last.
_SAVED_MARKERS = ("state.json", "dataset_info.json", "dataset_dict.json")
_BOM = b"\xef\xbb\xbf"


def row_label(index: int, line: int | None = None) -> str:
    """How messages name the row at 0-based ``index``: ``row 3 (1-based)``, with its 1-based
    file ``line`` when that differs from the row number (``row 3 (1-based, line 5)``)."""
    if line is None or line == index + 1:
        return f"row {index + 1} (1-based)"
    return f"row {index + 1} (1-based, line {line})"


# Errors that mean "the file cannot be read": OSError (no permission, not a gzip file:
# gzip.BadGzipFile), a corrupt or truncated gzip body (zlib.error, EOFError), text not in UTF-8.
_UNREADABLE = (OSError, EOFError, zlib.error, UnicodeDecodeError)


def _unreadable(source: str | Path, error: BaseException) -> DataError:
    """The one-line error for a file whose bytes cannot be read or decoded."""
    if isinstance(error, zlib.error | EOFError | gzip.BadGzipFile):
        what = ": corrupt or truncated gzip data"
    elif isinstance(error, UnicodeDecodeError):
        what = ": not valid UTF-8"
    else:
        what = ""
    reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return DataError(f"{source}: cannot read the file{what} ({reason}); check or recreate it")


# ---------------------------------------------------------------------------------------------
# Format detection
# ---------------------------------------------------------------------------------------------


def _suffix_format(path: Path) -> str | None:
    """The file format named by ``path``'s suffix (``.gz`` looked through), or None."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    return _SUFFIXES.get(suffixes[-1]) if suffixes else None


def data_format(source: str) -> str:
    """Which loader :func:`load_rows` uses for ``source``.

    Returns ``"jsonl"``, ``"json"``, ``"csv"``, ``"parquet"`` (by suffix, also gzipped, whether
    or not the file exists), ``"dataset"`` (an existing folder) or ``"hub"`` (anything else).
    """
    path = Path(source).expanduser()
    if path.is_dir():
        return "dataset"
    fmt = _suffix_format(path)
    if fmt is not None:
        return fmt
    return "hub"


def _is_gzip(path: Path) -> bool:
    return path.suffix.lower() == ".gz"


def _open_binary(path: Path) -> IO[bytes]:
    """Open ``path`` for reading bytes, decompressing ``.gz`` on the fly."""
    if _is_gzip(path):
        return gzip.GzipFile(path, "rb")  # type: ignore[return-value]  # GzipFile is a binary IO
    return open(path, "rb")


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def load_rows(
    source: str,
    split: str = "train",
    *,
    flag: str = "--data",
    split_flag: str | None = "--split",
) -> datasets.Dataset:
    """Load the rows of ``source`` as a :class:`datasets.Dataset`.

    ``source`` is a JSONL, JSON (a list of objects, or one object per line), CSV or Parquet file,
    each optionally gzipped (``train.jsonl.gz``); a ``datasets.save_to_disk`` folder (``split``
    picks from a DatasetDict); or a hub dataset name loaded with ``datasets.load_dataset``.
    Raises :class:`DataError` for a missing file, a malformed line or an empty dataset, naming
    ``flag`` (the flag or key that gave ``source``). A plain file has one set of rows, called
    "train": another ``split`` is refused, naming ``split_flag`` (None: any split is ignored,
    for a caller whose default split name a file cannot have).
    """
    fmt = data_format(source)
    path = Path(source).expanduser()
    if fmt in ("jsonl", "json", "csv", "parquet"):
        if not path.is_file():
            raise DataError(f"{source}: no such file; check the {flag} path")
        _check_file_split(source, split, split_flag)
        try:
            dataset = _FILE_LOADERS[fmt](path)
        except _UNREADABLE as e:  # e.g. a corrupt, truncated or mislabelled .gz file
            raise _unreadable(source, e) from None
    elif fmt == "dataset":
        dataset = _load_saved(path, split, flag, split_flag or "--split")
    elif path.is_file():
        raise DataError(
            f"{source}: unknown file type; use .jsonl, .json, .csv or .parquet (optionally .gz)"
        )
    else:
        dataset = _load_hub(source, split, flag)
    if dataset.num_rows == 0:
        raise DataError(f"no rows in {source}; give a file or split with at least one row")
    logger.info("loaded %d rows (%s) from %s", dataset.num_rows, fmt, source)
    return dataset


def _check_file_split(source: str, split: str, split_flag: str | None) -> None:
    """A plain file has no splits: only the default name, "train", means its rows."""
    if split_flag is not None and split != "train":
        raise DataError(
            f"{split_flag} {split}: {source} is a plain file with one set of rows and no "
            f"splits; leave {split_flag} out, or use a saved dataset or hub dataset that has "
            f"a {split!r} split"
        )


def _load_jsonl(path: Path) -> datasets.Dataset:
    rows, where = [], []
    for index, (line_no, obj) in enumerate(_iter_json_lines(path)):
        rows.append(obj)
        where.append(row_label(index, line_no))
    return _rows_to_dataset(rows, path, where)


def _iter_json_lines(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line number, object)`` for each non-blank line, validating as it goes."""
    index = 0  # the row a bad line would have been
    for line_no, raw in _iter_raw_lines(path):
        if not raw.strip():
            continue
        where = f"{path.name} {row_label(index, line_no)}"
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{where}: not valid UTF-8 ({e.reason})") from None
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: invalid JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise DataError(
                f"{where}: expected a JSON object, got {_json_kind(obj)}; "
                "write one {...} object per line"
            )
        yield line_no, obj
        index += 1


def _iter_raw_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """Yield ``(1-based line number, raw bytes incl. newline)``, with a leading BOM removed.

    Lines are split on ``\\n`` only: valid JSON may hold a raw U+2028 inside a string, which
    ``str.splitlines`` would wrongly treat as a line break.
    """
    with _open_binary(path) as f:
        for line_no, raw in enumerate(f, start=1):
            if line_no == 1 and raw.startswith(_BOM):
                raw = raw[len(_BOM) :]
            yield line_no, raw


def _json_kind(obj: Any) -> str:
    names = {list: "a list", str: "a string", bool: "a boolean", int: "a number"}
    names.update({float: "a number", type(None): "null", dict: "an object"})
    return names.get(type(obj), type(obj).__name__)


def _json_is_list(path: Path) -> bool:
    """Whether a ``.json`` file holds one JSON array (rather than one object per line)."""
    with _open_binary(path) as f:
        head = f.read(4096).removeprefix(_BOM).lstrip()
        while head == b"":
            chunk = f.read(4096)
            if not chunk:
                return False
            head = chunk.lstrip()
    return head.startswith(b"[")


def _load_json(path: Path) -> datasets.Dataset:
    if not _json_is_list(path):
        try:
            return _load_jsonl(path)
        except DataError as line_error:
            # One pretty-printed object (e.g. {"data": [...]}) fails line by line; say so plainly.
            if _is_one_object(path):
                raise DataError(
                    f"{path.name}: the file is one JSON object; expected a list of objects "
                    "[{...}, ...] or one object per line"
                ) from None
            raise line_error from None
    items = _parse_whole_json(path)
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise DataError(
                f"{path.name} {row_label(i)}: expected a JSON object, got {_json_kind(item)}; "
                "the list must hold one {...} object per row"
            )
    return _rows_to_dataset(items, path, [row_label(i) for i in range(len(items))])


def _is_one_object(path: Path) -> bool:
    try:
        return isinstance(_parse_whole_json(path), dict)
    except DataError:
        return False


def _parse_whole_json(path: Path) -> Any:
    with _open_binary(path) as f:
        data = f.read()
    try:
        return json.loads(data.removeprefix(_BOM).decode("utf-8"))
    except UnicodeDecodeError as e:
        raise DataError(f"{path.name}: not valid UTF-8 ({e.reason})") from None
    except json.JSONDecodeError as e:
        raise DataError(
            f"{path.name} line {e.lineno} column {e.colno}: invalid JSON ({e.msg})"
        ) from None


def _load_csv(path: Path) -> datasets.Dataset:
    header, records = _read_csv(path)
    columns = {name: [rec[j] for _, rec in records] for j, name in enumerate(header)}
    return datasets.Dataset.from_dict(columns, features=_string_features(header))


def _string_features(names: Sequence[str]) -> datasets.Features:
    return datasets.Features({name: datasets.Value("string") for name in names})


def _read_csv(path: Path) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """The CSV header and its non-blank records as ``(line number, fields)``."""
    with _open_binary(path) as fb, io.TextIOWrapper(fb, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f)
        try:
            header: list[str] | None = None
            records: list[tuple[int, list[str]]] = []
            for rec in reader:
                if not rec:  # csv yields [] for a blank line
                    continue
                if header is None:
                    header = _check_header(path, rec)
                    continue
                if len(rec) != len(header):
                    raise DataError(
                        f"{path.name} {row_label(len(records), reader.line_num)}: {len(rec)} "
                        f"fields, the header has {len(header)}; quote fields that contain "
                        "commas or newlines"
                    )
                records.append((reader.line_num, rec))
        except csv.Error as e:
            where = row_label(len(records), reader.line_num)
            raise DataError(f"{path.name} {where}: invalid CSV ({e})") from None
        except UnicodeDecodeError as e:
            raise DataError(f"{path.name}: not valid UTF-8 ({e.reason})") from None
    return header or [], records


def _check_header(path: Path, header: list[str]) -> list[str]:
    seen: set[str] = set()
    for name in header:
        if not name:
            raise DataError(f"{path.name}: the CSV header has an empty column name; name it")
        if name in seen:
            raise DataError(f"{path.name}: column '{name}' appears twice in the CSV header")
        seen.add(name)
    return header


def _read_parquet(path: Path) -> pa.Table:
    try:
        if _is_gzip(path):
            with gzip.open(path, "rb") as f:
                return pq.read_table(io.BytesIO(f.read()))
        return pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path.name}: not a readable Parquet file ({e})") from None


def _load_parquet(path: Path) -> datasets.Dataset:
    from datasets.table import InMemoryTable

    return datasets.Dataset(InMemoryTable(_read_parquet(path)))


_FILE_LOADERS = {
    "jsonl": _load_jsonl,
    "json": _load_json,
    "csv": _load_csv,
    "parquet": _load_parquet,
}


def _rows_to_dataset(rows: list[dict[str, Any]], path: Path, where: list[str]) -> datasets.Dataset:
    """Build a Dataset from row dicts; a field missing from a row becomes None (null).

    ``where`` names each row for error messages (:func:`row_label`).
    """
    names: dict[str, None] = {}  # an ordered set: columns in order of first appearance
    for row in rows:
        names.update(dict.fromkeys(row))
    if rows and not names:
        raise DataError(f"{path.name}: the rows have no fields; each row needs e.g. prompt/answer")
    columns = {name: [row.get(name) for row in rows] for name in names}
    try:
        return datasets.Dataset.from_dict(columns)
    except (pa.ArrowException, TypeError, ValueError) as e:
        # Arrow needs one type per column; find the first row that breaks it and name it.
        for name, values in columns.items():
            _check_column_types(path, name, values, where)
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DataError(f"{path.name}: the rows do not form a table ({reason})") from None


def _check_column_types(path: Path, name: str, values: list[Any], where: list[str]) -> None:
    """Raise a DataError naming the first value whose type differs from the column's first."""
    first: tuple[type, int] | None = None
    for i, value in enumerate(values):
        if value is None:
            continue
        # ints and floats share a column (Arrow makes it float); every other type must match
        kind = float if isinstance(value, int) and not isinstance(value, bool) else type(value)
        if first is None:
            first = (kind, i)
        elif kind is not first[0]:
            raise DataError(
                f"{path.name} {where[i]}: field '{name}' is {_json_kind(value)} but "
                f"{where[first[1]]} has {_json_kind(values[first[1]])}; "
                "give the field one type in every row"
            )
    try:
        pa.array(values)
    except (pa.ArrowException, TypeError, ValueError) as e:
        raise DataError(
            f"{path.name}: field '{name}' has values of mixed structure ({e})"
        ) from None


def _load_saved(path: Path, split: str, flag: str, split_flag: str) -> datasets.Dataset:
    """Load a ``datasets.save_to_disk`` folder; a DatasetDict gives its ``split``."""
    if not any((path / marker).is_file() for marker in _SAVED_MARKERS):
        raise DataError(
            f"{path}: a folder but not a datasets.save_to_disk folder; "
            f"point {flag} at a .jsonl/.json/.csv/.parquet file or a saved dataset"
        )
    try:
        loaded = datasets.load_from_disk(str(path))
    except (FileNotFoundError, OSError, ValueError) as e:
        raise DataError(f"{path}: cannot load the saved dataset ({e})") from None
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            splits = ", ".join(sorted(loaded)) or "none"
            raise DataError(
                f"{path}: no split '{split}' (splits: {splits}); pick one with {split_flag}"
            )
        return loaded[split]
    return loaded


def _load_hub(name: str, split: str, flag: str) -> datasets.Dataset:
    """Load ``name`` from the Hugging Face hub (needs a network)."""
    check_hub_dataset(name, flag)
    try:
        loaded = datasets.load_dataset(name, split=split)
    except Exception as e:  # any failure (network, auth, unknown name) means the same to the user
        raise DataError(
            f"{name}: no such file or folder here, and loading it as a hub dataset failed "
            f"({first_line(e)}); check the {flag} path"
        ) from None
    if not isinstance(loaded, datasets.Dataset):
        raise DataError(f"{name}: the hub returned {type(loaded).__name__}, expected one split")
    return loaded


def check_hub_dataset(name: str, flag: str = "--data") -> None:
    """Before ``datasets.load_dataset`` (which retries for half a minute on a dead network):
    a dataset already cached passes; with ``HF_HUB_OFFLINE`` set any other fails at once;
    else one request without retries asks the hub whether it exists. As for hub models
    (:func:`speccore.models.load.check_model_name`), each failure is one :class:`DataError`."""
    from huggingface_hub import constants

    from ..utils.io import ask_hub, hub_offline

    not_here = f"{flag} {name}: no such file or folder here"
    if _hub_dataset_cached(name):
        return  # datasets loads it from its cache without a network
    if hub_offline():
        raise DataError(
            f"{not_here}, and as a hub dataset it is not in the local cache while "
            "HF_HUB_OFFLINE is set: unset it to download the dataset, or pass a local file"
        )
    answer, detail = ask_hub("dataset", name)
    if answer == "invalid":
        raise DataError(f"{not_here}, and it is not a hub dataset name; check the path")
    if answer == "missing":
        raise DataError(
            f"{not_here}, and no such dataset on the hub (or it is private: log in with "
            "`hf auth login`); check the path or the name"
        )
    if answer == "unsure":
        logger.warning("could not check dataset %r on the hub: %s", name, detail)
    elif answer == "unreachable":
        raise DataError(
            f"{not_here}, and the Hugging Face hub at {constants.ENDPOINT} cannot be reached "
            f"({detail}); this machine looks offline: pass a local file, or set "
            "HF_HUB_OFFLINE=1 to use datasets already in the local cache"
        )


def _hub_dataset_cached(name: str) -> bool:
    """Whether the hub cache or the ``datasets`` cache holds some of dataset ``name``."""
    from huggingface_hub import constants

    hub = Path(constants.HF_HUB_CACHE) / f"datasets--{name.replace('/', '--')}"
    own = Path(datasets.config.HF_DATASETS_CACHE) / name.replace("/", "___")
    return hub.is_dir() or own.is_dir()


# ---------------------------------------------------------------------------------------------
# Writing a coreset
# ---------------------------------------------------------------------------------------------


def write_coreset(
    source: str,
    dataset: datasets.Dataset,
    indices: Sequence[int],
    out_dir: Path,
    split: str = "train",
) -> Path:
    """Write the rows at ``indices`` of ``source``, unchanged and in their original order.

    The output keeps the input's format: ``coreset.jsonl`` (the original lines, byte for byte,
    decompressed), ``coreset.json``, ``coreset.csv`` (original header and cell text) or
    ``coreset.parquet``; a saved or hub dataset becomes ``coreset.jsonl`` written from
    ``dataset``. ``dataset`` is what :func:`load_rows` returned for ``source`` and ``split``.
    The file is written atomically. Returns its path.
    """
    keep = _sorted_indices(indices, dataset.num_rows)
    try:
        out = _write_subset(source, dataset, keep, Path(out_dir))
    except (EOFError, zlib.error, gzip.BadGzipFile, UnicodeDecodeError) as e:
        # The input is read again here; it may have been damaged since it was loaded. Only
        # decoding errors are caught: an OSError may as well come from writing the output.
        raise _unreadable(source, e) from None
    logger.info("wrote %d of %d rows to %s", len(keep), dataset.num_rows, out)
    return out


def _write_subset(source: str, dataset: datasets.Dataset, keep: list[int], out_dir: Path) -> Path:
    fmt = data_format(source)
    path = Path(source).expanduser()
    if fmt == "jsonl":
        out = out_dir / "coreset.jsonl"
        _write_lines(path, keep, dataset.num_rows, out)
    elif fmt == "json":
        out = out_dir / "coreset.json"
        if _json_is_list(path):
            _write_json_list(path, keep, dataset.num_rows, out)
        else:
            _write_lines(path, keep, dataset.num_rows, out)
    elif fmt == "csv":
        out = out_dir / "coreset.csv"
        _write_csv(path, keep, dataset.num_rows, out)
    elif fmt == "parquet":
        out = out_dir / "coreset.parquet"
        table = _read_parquet(path)
        _check_unchanged(path, table.num_rows, dataset.num_rows)
        table = table.take(pa.array(keep, type=pa.int64()))
        with atomic_path(out) as tmp:
            pq.write_table(table, tmp)
    else:
        out = out_dir / "coreset.jsonl"
        _write_dataset_jsonl(dataset, keep, out)
    return out


def _sorted_indices(indices: Sequence[int], n_rows: int) -> list[int]:
    keep = sorted({int(i) for i in indices})
    if keep and (keep[0] < 0 or keep[-1] >= n_rows):
        bad = keep[0] if keep[0] < 0 else keep[-1]
        raise ValueError(f"coreset index {bad} out of range for {n_rows} rows")
    return keep


def _write_lines(path: Path, keep: list[int], n_rows: int, out: Path) -> None:
    """Copy the kept non-blank lines of a JSON-lines file byte for byte."""
    wanted = set(keep)
    row = -1
    with atomic_path(out) as tmp, open(tmp, "wb") as f:
        for _, raw in _iter_raw_lines(path):
            if not raw.strip():
                continue  # blank lines have no row number (as in load_rows)
            row += 1
            if row in wanted:
                f.write(raw if raw.endswith(b"\n") else raw + b"\n")
        _check_unchanged(path, row + 1, n_rows)  # inside the block: no partial file is left


def _check_unchanged(path: Path, found: int, n_rows: int) -> None:
    """Row indices only mean the same rows if the file still has as many rows as when loaded."""
    if found != n_rows:
        raise DataError(
            f"{path.name} changed since it was loaded ({found} rows, was {n_rows}); rerun"
        )


def _write_json_list(path: Path, keep: list[int], n_rows: int, out: Path) -> None:
    items = _parse_whole_json(path)
    _check_unchanged(path, len(items), n_rows)
    with atomic_path(out) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump([items[i] for i in keep], f, ensure_ascii=False, indent=2)
        f.write("\n")


def _write_csv(path: Path, keep: list[int], n_rows: int, out: Path) -> None:
    header, records = _read_csv(path)
    _check_unchanged(path, len(records), n_rows)
    with _open_binary(path) as fb:
        crlf = fb.readline().endswith(b"\r\n")  # keep the file's line ending style
    with atomic_path(out) as tmp, open(tmp, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, lineterminator="\r\n" if crlf else "\n")
        writer.writerow(header)
        writer.writerows(records[i][1] for i in keep)


def _write_dataset_jsonl(dataset: datasets.Dataset, keep: list[int], out: Path) -> None:
    subset = dataset.select(keep)
    with atomic_path(out) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for row in subset:
            text = json.dumps(row, ensure_ascii=False, default=_to_json)
            # U+2028/U+2029 are valid inside JSON strings, but line readers that split on
            # every Unicode line break would cut the row in two; escape them.
            f.write(text.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029"))
            f.write("\n")


def _to_json(obj: Any) -> Any:
    """JSON form of values a Dataset row may hold beyond plain JSON types."""
    if isinstance(obj, dt.date | dt.time):  # datetime is a date
        return obj.isoformat()
    if isinstance(obj, np.generic | np.ndarray):
        return obj.tolist()
    raise DataError(
        f"cannot write a {type(obj).__name__} value to coreset.jsonl; "
        "select columns of text, numbers and lists only"
    )
