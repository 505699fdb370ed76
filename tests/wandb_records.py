"""Read back what a W&B run wrote to its ``.wandb`` file (W&B's LevelDB-style record log)."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Iterator

from wandb.proto import wandb_internal_pb2

_BLOCK = 32768
_HEADER = struct.Struct("<4sHB")  # ":W&B", magic 0xBEE1, version
_RECORD = struct.Struct("<IHB")  # crc32, length, type (1 full, 2 first, 3 middle, 4 last)


def records(path: str | Path) -> Iterator[wandb_internal_pb2.Record]:
    data = Path(path).read_bytes()
    ident, magic, _ = _HEADER.unpack_from(data, 0)
    assert ident == b":W&B" and magic == 0xBEE1, f"{path} is not a W&B run log"
    offset, pending = _HEADER.size, b""
    while offset + _RECORD.size <= len(data):
        if _BLOCK - offset % _BLOCK < _RECORD.size:  # block trailer too small for a header: padding
            offset += _BLOCK - offset % _BLOCK
            continue
        _, length, kind = _RECORD.unpack_from(data, offset)
        offset += _RECORD.size
        chunk, offset = data[offset : offset + length], offset + length
        if kind == 0 and length == 0:
            offset += _BLOCK - offset % _BLOCK if offset % _BLOCK else 0
            continue
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record
            pending = b""


def run_contents(run_dir: str | Path) -> dict:
    """Config keys, history keys, summary keys and history values of the run in ``run_dir``."""
    (log,) = Path(run_dir).glob("*.wandb")
    config, history, summary, values = {}, set(), set(), {}
    for record in records(log):
        kind = record.WhichOneof("record_type")
        if kind == "config":
            for item in record.config.update:
                config[item.key] = json.loads(item.value_json)
        elif kind == "run":
            for item in record.run.config.update:
                config[item.key] = json.loads(item.value_json)
        elif kind == "history":
            for item in record.history.item:
                key = item.key or "/".join(item.nested_key)
                history.add(key)
                values.setdefault(key, []).append(json.loads(item.value_json))
        elif kind == "summary":
            summary |= {item.key or "/".join(item.nested_key) for item in record.summary.update}
    return {"config": config, "history": history, "summary": summary, "values": values}
