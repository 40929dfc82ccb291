"""JSONL records of the offline pipeline, read in one place: `drllm search` writes one line per example
(task, id, prompt, target plan, ...); `drllm train`, `calibrate --order-from`, `search --done/--ids-from`
and `search-summary` read them back, keyed by (task, id)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

Key = tuple[str, str]  # (task, example id)


def read_jsonl(path: str | Path) -> Iterator[dict]:
    """The JSON object of every non-blank line of `path`. A last line without its newline that does not parse
    is what a run stopped mid-write leaves: it is skipped (the writer truncates it, `drop_torn_tail`).
    Raises ValueError naming the file and line for any other bad line, or for a line that is no object."""
    text = Path(path).read_text()
    lines = text.splitlines()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            if n == len(lines) and not text.endswith("\n"):
                return  # a torn last line
            raise ValueError(f"{path}:{n}: not JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise ValueError(f"{path}:{n}: a JSON object per line expected")
        yield obj


def drop_torn_tail(path: Path) -> bool:
    """Truncate `path` after its last newline (a line torn by a stopped run), so that appending resumes on a
    clean line. Returns whether anything was dropped."""
    if not path.exists() or path.stat().st_size == 0:
        return False
    with open(path, "r+b") as f:
        f.seek(-1, 2)
        if f.read(1) == b"\n":  # the usual case: only the last byte is read
            return False
        f.seek(0)
        data = f.read()
        f.truncate(data.rfind(b"\n") + 1)
    return True


def check_model(records: Iterable[dict], fingerprint: str, what: str) -> None:
    """Raises ValueError when a record was made with another base model (its `model_fingerprint`; records
    written before it was recorded carry none and pass)."""
    for r in records:
        fp = r.get("model_fingerprint")
        if fp and fingerprint and fp != fingerprint:
            raise ValueError(f"{what}: record {r.get('task')}/{r.get('id')} was made with another base model "
                             f"(weights fingerprint {fp}, this model's is {fingerprint})")


def record_key(record: dict) -> Key:
    """(task, id) of a search record. Raises ValueError for a record without them."""
    try:
        return record["task"], record["id"]
    except KeyError as e:
        raise ValueError(f"not a search record (no {e.args[0]!r}): {str(record)[:80]}") from None


def read_records(paths: Iterable[str | Path]) -> dict[Key, dict]:
    """Search JSONL files merged by key (shards merge; a later record of the same example wins)."""
    return {record_key(r): r for path in paths for r in read_jsonl(path)}
