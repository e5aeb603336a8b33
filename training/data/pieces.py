"""A source's input divided into pieces, and one piece tokenized by a worker process.

A piece is the unit of parallel work and of the ledger:
- ``range``: a byte range of a local ``.jsonl`` file (the embedded corpus included), cut every
  ``piece_bytes`` at the next newline, so one big file is split across workers;
- ``file``: one other local file (``.json``, ``.parquet``, ``.txt``), read by ``datasets``;
- ``shard``: shard ``i`` of a Hub source's streaming ``IterableDataset`` (``.shard(n, i)``).

The plan depends on the inputs and ``piece_bytes`` only, never on the number of workers, so the
pieces (and what the merge makes of them, in piece order) are the same at any ``--num-proc``.

`tokenize_piece` runs where the text is: it reads, renders and filters the piece's records, drops
empty and non-UTF-8 documents and duplicates within the piece, encodes, and writes
``<piece>.tok`` (ids, each document ending with <|endoftext|>), ``.dig`` (blake2b-64 per document)
and ``.len`` (tokens per document) to temp names, renamed, then ``<piece>.json``: the piece's
commit point. Token arrays never cross a process boundary; the merge reads the files.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

from training.data import shards
from training.data.mixture import SourceSpec, describe, open_records
from training.data.renderers import CHAT_SCHEMAS, MissingField, get_renderer

PIECE_BYTES = 8 << 20  # a piece is about 8 MiB of input: small enough to balance 2..64 workers
_BATCH = 256  # documents per encode call


def digest(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def _byte_ranges(path: str, piece_bytes: int) -> list[tuple[int, int]]:
    """[start, end) ranges of about `piece_bytes`, each ending after a newline (or at EOF)."""
    size, cuts = os.path.getsize(path), [0]
    with open(path, "rb") as fh:
        while cuts[-1] + piece_bytes < size:
            fh.seek(cuts[-1] + piece_bytes)
            fh.readline()
            if fh.tell() >= size:
                break
            cuts.append(fh.tell())
    return [(a, b) for a, b in zip(cuts, cuts[1:] + [size]) if b > a]


def plan_pieces(spec: SourceSpec, work_dir: str | Path, piece_bytes: int = PIECE_BYTES) -> list[dict]:
    """The source's pieces in order. Opens Hub sources (so an unreachable id fails here, before any
    worker starts, naming the source)."""
    if spec.embedded is not None:
        from training.data import corpus

        files = [str(corpus.materialize(Path(work_dir) / "embedded", spec.embedded, max_bytes=spec.max_bytes))]
    elif spec.hub_id is None:
        files = list(spec.data_files)
    else:
        try:
            ds = open_records(spec, work_dir)
        except Exception as exc:  # noqa: BLE001 - any failure to reach the Hub is reported the same way
            raise ValueError(f"{describe(spec)}: source {spec.name!r} cannot be opened: {exc}") from None
        n = ds.num_shards
        return [{"kind": "shard", "shard": i, "num_shards": n} for i in range(n)]
    pieces = []
    for f in files:
        if f.endswith(".jsonl") and (spec.format in (None, "json")):
            pieces += [{"kind": "range", "file": f, "start": a, "end": b} for a, b in _byte_ranges(f, piece_bytes)]
        else:
            pieces.append({"kind": "file", "file": f})
    return pieces


def plan_digest(spec: SourceSpec, pieces: list[dict]) -> str:
    """What the merge's result depends on: the pieces, and for local files their sizes and mtimes."""
    stat = sorted({(p["file"], os.stat(p["file"]).st_size, os.stat(p["file"]).st_mtime_ns) for p in pieces if "file" in p})
    blob = json.dumps([spec.identity(), pieces, stat], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _range_records(piece: dict, where: str):
    with open(piece["file"], "rb") as fh:
        fh.seek(piece["start"])
        data = fh.read(piece["end"] - piece["start"])
    # Bytes that are not UTF-8 become U+FFFD, as in datasets' json builder; such documents are dropped.
    for i, line in enumerate(data.decode("utf-8", errors="replace").split("\n")):
        if line.strip():
            try:
                yield json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{where}, line {i + 1}: not JSON ({exc.msg})") from None


def iter_piece_records(spec: SourceSpec, piece: dict, work_dir: str | Path):
    if piece["kind"] == "range":
        where = piece["file"] + (f" (from byte {piece['start']})" if piece["start"] else "")
        return _range_records(piece, where)
    if piece["kind"] == "file":
        return iter(open_records(replace(spec, data_files=[piece["file"]]), work_dir))
    return iter(open_records(spec, work_dir).shard(num_shards=piece["num_shards"], index=piece["shard"]))


def piece_where(spec: SourceSpec, piece: dict) -> str:
    if piece["kind"] == "shard":
        return f"{describe(spec)} shard {piece['shard']}/{piece['num_shards']}"
    return piece["file"] + (f" (from byte {piece['start']})" if piece.get("start") else "")


def piece_path(pieces_dir: Path, source: str, index: int) -> Path:
    return pieces_dir / source / f"p-{index:06d}"


def read_piece(stem: Path, dtype: np.dtype) -> tuple[dict, np.ndarray, np.ndarray, np.ndarray]:
    ledger = json.loads(stem.with_suffix(".json").read_text())
    return (ledger, np.fromfile(stem.with_suffix(".tok"), dtype=dtype),
            np.fromfile(stem.with_suffix(".dig"), dtype=np.uint64), np.fromfile(stem.with_suffix(".len"), dtype=np.uint32))  # fmt: skip


_TOKENIZERS: dict = {}
_ENCODER: list = []


def _encoder() -> ThreadPoolExecutor:
    """Two encode calls at a time (this thread's and one background call), per process."""
    if not _ENCODER:
        _ENCODER.append(ThreadPoolExecutor(2, thread_name_prefix="encode"))
    return _ENCODER[0]


def _tokenizer(path: str, plain_text: bool):
    from tokenizers import Tokenizer

    key = (path, plain_text)
    if key not in _TOKENIZERS:
        tok = Tokenizer.from_file(path)
        tok.encode_special_tokens = plain_text  # web text cannot forge control tokens
        _TOKENIZERS[key] = tok
    return _TOKENIZERS[key]


def tokenize_piece(job: dict, index: int) -> dict:
    """Tokenize piece `index` of `job["spec"]` into its files; returns its ledger entry. A piece
    whose ledger exists is not redone."""
    spec, piece = SourceSpec(**job["spec"]), job["pieces"][index]
    stem = piece_path(Path(job["pieces_dir"]), spec.name, index)
    stamp = {"fingerprint": job["fingerprint"], "plan": job["plan"]}
    if stem.with_suffix(".json").is_file():
        ledger = json.loads(stem.with_suffix(".json").read_text())
        if {k: ledger.get(k) for k in stamp} == stamp:
            return ledger  # done by an earlier run or another task of this plan
    stem.parent.mkdir(parents=True, exist_ok=True)
    tok = _tokenizer(job["tokenizer_file"], spec.schema not in CHAT_SCHEMAS)
    dtype, eos = np.dtype(job["dtype"]), job["eos_id"]
    render, where = get_renderer(spec.schema), piece_where(spec, piece)
    c = {"records": 0, "documents": 0, "tokens": 0, "dropped_empty": 0, "dropped_non_utf8": 0, "dropped_duplicate": 0}
    seen: set[int] = set()
    texts: list[str] = []
    digests: list[int] = []
    ids: list[int] = []
    lengths: list[int] = []

    # Two batches in flight: `encode_batch_fast` releases the GIL, so while the Rust pool finishes
    # one batch's longest documents (its tail), it already works on the next, and this thread
    # reads and renders the one after.
    pending: deque = deque()

    def collect():
        for enc in pending.popleft().result():
            ids.extend(enc.ids)
            ids.append(eos)
            lengths.append(len(enc.ids) + 1)

    def flush():
        pending.append(_encoder().submit(tok.encode_batch_fast, list(texts), add_special_tokens=False))
        texts.clear()
        while len(pending) > 2:
            collect()

    for record in iter_piece_records(spec, piece, job["work_dir"]):
        c["records"] += 1
        try:
            text = render(record, spec.fields)
        except MissingField as exc:
            raise ValueError(f"{where}: source {spec.name!r}, record {c['records']}: {exc}") from None
        if not isinstance(text, str) or not text.strip():
            c["dropped_empty"] += 1
            continue
        try:
            data = text.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates
            data = None
        if data is None or "\ufffd" in text:  # U+FFFD: bytes that were not UTF-8
            c["dropped_non_utf8"] += 1
            continue
        d = digest(data)
        if d in seen:
            c["dropped_duplicate"] += 1
            continue
        seen.add(d)
        texts.append(text)
        digests.append(d)
        if len(texts) >= _BATCH:
            flush()
    if texts:
        flush()
    while pending:
        collect()
    c["documents"], c["tokens"] = len(digests), len(ids)
    shards.write_array_atomic(stem.with_suffix(".tok"), np.array(ids, dtype=dtype))
    shards.write_array_atomic(stem.with_suffix(".dig"), np.array(digests, dtype=np.uint64))
    shards.write_array_atomic(stem.with_suffix(".len"), np.array(lengths, dtype=np.uint32))
    ledger = {"source": spec.name, "piece": index, **stamp, **c}
    shards.write_json_atomic(stem.with_suffix(".json"), ledger)  # the piece's commit point
    return ledger


def worker_init(rayon_threads: int) -> None:
    """Runs first in each worker process: the tokenizer's Rust pool gets this process's share of cores."""
    os.environ["RAYON_NUM_THREADS"] = str(rayon_threads)


def job_for(spec: SourceSpec, pieces: list[dict], **common) -> dict:
    """Everything a worker needs for one source, as plain data (sent to spawned processes)."""
    return {"spec": asdict(spec), "pieces": pieces, **common}


__all__ = ["PIECE_BYTES", "digest", "job_for", "plan_digest", "plan_pieces", "read_piece", "tokenize_piece",
           "worker_init"]  # fmt: skip
