"""JSON and JSONL manifests written atomically, read back with a clear error when missing."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

from pipeline.images import atomic_path


def write_json(path: str | Path, data: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def write_jsonl(path: str | Path, records: Iterable[dict[str, Any]]) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record, sort_keys=False) + "\n")


def read_json(path: str | Path, stage: str) -> Any:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run `dvc repro {stage}` first")
    return json.loads(path.read_text(encoding="utf-8"))


def read_jsonl(path: str | Path, stage: str) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run `dvc repro {stage}` first")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
