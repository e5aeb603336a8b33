"""`genesis data prepare`: a mixture recipe -> checksummed token shards + manifest.json.

    genesis data prepare --mixture training/mixtures/embedded.yaml --tokenizer TOK --output DATA

Per source (sources run in parallel threads; each batch is encoded by the Rust tokenizer's
own thread pool):
  records (datasets streaming) -> renderer -> drop empty / non-UTF-8 / exact duplicates (counted)
  -> held out (content hash < validation_fraction, up to validation_max_tokens) or train
  -> ids + <|endoftext|> -> train-NNNNN.bin / val-NNNNN.bin, uint16 (uint32 past 65,536 ids).

Resumable: at each commit the shard files (and the duplicate-filter digests of their documents)
are written to temp names, fsynced and renamed, and only then ``progress.json`` (records read,
counters, shard list) is replaced. A killed run leaves at worst files that progress.json does
not list; the re-run deletes them and continues from the last commit's record. The folder's
``manifest.json`` is written last: the loader reads nothing without it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import sys
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import asdict
from pathlib import Path

import numpy as np

from training.data import shards
from training.data.mixture import Mixture, SourceSpec, describe, load_mixture, open_records
from training.data.renderers import CHAT_SCHEMAS, MissingField, get_renderer

logger = logging.getLogger(__name__)

EMBEDDED_MIXTURE = Path(__file__).resolve().parents[1] / "mixtures" / "embedded.yaml"
_BATCH = 256  # documents per encode_batch call
_STOP = threading.Event()  # set by prepare() to stop worker threads between batches


def _digest(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


class _SourceWriter:
    """Buffers one source's tokens and commits shards + progress atomically."""

    def __init__(self, out: Path, name: str, state: dict, dtype: np.dtype):
        self.dir, self.name, self.state, self.dtype = out / name, name, state, dtype
        self.buf = {"train": [], "val": []}
        self.buf_tokens = {"train": 0, "val": 0}
        self.new_digests: list[int] = []

    def add(self, split: str, ids: np.ndarray, digest: int) -> None:
        self.buf[split].append(ids)
        self.buf_tokens[split] += len(ids)
        self.new_digests.append(digest)

    def commit(self, records_read: int, complete: bool = False) -> None:
        idx = self.state["commits"]
        for split in ("train", "val"):
            if not self.buf_tokens[split]:
                continue
            arr = np.concatenate(self.buf[split]).astype(self.dtype, copy=False)
            rel = f"{self.name}/{split}-{idx:05d}.bin"
            sha = shards.write_array_atomic(self.dir / f"{split}-{idx:05d}.bin", arr)
            self.state["shards"].append({"file": rel, "split": split, "tokens": int(len(arr)), "sha256": sha})
            self.buf[split], self.buf_tokens[split] = [], 0
        if self.new_digests:
            shards.write_array_atomic(self.dir / f"dedup-{idx:05d}.u64", np.array(self.new_digests, dtype=np.uint64))
            self.state["dedup_files"].append(f"dedup-{idx:05d}.u64")
            self.new_digests = []
        self.state["commits"] = idx + 1
        self.state["records_read"] = records_read
        self.state["complete"] = complete
        shards.write_json_atomic(self.dir / "progress.json", self.state)  # the commit point


def _load_progress(src_dir: Path, fingerprint: str, identity: str, name: str) -> dict:
    path = src_dir / "progress.json"
    fresh = {"fingerprint": fingerprint, "identity": identity, "records_read": 0, "commits": 0,
             "complete": False, "shards": [], "dedup_files": [],
             "counters": {"documents": 0, "train_tokens": 0, "val_tokens": 0, "val_documents": 0,
                          "dropped_empty": 0, "dropped_duplicate": 0, "dropped_non_utf8": 0}}  # fmt: skip
    if not path.is_file():
        return fresh
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: unreadable progress file ({exc.msg})") from None
    if state["fingerprint"] != fingerprint:
        raise ValueError(
            f"{path}: source {name!r} was tokenized with tokenizer {state['fingerprint'][:16]}..., this run uses "
            f"{fingerprint[:16]}...: refusing to mix tokenizers (choose a new --output)"
        )
    if state["identity"] != identity:
        raise ValueError(
            f"{path}: source {name!r} changed (origin, schema, fields or file contents) since its shards were written"
        )
    return state


