"""How a benchmark ends: its summary written beside its artifacts and printed as the final JSON line."""

from __future__ import annotations

import json
from pathlib import Path


def save_json(out: Path | None, value, name: str = "summary.json", indent: int | None = 1) -> None:
    """Write `value` as JSON to out/name (creating out); nothing when out is None (no `--out`).
    Benchmarks that write partial results call it as they go."""
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(json.dumps(value, indent=indent) + "\n")


def finish(out: Path | None, summary: dict) -> int:
    """Save the summary, print it as the run's final JSON line, and return the exit status 0."""
    save_json(out, summary)
    print(json.dumps(summary))
    return 0
