"""Reading data sources row by row: JSONL / JSON / CSV / Parquet files, folders of them or written by
``datasets.save_to_disk``, and Hugging Face Hub datasets (see :mod:`hypo.data` for the row formats).

Files are parsed here rather than by ``datasets`` so that every problem names the file and the row:
invalid JSON, bytes that are not UTF-8 (with the field), a CSV row with too few or too many fields, a
quote that is never closed. Row numbers in JSONL and CSV files are line numbers (a CSV header is line 1).

A configuration (subset) name, ``config_name``, selects one of the configurations of a Hub dataset or of a
dataset folder that defines several (``datasets.load_dataset(name, config_name, split=...)``); it does not
apply to single files.
"""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path
from typing import Any

FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
"""File types read from disk; a missing path with one of these suffixes is 'file not found'."""
JSON_LIST_KEYS = ("data", "train", "rows")
"""Keys under which a ``.json`` object may hold its list of rows."""


class DataError(ValueError):
    """A source cannot be read or a row is malformed; the message names source, row and field."""


def _type_name(value: Any) -> str:
    return type(value).__name__


def read_rows(source: str, *, split: str = "train", config_name: str | None = None) -> list[dict]:
    """Read the raw rows of a file, folder or Hub dataset (see the module docstring).

    Files are parsed here so that errors name the file and row: an invalid JSONL line raises
    ``DataError("<file>: row <line>: invalid JSON: ...")``, bytes that are not UTF-8 name the row
    and field, a ragged CSV row names its line.
    """
    rows, _ = read_located_rows(source, split=split, strict=True, config_name=config_name)
    return rows


def read_located_rows(source: str, *, split: str = "train", strict: bool,
                      config_name: str | None = None) -> tuple[list[Any], list[str]]:
    """Rows plus where each one is, ``"<file>: row <n>"`` (JSONL and CSV: n is the line number).

    With ``strict=False`` a row that cannot be read (invalid JSON, not UTF-8, a ragged CSV row, not an
    object) becomes a :class:`DataError` instance in the row list, so the caller can skip it like any
    other bad row; with ``strict=True`` the first one is raised. ``config_name``: the configuration
    (subset) of a Hub dataset or dataset folder; an error for a single file.
    """
    path = Path(source).expanduser()
    if path.is_file():
        if config_name is not None:
            raise DataError(f"{source}: a configuration name ({config_name!r}) applies to Hub datasets and dataset "
                            "folders, not to a single file")
        rows, wheres = _read_data_file(path, source)
    elif path.is_dir():
        files = None if config_name is not None else _folder_data_files(path, source, split)
        if files is None:
            rows = _read_folder(path, source, split, config_name)
            wheres = [f"{source}: row {n}" for n in range(1, len(rows) + 1)]
        else:  # a folder of data files: each file read here, so that errors name it
            rows, wheres = [], []
            for file in files:
                file_rows, file_wheres = _read_data_file(file, str(file))
                rows += file_rows
                wheres += file_wheres
    elif path.suffix.lower() in FILE_SUFFIXES:
        raise DataError(f"{source}: file not found")
    elif source.startswith(("/", "./", "../", "~")):
        raise DataError(f"{source}: path not found")
    else:
        rows = _read_hub(source, split, config_name)
        wheres = [f"{source}: row {n}" for n in range(1, len(rows) + 1)]
    if strict:
        first_bad = next((row for row in rows if isinstance(row, DataError)), None)
        if first_bad is not None:
            raise first_bad
    return rows, wheres


def _read_data_file(path: Path, source: str) -> tuple[list[Any], list[str]]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _read_jsonl(path, source)
    if suffix == ".json":
        return _read_json(path, source)
    if suffix == ".csv":
        return _read_csv(path, source)
    if suffix == ".parquet":
        import datasets

        try:
            rows = datasets.load_dataset("parquet", data_files=str(path), split="train").to_list()
        except Exception as exc:
            raise DataError(f"{source}: cannot read parquet file: {exc}") from exc
        return rows, [f"{source}: row {n}" for n in range(1, len(rows) + 1)]
    raise DataError(
        f"{source}: unsupported file type {suffix!r} (expected one of {', '.join(FILE_SUFFIXES)})"
    )


