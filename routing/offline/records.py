"""JSONL records of the offline pipeline, read in one place: `drllm search` writes one line per example
(task, id, prompt, target plan, ...); `drllm train`, `calibrate --order-from`, `search --done/--ids-from`
and `search-summary` read them back, keyed by (task, id)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

Key = tuple[str, str]  # (task, example id)


def read_jsonl(path: str | Path) -> Iterator[dict]:
    """The JSON object of every non-blank line of `path`. Raises json.JSONDecodeError for a bad line."""
    for line in Path(path).read_text().splitlines():
        if line.strip():
            yield json.loads(line)


def record_key(record: dict) -> Key:
    return record["task"], record["id"]


def read_records(paths: Iterable[str | Path]) -> dict[Key, dict]:
    """Search JSONL files merged by key (shards merge; a later record of the same example wins)."""
    return {record_key(r): r for path in paths for r in read_jsonl(path)}
