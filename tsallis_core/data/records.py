"""Loading prompt/answer records from JSONL, with every bad row reported by its index."""

from __future__ import annotations

import json
from pathlib import Path


class DatasetError(ValueError):
    """A dataset file that cannot be used: the message names the file, the row and the field."""


def load_records(path: str | Path, required: tuple[str, ...] = ("prompt", "answer")) -> list[dict]:
    """Rows of a JSONL file, each a dict with string fields ``required`` (row numbers are 0-based)."""
    path = Path(path)
    if path.is_dir():
        raise DatasetError(
            f"dataset file {path} is a directory; give the JSONL file in it (e.g. {path / 'train.jsonl'}) "
            f"as data.train_path or --data"
        )
    if not path.is_file():
        raise DatasetError(f"dataset file {path} does not exist (check data.train_path or --data)")
    rows, problems = [], []
    with path.open("rb") as f:
        for index, raw in enumerate(f):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                problems.append(f"row {index}: not UTF-8 (byte {raw[error.start]:#04x} at offset {error.start})")
                continue
            if not line.strip():
                problems.append(f"row {index}: empty line")
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                problems.append(f"row {index}: not valid JSON ({error.msg})")
                continue
            if not isinstance(row, dict):
                problems.append(f"row {index}: expected a JSON object, got {type(row).__name__}")
                continue
            for field in required:
                if field not in row:
                    problems.append(f"row {index}: missing field {field!r}")
                elif not isinstance(row[field], str) or not row[field].strip():
                    problems.append(f"row {index}: field {field!r} must be a non-empty string, got {row[field]!r}")
            rows.append(row)
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise DatasetError(f"{path}: {len(problems)} bad row(s): {shown}")
    if not rows:
        raise DatasetError(f"{path} is empty: it needs at least one JSON row with fields {', '.join(required)}")
    return rows
