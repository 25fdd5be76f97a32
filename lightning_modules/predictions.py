"""The per-sample predictions file of a run, appended batch by batch so a killed run can resume.

Each line is one answered sample (id, question, answer, task, prediction, and what it cost). A run
killed while writing leaves at most one torn last line; `read_predictions` drops it, so the sample
is simply answered again.
"""

from __future__ import annotations

import json
from pathlib import Path


def append_predictions(path: str | Path, rows: list[dict]) -> None:
    """Append `rows` as JSON lines in one write, flushed, so a kill loses at most the batch being written."""
    if not rows:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as file:
        file.write("".join(json.dumps(row, default=str) + "\n" for row in rows))
        file.flush()


def read_predictions(path: str | Path) -> list[dict]:
    """The rows of `path` in file order ([] when it does not exist).

    An unparsable last line is a write cut short by a kill and is ignored; an unparsable line
    anywhere else means the file was damaged some other way, which is an error naming the line.
    """
    path = Path(path)
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            if number == len(lines):
                break
            raise ValueError(f"{path}:{number}: not valid JSON ({err.msg}); only the last line may be torn") from err
    return rows
