"""Write run results atomically: a reader never sees a half-written file."""

from __future__ import annotations

import json
import os
from pathlib import Path


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write to a temporary file beside `path`, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def write_json(path: str | Path, data: dict) -> Path:
    # default=str: pruner arguments may hold tuples or enums; they are written as text, not dropped.
    return write_text_atomic(path, json.dumps(data, indent=2, default=str) + "\n")


def write_jsonl(path: str | Path, rows: list[dict]) -> Path:
    return write_text_atomic(path, "".join(json.dumps(row, default=str) + "\n" for row in rows))