def _remove_orphans(src_dir: Path, state: dict) -> None:
    keep = {Path(s["file"]).name for s in state["shards"]} | set(state["dedup_files"]) | {"progress.json"}
    for f in src_dir.iterdir():
        if f.name not in keep:
            logger.info("removing uncommitted file %s", f)
            f.unlink()


def _prepare_source(job: dict) -> dict:
    """Tokenize one source into shards; returns its progress state. Runs in a worker thread."""
    from tokenizers import Tokenizer
    from tqdm.auto import tqdm

    spec, mix = SourceSpec(**job["spec"]), job["mixture"]
    out, dtype = Path(job["output_dir"]), np.dtype(job["dtype"])
    src_dir = out / spec.name
    src_dir.mkdir(parents=True, exist_ok=True)
    state = _load_progress(src_dir, job["fingerprint"], spec.identity(), spec.name)
    _remove_orphans(src_dir, state)
    budget = min(b for b in (spec.max_tokens, job["max_tokens"], 1 << 62) if b is not None)
    c = state["counters"]
    if state["complete"] and (c["train_tokens"] >= budget or not state.get("truncated_by_budget")):
        return state
    tok = Tokenizer.from_file(job["tokenizer_file"])
    tok.encode_special_tokens = spec.schema not in CHAT_SCHEMAS  # web text cannot forge control tokens
    eos = np.array([job["eos_id"]], dtype=np.int64)
    seen = set()
    for f in state["dedup_files"]:
        seen.update(np.fromfile(src_dir / f, dtype=np.uint64).tolist())
    writer = _SourceWriter(out, spec.name, state, dtype)
    render = get_renderer(spec.schema)
    records = open_records(spec, job["work_dir"])
    read = state["records_read"]
    if read:
        records = records.skip(read)
    val_cut = int(mix["validation_fraction"] * 2**64)
    bar = tqdm(total=None if budget >= 1 << 62 else budget, initial=c["train_tokens"], unit="tok",
               unit_scale=True, desc=spec.name, position=job["position"], disable=not job["show_progress"])  # fmt: skip

    def flush(batch: list[tuple[str, int]]) -> None:
        encodings = tok.encode_batch([t for t, _ in batch], add_special_tokens=False)
        for (_, digest), enc in zip(batch, encodings):
            ids = np.concatenate([np.asarray(enc.ids, dtype=np.int64), eos])
            held_out = digest < val_cut and c["val_tokens"] + len(ids) <= mix["validation_max_tokens"]
            split = "val" if held_out else "train"
            writer.add(split, ids, digest)
            c["documents"] += 1
            c[f"{split}_tokens"] += len(ids)
            c["val_documents"] += held_out
            if not held_out:
                bar.update(len(ids))

    batch: list[tuple[str, int]] = []
    state["truncated_by_budget"] = False
    try:
        for record in records:
            read += 1
            try:
                text = render(record, spec.fields)
            except MissingField as exc:
                raise ValueError(f"{describe(spec)}: source {spec.name!r}, record {read}: {exc}") from None
            if not isinstance(text, str) or not text.strip():
                c["dropped_empty"] += 1
                continue
            try:
                data = text.encode("utf-8")
            except UnicodeEncodeError:  # lone surrogates
                data = None
            if data is None or "\ufffd" in text:  # U+FFFD: bytes that were not UTF-8 (see open_records)
                c["dropped_non_utf8"] += 1
                continue
            digest = _digest(data)
            if digest in seen:
                c["dropped_duplicate"] += 1
                continue
            seen.add(digest)
            batch.append((text, digest))
            if len(batch) >= _BATCH:
                if _STOP.is_set():
                    raise RuntimeError(f"source {spec.name!r}: stopped; re-run to resume from its last commit")
                flush(batch)
                batch = []
                if c["train_tokens"] >= budget:
                    state["truncated_by_budget"] = True
                    break
                if writer.buf_tokens["train"] >= mix["shard_tokens"]:
                    writer.commit(read)
        else:
            if batch:
                flush(batch)
    finally:
        bar.close()
    if c["documents"] == 0:
        raise ValueError(
            f"{describe(spec)}: source {spec.name!r} yielded no usable documents "
            f"({read} records read; {c['dropped_empty']} empty, {c['dropped_non_utf8']} non-UTF-8)"
        )
    writer.commit(read, complete=True)
    return state