def _decode(path: Path) -> str:
    """The file's text; bytes that are not UTF-8 become lone surrogates, found later per row."""
    return path.read_bytes().decode("utf-8", errors="surrogateescape").removeprefix("\ufeff")


_NOT_UTF8 = re.compile("[\udc80-\udcff]")
_ESCAPED_NOT_UTF8 = re.compile(r"\\u[dD][cC][89a-fA-F][0-9a-fA-F]")
"""A JSON escape that decodes to one of the characters of `_NOT_UTF8`."""


def _may_hold_not_utf8(text: str) -> bool:
    """Whether any row read from `text` can hold a byte that is not UTF-8: one scan of the whole file, so
    that clean files (nearly all) skip the per-row search (70% of the reading time of a 60k-row file)."""
    return _NOT_UTF8.search(text) is not None or _ESCAPED_NOT_UTF8.search(text) is not None


def _first_not_utf8(value: Any) -> str | None:
    """The first undecodable byte (as its surrogate) in a string or any string nested in ``value``."""
    if isinstance(value, str):
        match = _NOT_UTF8.search(value)
        return match.group() if match else None
    items = [*value.keys(), *value.values()] if isinstance(value, dict) else value if isinstance(value, list) else ()
    for item in items:
        found = _first_not_utf8(item)
        if found:
            return found
    return None


def _printable(text: str) -> str:
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _utf8_problem(row: dict, where: str) -> DataError | None:
    for key, value in row.items():
        char = _first_not_utf8(key) or _first_not_utf8(value)
        if char:
            return DataError(f"{where}: field '{_printable(str(key))}': not UTF-8 text "
                             f"(byte 0x{ord(char) - 0xDC00:02x}); save the file as UTF-8")
    return None


def _check_read_row(row: Any, where: str, utf8: bool = True) -> Any:
    """The row, or the DataError that replaces it: not an object, or (when `utf8`) not UTF-8."""
    if not isinstance(row, dict):
        return DataError(f"{where}: expected a JSON object, got {_type_name(row)}")
    return (_utf8_problem(row, where) if utf8 else None) or row


def _read_jsonl(path: Path, source: str) -> tuple[list[Any], list[str]]:
    rows: list[Any] = []
    wheres: list[str] = []
    text = _decode(path)
    utf8 = _may_hold_not_utf8(text)
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{source}: row {number}"
        try:
            row: Any = _check_read_row(json.loads(line), where, utf8)
        except json.JSONDecodeError as exc:
            char = _first_not_utf8(line)
            row = DataError(f"{where}: not UTF-8 text (byte 0x{ord(char) - 0xDC00:02x}); save the file as UTF-8"
                            if char else f"{where}: invalid JSON: {exc}")
        rows.append(row)
        wheres.append(where)
    return rows, wheres


