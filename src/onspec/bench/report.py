"""How a benchmark ends: its summary written beside its artifacts and printed as the final JSON line."""

from __future__ import annotations

import json
from pathlib import Path


def save_summary(out: Path | None, summary: dict, name: str = "summary.json", indent: int = 1) -> None:
    """Write `summary` to out/name (creating out); nothing when out is None. Benchmarks that write
    partial results call it as they go."""
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(json.dumps(summary, indent=indent) + "\n")


def finish(out: Path | None, summary: dict) -> int:
    """Save the summary, print it as the run's final JSON line, and return the exit status 0."""
    save_summary(out, summary)
    print(json.dumps(summary))
    return 0