def prepare(
    mixture: str | Path,
    tokenizer_dir: str | Path,
    output_dir: str | Path,
    *,
    num_proc: int | None = None,
    max_tokens_per_source: int | None = None,
    show_progress: bool = True,
    work_dir: str | Path | None = None,
) -> dict:
    """Tokenize every source of `mixture` into `output_dir`; returns the manifest. Resumable and
    idempotent: a finished folder is verified (sizes) and its manifest returned."""
    from genesis_hf.tokenizer import EOS_TOKEN, REPORT_FILE, tokenizer_fingerprint

    mix: Mixture = load_mixture(mixture)
    tokenizer_dir, out = Path(tokenizer_dir), Path(output_dir)
    fingerprint = tokenizer_fingerprint(tokenizer_dir)
    report = tokenizer_dir / REPORT_FILE
    tokenizer_format = json.loads(report.read_text()).get("format") if report.is_file() else None
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    vocab_size, eos_id = tok.get_vocab_size(), tok.token_to_id(EOS_TOKEN)
    if eos_id is None:
        raise ValueError(f"{tokenizer_dir}: tokenizer has no {EOS_TOKEN} token")
    dtype = shards.dtype_for_vocab(vocab_size)
    if dtype != np.uint16:
        logger.warning("vocab_size %d does not fit uint16: writing uint32 shards", vocab_size)
    out.mkdir(parents=True, exist_ok=True)
    if (out / shards.MANIFEST).is_file():
        old = shards.read_manifest(out)
        if old["fingerprint"] != fingerprint:
            raise ValueError(
                f"{out / shards.MANIFEST}: prepared with tokenizer {old['fingerprint'][:16]}..., not "
                f"{fingerprint[:16]}... ({tokenizer_dir}): refusing to mix tokenizers (choose a new --output)"
            )
    jobs = [
        {
            "spec": asdict(spec),
            "mixture": {"validation_fraction": mix.validation_fraction, "shard_tokens": mix.shard_tokens,
                        "validation_max_tokens": mix.validation_max_tokens},  # fmt: skip
            "output_dir": str(out),
            "work_dir": str(work_dir or out / ".cache"),
            "tokenizer_file": str(tokenizer_dir / "tokenizer.json"),
            "fingerprint": fingerprint,
            "dtype": dtype.name,
            "eos_id": eos_id,
            "max_tokens": max_tokens_per_source,
            "show_progress": show_progress,
            "position": i,
        }
        for i, spec in enumerate(mix.sources)
    ]
    t0 = time.perf_counter()
    procs = min(num_proc or os.cpu_count() or 1, len(jobs))
    if procs > 1:
        # Threads, not processes: encode_batch releases the GIL and fans out over the Rust thread
        # pool, and threads need no fork (unsafe after the tokenizer's pool started) or spawn
        # (which re-imports the caller's __main__).
        _STOP.clear()
        with ThreadPoolExecutor(procs) as pool:
            futures = [pool.submit(_prepare_source, job) for job in jobs]
            try:
                wait(futures, return_when=FIRST_EXCEPTION)
            except BaseException:  # Ctrl-C: the workers stop at their next batch, after their last commit
                _STOP.set()
                raise
            failed = [f for f in futures if f.done() and f.exception() is not None]
            if failed:  # one source failed: stop the others too, then report the first failure
                _STOP.set()
                for f in futures:
                    f.cancel()
                raise failed[0].exception()
            states = [f.result() for f in futures]
    else:
        states = [_prepare_source(job) for job in jobs]
    manifest = {
        "format_version": shards.FORMAT_VERSION,
        "fingerprint": fingerprint,
        "tokenizer_format": tokenizer_format,  # genesis_tokenizer.json's "format"; None for other tokenizers
        "tokenizer_dir": str(tokenizer_dir.resolve()),
        "vocab_size": vocab_size,
        "eos_token_id": eos_id,
        "dtype": dtype.name,
        "mixture": {"name": mix.name, "path": str(mix.path), "weights": mix.weights},
        "sources": {},
    }
    for spec, state in zip(mix.sources, states):
        manifest["sources"][spec.name] = {
            "weight": spec.weight,
            "origin": describe(spec),
            "schema": spec.schema,
            "identity": spec.identity(),
            **state["counters"],
            "shards": state["shards"],
        }
    manifest["seconds"] = round(time.perf_counter() - t0, 2)
    shards.write_json_atomic(out / shards.MANIFEST, manifest)
    return shards.verify(out, checksum=False)


