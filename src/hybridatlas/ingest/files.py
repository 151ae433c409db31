"""Opening JSON and CSV files, gzip-aware, with errors that name the file."""

from __future__ import annotations

import csv
import gzip
import io
import json
from pathlib import Path
from typing import Any, Iterator

from hybridatlas.errors import AtlasInputError


def _open_text(path: Path) -> io.TextIOBase:
    if not path.is_file():
        raise AtlasInputError(path, "file not found")
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")  # type: ignore[return-value]
    return open(path, encoding="utf-8", newline="")


def read_json(path: str | Path) -> Any:
    """Parse a JSON or JSON.gz file."""
    path = Path(path)
    try:
        with _open_text(path) as handle:
            return json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError, EOFError, gzip.BadGzipFile) as exc:
        raise AtlasInputError(path, f"not valid JSON: {exc}") from exc


def read_json_lines(path: str | Path) -> list[Any]:
    """Parse a JSON-lines file (one JSON value per non-empty line), naming the first bad line."""
    path = Path(path)
    values = []
    try:
        with _open_text(path) as handle:
            for number, line in enumerate(handle, start=1):
                if line.strip():
                    try:
                        values.append(json.loads(line))
                    except json.JSONDecodeError as exc:
                        raise AtlasInputError(path, f"line {number}: not valid JSON: {exc}") from exc
    except (UnicodeDecodeError, EOFError, gzip.BadGzipFile) as exc:
        raise AtlasInputError(path, f"not valid JSON lines: {exc}") from exc
    return values


def read_csv_rows(path: str | Path, required: list[str]) -> tuple[list[str], Iterator[tuple[int, dict[str, str]]]]:
    """Header and (line number, row) pairs of a CSV file whose header has every `required` column."""
    path = Path(path)
    handle = _open_text(path)
    reader = csv.DictReader(handle)
    header = reader.fieldnames or []
    missing = [column for column in required if column not in header]
    if missing:
        handle.close()
        raise AtlasInputError(path, f"CSV lacks column(s) {missing}; header is {header}")

    def rows() -> Iterator[tuple[int, dict[str, str]]]:
        with handle:
            for row in reader:
                yield reader.line_num, row

    return list(header), rows()


def parse_float(path: str | Path, line: int, column: str, text: str | None) -> float:
    """A CSV cell as float; empty cells are NaN (missing), anything else non-numeric is an error."""
    if text is None or text.strip() == "":
        return float("nan")
    try:
        return float(text)
    except ValueError as exc:
        raise AtlasInputError(path, f"line {line}: column '{column}' is not a number: {text!r}") from exc
