"""Read back what an offline W&B run logged, without syncing it.

An offline run keeps everything it logged in ``run-<id>.wandb``: a LevelDB-style log
(https://github.com/google/leveldb/blob/main/doc/log_format.md) of
``wandb.proto.wandb_internal_pb2.Record`` messages. :func:`read_history` returns the run's
history rows (one dict per ``wandb.log`` step) with their values decoded from JSON, so that
tests (and users inspecting a run on a machine with no network) can see exactly what went
to W&B: scalars, image and table references, plots.
"""
from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path
from typing import Iterator

_HEADER = struct.Struct("<4sHB")  # ident, magic, version
_IDENT, _MAGIC, _VERSION = b":W&B", 0xBEE1, 0
_BLOCK = 32768
_RECORD_HEADER = struct.Struct("<IHB")  # crc32 of (type, data), length, type
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4

__all__ = ["find_run_file", "read_records", "read_history", "read_alerts", "read_summary"]


def find_run_file(path: str | Path) -> Path:
    """The ``.wandb`` file of a run: ``path`` itself, or the one file found under it."""
    path = Path(path)
    if path.is_file():
        return path
    found = sorted(path.rglob("*.wandb"))
    if len(found) != 1:
        raise FileNotFoundError(f"expected one .wandb run file under {path}, found {len(found)}: {found}")
    return found[0]


def _payloads(data: bytes, name: str) -> Iterator[bytes]:
    if len(data) < _HEADER.size:
        raise ValueError(f"{name}: too short to be a W&B run file")
    ident, magic, version = _HEADER.unpack_from(data, 0)
    if (ident, magic, version) != (_IDENT, _MAGIC, _VERSION):
        raise ValueError(f"{name}: not a W&B run file (header {ident!r} {magic:#x} v{version})")
    pos, pending = _HEADER.size, b""
    while pos + _RECORD_HEADER.size <= len(data):
        room = _BLOCK - pos % _BLOCK
        if room < _RECORD_HEADER.size:  # block trailer: zero padding
            pos += room
            continue
        checksum, length, kind = _RECORD_HEADER.unpack_from(data, pos)
        if kind == 0 and length == 0:  # zero-filled tail of a file still being written
            break
        start = pos + _RECORD_HEADER.size
        chunk = data[start : start + length]
        if len(chunk) < length:
            break  # truncated last record (the writer was still running)
        if zlib.crc32(chunk, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF != checksum:
            raise ValueError(f"{name}: bad checksum at byte {pos}")
        pos = start + length
        if kind == _FULL:
            yield chunk
        elif kind == _FIRST:
            pending = chunk
        elif kind == _MIDDLE:
            pending += chunk
        elif kind == _LAST:
            yield pending + chunk
            pending = b""
        else:
            raise ValueError(f"{name}: unknown record type {kind} at byte {pos}")


def read_records(path: str | Path) -> list:
    """Every ``Record`` message in a run file (or the run folder holding one)."""
    from wandb.proto import wandb_internal_pb2

    run_file = find_run_file(path)
    records = []
    for payload in _payloads(run_file.read_bytes(), str(run_file)):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        records.append(record)
    return records


def _item_key(item) -> str:
    return item.key if item.key else "/".join(item.nested_key)


def read_history(path: str | Path) -> list[dict]:
    """The run's history rows in order, ``{key: value}`` with values decoded from JSON.

    Media (images, tables, plots) appear as the JSON W&B stores for them (``_type``, paths
    of the files under the run's ``files/`` folder, captions...).
    """
    rows = []
    for record in read_records(path):
        if record.WhichOneof("record_type") != "history":
            continue
        rows.append({_item_key(item): json.loads(item.value_json) for item in record.history.item})
    return rows


def read_alerts(path: str | Path) -> list[dict]:
    """The run's alerts (``run.alert``) in order: ``{"title", "text", "level"}``."""
    alerts = []
    for record in read_records(path):
        if record.WhichOneof("record_type") == "alert":
            alerts.append({"title": record.alert.title, "text": record.alert.text, "level": record.alert.level})
    return alerts


def read_summary(path: str | Path) -> dict:
    """The run's final summary, ``{key: value}`` (later updates win; nested keys joined by '/')."""
    summary: dict = {}
    for record in read_records(path):
        if record.WhichOneof("record_type") != "summary":
            continue
        for item in record.summary.update:
            summary[_item_key(item)] = json.loads(item.value_json)
        for item in record.summary.remove:
            summary.pop(_item_key(item), None)
    return summary