def ensure_embedded_data(root: str | Path, *, vocab_size: int = 4096) -> tuple[Path, Path]:
    """Tokenizer + prepared data for the embedded corpus under `root` (built once, then verified).

    Returns (root/tokenizer, root/data). The first call trains a `vocab_size` tokenizer on the
    embedded mixture and prepares it; later calls check fingerprints and shard checksums only.
    """
    from genesis_hf.tokenizer import REPORT_FILE, TOKENIZER_FORMAT, tokenizer_fingerprint, train_tokenizer

    root = Path(root)
    tok_dir, data_dir, cache = root / "tokenizer", root / "data", root / "cache"
    report = json.loads((tok_dir / REPORT_FILE).read_text()) if (tok_dir / REPORT_FILE).is_file() else {}
    # A tokenizer of another size or an older format (byte fallback) is retrained; its data follows.
    if report.get("vocab_size") != vocab_size or report.get("format") != TOKENIZER_FORMAT:
        from training.data.mixture import iter_mixture_texts

        texts = (t for _, t in iter_mixture_texts(EMBEDDED_MIXTURE, work_dir=cache))
        train_tokenizer(texts, vocab_size, tok_dir, show_progress=False)
    fingerprint = tokenizer_fingerprint(tok_dir)
    try:
        shards.verify(data_dir, checksum=True, expected_fingerprint=fingerprint)
    except (FileNotFoundError, ValueError) as exc:
        logger.info("preparing embedded data in %s (%s)", data_dir, exc)
        if (data_dir / shards.MANIFEST).is_file():
            shutil.rmtree(data_dir)  # finished with another tokenizer, or damaged: rebuild from scratch
        prepare(EMBEDDED_MIXTURE, tok_dir, data_dir, show_progress=False, work_dir=cache)
        shards.verify(data_dir, checksum=True, expected_fingerprint=fingerprint)
    return tok_dir, data_dir


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="genesis data", description="Prepare token shards from a mixture recipe.")
    sub = p.add_subparsers(dest="action", required=True)
    pr = sub.add_parser("prepare", help="tokenize a mixture into shards + manifest.json (resumable)")
    pr.add_argument("--mixture", required=True, help="mixture recipe YAML (training/mixtures/*.yaml)")
    pr.add_argument("--tokenizer", required=True, help="tokenizer folder from `genesis tokenizer train`")
    pr.add_argument("--output", required=True, help="data folder (re-run the same command to resume)")
    pr.add_argument("--num-proc", type=int, default=None, help="sources tokenized in parallel (default: cores)")
    pr.add_argument("--max-tokens-per-source", type=int, default=None, help="cap on train tokens per source")
    pr.add_argument("--no-progress", action="store_true", help="hide progress bars")
    v = sub.add_parser("verify", help="check every shard's size and sha256 against the manifest")
    v.add_argument("dir")
    return p


def cli_main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.action == "verify":
            manifest = shards.verify(args.dir, checksum=True)
            print(f"{args.dir}: {sum(len(s['shards']) for s in manifest['sources'].values())} shards OK")
            return 0
        manifest = prepare(args.mixture, args.tokenizer, args.output, num_proc=args.num_proc,
                           max_tokens_per_source=args.max_tokens_per_source,
                           show_progress=not args.no_progress)  # fmt: skip
    except (ValueError, FileNotFoundError) as exc:
        print(f"genesis data: error: {exc}", file=sys.stderr)
        return 2
    print(f"{args.output}: tokenizer {manifest['fingerprint'][:16]}..., {manifest['dtype']} shards")
    print(f"{'source':<24} {'weight':>6} {'docs':>9} {'train tok':>13} {'val tok':>10} {'empty':>6} {'dup':>6} {'non-utf8':>8}")
    for name, s in manifest["sources"].items():
        print(f"{name:<24} {s['weight']:>6.3f} {s['documents']:>9,} {s['train_tokens']:>13,} {s['val_tokens']:>10,} "
              f"{s['dropped_empty']:>6,} {s['dropped_duplicate']:>6,} {s['dropped_non_utf8']:>8,}")  # fmt: skip
    return 0
