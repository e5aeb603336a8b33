"""Read W&B run files (`run-<id>.wandb`, offline or synced) without a W&B server.

The installed wandb (0.31) writes these files from its Go core and ships no Python reader, so
this module reads the container itself; the records inside are wandb's own protobuf
(`wandb.proto.wandb_internal_pb2.Record`). The container is LevelDB's log format:

    file   := header block*            header := ident ":W&B" (4) | magic 0xBEE1 (u16 LE) | version 0 (u8)
    block  := 32 KiB of chunks; a chunk never straddles blocks (< 7 bytes left -> zero padding)
    chunk  := crc32 (u32 LE) | length (u16 LE) | type (u8) | data[length]
    type   := 1 FULL | 2 FIRST | 3 MIDDLE | 4 LAST   (a record split over blocks)
    crc32  := zlib.crc32(data, zlib.crc32(bytes([type])))

A file that ends inside a record is reported as truncated with the byte offset. wandb-core writes
whole blocks as they fill and the last partial one when the run closes, so a live (or killed) run's
file ends at a block boundary, often mid-record (`WandbRun.pending_block`); a cut anywhere else is
damage. A bad header, a checksum mismatch or an undecodable record is corruption. Every error
names the file.
"""

from __future__ import annotations

import json
import math
import re
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from . import InspectError

_HEADER = struct.Struct("<4sHB")
_CHUNK = struct.Struct("<IHB")
_IDENT, _MAGIC, _VERSION = b":W&B", 0xBEE1, 0
_BLOCK = 32768
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4
_TYPE_CRC = [zlib.crc32(bytes([t])) for t in range(5)]


@dataclass
class WandbRun:
    """What a run file holds that the plots need."""

    path: Path
    run_id: str = ""
    start_time: float | None = None
    config: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)  # one dict per wandb.log, keys as logged
    truncated_at: int | None = None  # byte offset of an incomplete final chunk, if any
    n_records: int = 0
    size: int = 0

    @property
    def pending_block(self) -> bool:
        """Truncated exactly at a block boundary: wandb-core writes whole 32 KiB blocks as they
        fill and the last partial one when the run closes, so this is how a live run's file (or a
        killed one's) looks. A cut anywhere else is damage (an interrupted copy, a full disk)."""
        return self.truncated_at is not None and self.size % _BLOCK == 0


def scan(path: str | Path) -> tuple[list[bytes], int | None]:
    """(the raw protobuf bytes of every complete record, offset of a truncated tail or None)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise InspectError(f"{path}: cannot read the wandb run file ({e.strerror})") from e
    if len(data) < _HEADER.size:
        raise InspectError(f"{path}: not a wandb run file (only {len(data)} bytes, no header)")
    ident, magic, version = _HEADER.unpack_from(data, 0)
    if ident != _IDENT or magic != _MAGIC:
        raise InspectError(f"{path}: not a wandb run file (header {data[:7]!r}, expected ':W&B' + 0xBEE1)")
    if version != _VERSION:
        raise InspectError(f"{path}: wandb run file format version {version}; this reader knows {_VERSION}")
    records: list[bytes] = []
    pos, pending = _HEADER.size, None
    while pos < len(data):
        left = _BLOCK - pos % _BLOCK
        if left < _CHUNK.size:  # block trailer: zero padding
            pos += left
            continue
        if pos + _CHUNK.size > len(data):
            return records, pos
        crc, length, kind = _CHUNK.unpack_from(data, pos)
        if kind == 0 and length == 0 and crc == 0:  # zero-filled (preallocated) tail
            if not any(data[pos:]):
                break
        end = pos + _CHUNK.size + length
        if end > len(data):
            return records, pos
        chunk = data[pos + _CHUNK.size : end]
        if kind not in (_FULL, _FIRST, _MIDDLE, _LAST) or zlib.crc32(chunk, _TYPE_CRC[kind]) != crc:
            raise InspectError(f"{path}: corrupt wandb run file: bad chunk at byte {pos} "
                               f"(type {kind}, checksum mismatch); {len(records)} records before it")
        if kind == _FULL:
            records.append(chunk)
        elif kind == _FIRST:
            pending = chunk
        elif pending is None:
            raise InspectError(f"{path}: corrupt wandb run file: continuation chunk at byte {pos} without a start")
        elif kind == _MIDDLE:
            pending += chunk
        else:
            records.append(pending + chunk)
            pending = None
        pos = end
    return records, (pos if pending is not None else None)


def _value(raw: str):
    try:
        v = json.loads(raw)
    except ValueError:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v) if math.isfinite(v) else None


def read_run(path: str | Path) -> WandbRun:
    """Parse the run, config and history records of one run file (truncated tail allowed; see
    `WandbRun.truncated_at`). Raises InspectError naming the file on corruption."""
    from wandb.proto import wandb_internal_pb2 as pb

    path = Path(path)
    raws, truncated = scan(path)
    run = WandbRun(path=path, truncated_at=truncated, n_records=len(raws), size=path.stat().st_size)
    for i, raw in enumerate(raws):
        rec = pb.Record()
        try:
            rec.ParseFromString(raw)
        except Exception as e:  # protobuf's DecodeError
            raise InspectError(f"{path}: corrupt wandb run file: record {i} does not decode ({e})") from e
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            run.run_id = rec.run.run_id
            run.start_time = rec.run.start_time.seconds + rec.run.start_time.nanos / 1e9 or None
            _merge_config(run.config, rec.run.config)
        elif kind == "config":
            _merge_config(run.config, rec.config)
        elif kind == "history":
            row = {}
            for item in rec.history.item:
                key = "/".join(item.nested_key) if item.nested_key else item.key
                v = _value(item.value_json)
                if v is not None:
                    row[key] = v
            if rec.history.HasField("step") and "_step" not in row:
                row["_step"] = float(rec.history.step.num)
            run.history.append(row)
    return run


def _merge_config(out: dict, cfg) -> None:
    for item in cfg.update:
        key = "/".join(item.nested_key) if item.nested_key else item.key
        try:
            value = json.loads(item.value_json)
        except ValueError:
            continue
        # wandb stores each config key as {"value": ..., "desc": ...}
        out[key] = value.get("value", value) if isinstance(value, dict) else value


def find_run_files(folder: str | Path) -> list[Path]:
    """Every run-*.wandb under `folder` (a wandb dir, an output_dir, or one run folder), oldest
    launch first (folder names carry the start time: offline-run-YYYYMMDD_HHMMSS-id)."""
    def started(p: Path) -> str:
        m = re.search(r"\d{8}_\d{6}", p.parent.name)
        return m.group(0) if m else ""

    return sorted(Path(folder).rglob("run-*.wandb"), key=lambda p: (started(p), str(p)))
