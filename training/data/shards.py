"""Shard files and the manifest: atomic writes, checksums, memory-mapped reads.

A shard is a flat array of token ids (uint16, or uint32 when the vocabulary does not fit) with
no header: ``np.memmap(path, dtype, mode="r")`` reads it. Every file is written to a temporary
name, fsynced and renamed, so a reader sees a whole shard or none. The manifest records each
shard's token count and sha256; a size mismatch means truncation and is an error naming the file.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """uint16 holds ids < 65536; larger vocabularies widen to uint32 (recorded in the manifest)."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def write_json_atomic(path: Path, obj) -> None:
    write_bytes_atomic(path, (json.dumps(obj, indent=1, ensure_ascii=False) + "\n").encode("utf-8"))


def write_array_atomic(path: Path, arr: np.ndarray) -> str:
    """Write `arr` as raw bytes; returns its sha256."""
    data = np.ascontiguousarray(arr).tobytes()
    write_bytes_atomic(path, data)
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def check_fingerprint(data_dir: str | Path, manifest: dict, expected: str | None) -> None:
    """Refuse shards made by another tokenizer than `expected` (a fingerprint), saying what to do."""
    if expected is None or manifest["fingerprint"] == expected:
        return
    # Manifests from before the byte-level BPE tokenizer record no tokenizer_format.
    made_by = manifest.get("tokenizer_format") or "a byte-fallback BPE (Genesis before the byte-level switch)"
    raise ValueError(
        f"{Path(data_dir) / MANIFEST}: tokenizer fingerprint {manifest['fingerprint'][:16]}... differs from "
        f"this run's {expected[:16]}...: refusing shards made by another tokenizer (theirs: {made_by}). "
        f"Tokenize the data again with this run's tokenizer: genesis data prepare --mixture ... "
        f"--tokenizer DIR --output NEW_DIR"
    )


def read_manifest(data_dir: str | Path) -> dict:
    path = Path(data_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no manifest (data not prepared, or preparation did not finish)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: unreadable manifest ({exc.msg})") from None
    for key in ("format_version", "fingerprint", "dtype", "sources"):
        if key not in manifest:
            raise ValueError(f"{path}: manifest lacks field {key!r}")
    if manifest["format_version"] != FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {manifest['format_version']} != {FORMAT_VERSION}")
    return manifest


def open_shard(data_dir: Path, shard: dict, dtype: np.dtype, *, checksum: bool = False) -> np.memmap:
    """Memory-map one shard after checking its size (and sha256 when `checksum`)."""
    path = Path(data_dir) / shard["file"]
    if not path.is_file():
        raise FileNotFoundError(f"{path}: shard listed in the manifest is missing")
    expected = shard["tokens"] * dtype.itemsize
    size = path.stat().st_size
    if size != expected:
        raise ValueError(f"{path}: truncated or corrupt shard ({size} bytes, manifest says {expected})")
    if checksum and sha256_file(path) != shard["sha256"]:
        raise ValueError(f"{path}: sha256 mismatch (manifest {shard['sha256'][:12]}...)")
    if shard["tokens"] == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r")


def verify(data_dir: str | Path, *, checksum: bool = True, expected_fingerprint: str | None = None) -> dict:
    """Check every shard of a prepared folder; returns the manifest."""
    data_dir = Path(data_dir)
    manifest = read_manifest(data_dir)
    check_fingerprint(data_dir, manifest, expected_fingerprint)
    dtype = np.dtype(manifest["dtype"])
    for src in manifest["sources"].values():
        for shard in src["shards"]:
            open_shard(data_dir, shard, dtype, checksum=checksum)
    return manifest