def _read_json(path: Path, source: str) -> tuple[list[Any], list[str]]:
    text = _decode(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise _not_utf8_at(text, source) or DataError(f"{source}: invalid JSON: {exc}") from None
    if isinstance(data, dict):
        key = next((k for k in JSON_LIST_KEYS if isinstance(data.get(k), list)), None)
        if key is None:
            raise DataError(
                f"{source}: expected a JSON list of objects or an object with a list under 'data', 'train' or 'rows'"
            )
        data = data[key]
    if not isinstance(data, list):
        raise DataError(f"{source}: expected a JSON list of objects, got {_type_name(data)}")
    wheres = [f"{source}: row {n}" for n in range(1, len(data) + 1)]
    rows = [_check_read_row(row, where) for row, where in zip(data, wheres, strict=True)]
    if not any(isinstance(row, DataError) for row in rows) and (error := _not_utf8_at(text, source)):
        raise error  # undecodable bytes outside the rows
    return rows, wheres


def _not_utf8_at(text: str, source: str) -> DataError | None:
    match = _NOT_UTF8.search(text)
    if match is None:
        return None
    line = text.count("\n", 0, match.start()) + 1
    return DataError(f"{source}: line {line}: not UTF-8 text (byte 0x{ord(match.group()) - 0xDC00:02x}); "
                     "save the file as UTF-8")


def _read_csv(path: Path, source: str) -> tuple[list[Any], list[str]]:
    """A CSV file with a header line; every value is a string. Row numbers are line numbers (the header
    is line 1); a row with too few or too many fields is a bad row, a broken quote a file error."""
    text = _decode(path)
    utf8 = _may_hold_not_utf8(text)
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    rows: list[Any] = []
    wheres: list[str] = []
    header: list[str] | None = None
    start = 1  # line on which the next record starts
    while True:
        try:
            record = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            hint = " (a quote that is never closed?)" if "end of data" in str(exc) else ""
            raise DataError(f"{source}: row {start}: invalid CSV (read up to line {reader.line_num}): "
                            f"{exc}{hint}") from None
        where, start = f"{source}: row {start}", reader.line_num + 1
        if not record:  # a blank line
            continue
        if header is None:
            header = record
            duplicates = sorted({name for name in header if header.count(name) > 1})
            if duplicates:
                raise DataError(f"{where}: the header repeats the column(s) {', '.join(duplicates)}")
            continue
        if len(record) != len(header):
            row: Any = DataError(f"{where}: expected {len(header)} fields ({', '.join(header)}), got "
                                 f"{len(record)}")
        else:
            row = _check_read_row(dict(zip(header, record, strict=True)), where, utf8)
        rows.append(row)
        wheres.append(where)
    return rows, wheres


def _folder_data_files(path: Path, source: str, split: str) -> list[Path] | None:
    """The data files of ``split`` in a folder of ``.jsonl``/``.json``/``.csv``/``.parquet`` files, found
    the way ``datasets.load_dataset`` finds them; None when ``datasets`` should read the folder itself
    (a ``save_to_disk`` folder, a README with its own configuration, other file types)."""
    if (path / "state.json").is_file() or (path / "dataset_dict.json").is_file() or (path / "README.md").is_file():
        return None
    from datasets.data_files import DataFilesDict, get_data_patterns

    try:
        files = DataFilesDict.from_patterns(get_data_patterns(str(path)), base_path=str(path))
    except Exception:  # no data files, or a layout datasets reports better itself
        return None
    found = [Path(file) for files_of_split in files.values() for file in files_of_split]
    if not found or any(file.suffix.lower() not in FILE_SUFFIXES for file in found):
        return None
    if split not in files:
        raise DataError(f"{source}: cannot load dataset folder (split {split!r}): no data files for it "
                        f"(found: {', '.join(str(name) for name in files)})")
    return [Path(file) for file in files[split]]


def _read_folder(path: Path, source: str, split: str, config_name: str | None = None) -> list[dict]:
    import datasets

    if (path / "state.json").is_file() or (path / "dataset_dict.json").is_file():
        if config_name is not None:
            raise DataError(f"{source}: a save_to_disk folder has no configurations (got {config_name!r})")
        dataset = datasets.load_from_disk(str(path))
        if isinstance(dataset, datasets.DatasetDict):
            if split not in dataset:
                raise DataError(f"{source}: split {split!r} not found (available: {', '.join(dataset)})")
            dataset = dataset[split]
        return dataset.to_list()
    try:
        dataset = datasets.load_dataset(str(path), config_name, split=split)
    except Exception as exc:
        raise DataError(f"{source}: cannot load dataset folder ({_which(split, config_name)}): {exc}") from exc
    return dataset.to_list()


def _which(split: str, config_name: str | None) -> str:
    return f"split {split!r}" + (f", configuration {config_name!r}" if config_name is not None else "")


def _read_hub(source: str, split: str, config_name: str | None = None) -> list[dict]:
    import datasets

    try:
        dataset = datasets.load_dataset(source, config_name, split=split)
    except Exception as exc:
        raise DataError(f"{source}: cannot load Hugging Face Hub dataset ({_which(split, config_name)}): "
                        f"{exc}") from exc
    return dataset.to_list()
