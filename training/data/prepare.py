"""`genesis data prepare`: a mixture recipe -> checksummed token shards + manifest.json.

    genesis data prepare --mixture training/mixtures/embedded.yaml --tokenizer TOK --output DATA [--num-proc N]
    genesis data prepare ... --dry-run      # reads a sample of each source, predicts the total time

Each source's input is divided into pieces (`training.data.pieces`: byte ranges of a big local
file, one file, or one shard of a Hub dataset). Worker processes (spawned, not forked: the
tokenizer's Rust pool is not fork-safe) tokenize pieces where the text is and write each piece's
ids to disk; the coordinator merges each source's pieces in piece order (`training.data.merge`):
duplicates across pieces, validation hold-out, token budget and shard cuts happen there, so the
shards are byte-identical at any ``--num-proc``. Opening a source happens in one process at a
time per process (see `mixture.load_dataset_safely`), and Hub ids are opened before any worker
starts, so a source that cannot be read is refused by name first.

Resumable at two levels: a tokenized piece is committed by its ``.json`` ledger (a piece without
one is redone); a source's merge is committed by its ``progress.json`` (a killed merge leaves
files that are not listed, deleted by the re-run). ``manifest.json`` is written last: the
loader reads nothing without it.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import shutil
import sys
import time
from collections import deque
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from training.data import shards
from training.data.merge import SourceMerger
from training.data.mixture import Mixture, describe, load_mixture
from training.data.pieces import PIECE_BYTES, job_for, plan_digest, plan_pieces, tokenize_piece, worker_init

logger = logging.getLogger(__name__)

EMBEDDED_MIXTURE = Path(__file__).resolve().parents[1] / "mixtures" / "embedded.yaml"
PIECES_DIR = ".pieces"  # tokenized pieces waiting for the merge (removed as they are merged)


@dataclass
class Run:
    """One preparation: the mixture, the tokenizer's facts, and per source its job and merger."""

    mix: Mixture
    out: Path
    tokenizer_dir: Path
    fingerprint: str
    tokenizer_format: str | None
    vocab_size: int
    eos_id: int
    dtype: np.dtype
    jobs: list[dict] = field(default_factory=list)
    mergers: list[SourceMerger] = field(default_factory=list)

    def order(self) -> list[tuple[int, int]]:
        """Every (source, piece) in the one global order: sources as listed, pieces by index."""
        return [(s, i) for s, job in enumerate(self.jobs) for i in range(len(job["pieces"]))]


def setup_run(mixture: str | Path, tokenizer_dir: str | Path, output_dir: str | Path, *,
              max_tokens_per_source: int | None = None, work_dir: str | Path | None = None,
              piece_bytes: int = PIECE_BYTES, overrides: tuple[str, ...] = (), merge: bool = True) -> Run:  # fmt: skip
    """Read the recipe and tokenizer, plan every source's pieces (opening Hub sources) and load its
    ledger, refusing what cannot be resumed; starts no worker. `merge=False` (an engine task that
    only tokenizes) leaves the sources' folders alone."""
    from tokenizers import Tokenizer

    from genesis_hf.tokenizer import EOS_TOKEN, REPORT_FILE, tokenizer_fingerprint

    mix: Mixture = load_mixture(mixture)
    tokenizer_dir, out = Path(tokenizer_dir), Path(output_dir)
    if unknown := set(overrides) - {s.name for s in mix.sources}:
        raise ValueError(f"--overrides names no source of {mix.path}: {sorted(unknown)}")
    fingerprint = tokenizer_fingerprint(tokenizer_dir)
    report = tokenizer_dir / REPORT_FILE
    tokenizer_format = json.loads(report.read_text()).get("format") if report.is_file() else None
    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    vocab_size, eos_id = tok.get_vocab_size(), tok.token_to_id(EOS_TOKEN)
    if eos_id is None:
        raise ValueError(f"{tokenizer_dir}: tokenizer has no {EOS_TOKEN} token")
    dtype = shards.dtype_for_vocab(vocab_size)
    if dtype != np.uint16:
        logger.warning("vocab_size %d does not fit uint16: writing uint32 shards", vocab_size)
    if (out / shards.MANIFEST).is_file():
        old = shards.read_manifest(out)
        if old["fingerprint"] != fingerprint:
            raise ValueError(
                f"{out / shards.MANIFEST}: prepared with tokenizer {old['fingerprint'][:16]}..., not "
                f"{fingerprint[:16]}... ({tokenizer_dir}): refusing to mix tokenizers (choose a new --output)"
            )
    run = Run(mix, out, tokenizer_dir, fingerprint, tokenizer_format, vocab_size, eos_id, dtype)
    work = str(work_dir or out / ".cache")
    merge_args = {"validation_fraction": mix.validation_fraction, "shard_tokens": mix.shard_tokens,
                  "validation_max_tokens": mix.validation_max_tokens}  # fmt: skip
    planned = [(spec, plan_pieces(spec, work, piece_bytes)) for spec in mix.sources]  # every source before any
    out.mkdir(parents=True, exist_ok=True)
    for spec, pieces in planned:
        plan = plan_digest(spec, pieces)
        budget = min((b for b in (spec.max_tokens, max_tokens_per_source) if b is not None), default=None)
        run.jobs.append(job_for(spec, pieces, pieces_dir=str(out / PIECES_DIR), work_dir=work, plan=plan,
                                tokenizer_file=str(tokenizer_dir / "tokenizer.json"), fingerprint=fingerprint,
                                dtype=dtype.name, eos_id=eos_id, budget=budget))  # fmt: skip
        if merge:
            run.mergers.append(SourceMerger(out, out / PIECES_DIR, spec.name, fingerprint=fingerprint,
                                            identity=spec.identity(), plan=plan, n_pieces=len(pieces),
                                            budget=budget, mixture=merge_args, dtype=dtype, origin=describe(spec),
                                            overrides=spec.name in overrides))  # fmt: skip
    return run


class _Progress:
    """One display per run: pieces done (tqdm's rate and ETA), tokens/s, completion per source."""

    def __init__(self, run: Run, show: bool):
        from tqdm.auto import tqdm

        self.run, self.t0 = run, time.perf_counter()
        self.tokens0 = self._tokens()
        left = sum(m.n_pieces - m.next_piece for m in run.mergers if not m.complete)
        self.bar = tqdm(total=left, unit="piece", desc="prepare", disable=not show, dynamic_ncols=True)

    def _tokens(self) -> int:
        return sum(m.state["counters"]["train_tokens"] + m.state["counters"]["val_tokens"] for m in self.run.mergers)

    def update(self, pieces: int) -> None:
        self.bar.total = self.bar.n + pieces + sum(m.n_pieces - m.next_piece for m in self.run.mergers
                                                  if not m.complete)  # fmt: skip
        rate = (self._tokens() - self.tokens0) / max(time.perf_counter() - self.t0, 1e-9)
        done = [m for m in self.run.mergers if m.complete]
        busy = [f"{m.name} {self.percent(m):.0f}%" for m in self.run.mergers if not m.complete]
        self.bar.set_postfix_str(f"{rate / 1e6:.2f}M tok/s, sources {len(done)}/{len(self.run.mergers)} done"
                                 + (f"; {', '.join(busy[:6])}" if busy else ""), refresh=False)  # fmt: skip
        self.bar.update(pieces)

    @staticmethod
    def percent(m: SourceMerger) -> float:
        if m.complete:
            return 100.0
        by_budget = m.state["counters"]["train_tokens"] / m.budget
        return 100.0 * max(m.next_piece / max(m.n_pieces, 1), by_budget)

    def close(self) -> None:
        self.bar.close()


def run_pieces(run: Run, num_proc: int, progress: _Progress) -> None:
    """Tokenize the pieces the merges still need (in `num_proc` processes) and merge them in order."""
    for m in run.mergers:
        m.merge_ready()  # pieces tokenized by an earlier run or by engine tasks
    todo = deque((s, i) for s, i in run.order() if not run.mergers[s].complete and i >= run.mergers[s].next_piece)
    if num_proc <= 1:  # in this process: the tokenizer's own pool uses every core
        while todo:
            s, i = todo.popleft()
            if not run.mergers[s].complete:
                tokenize_piece(run.jobs[s], i)
                progress.update(run.mergers[s].merge_ready())
        return
    ctx = multiprocessing.get_context("spawn")
    threads = max(1, (os.cpu_count() or 1) // num_proc)
    try:
        with ProcessPoolExecutor(num_proc, mp_context=ctx, initializer=worker_init, initargs=(threads,)) as pool:
            inflight: dict = {}
            try:
                while todo or inflight:
                    while todo and len(inflight) < 2 * num_proc:  # bounded: the merge needs pieces in order
                        s, i = todo.popleft()
                        if not run.mergers[s].complete:
                            inflight[pool.submit(tokenize_piece, run.jobs[s], i)] = s
                    if not inflight:
                        break
                    done, _ = wait(inflight, return_when=FIRST_COMPLETED)
                    for f in done:
                        s = inflight.pop(f)
                        f.result()  # a worker's error (bad record, unreadable file) stops the run here
                        progress.update(run.mergers[s].merge_ready())
            except BaseException:
                pool.shutdown(wait=True, cancel_futures=True)  # committed pieces stay for the re-run
                raise
    except BrokenProcessPool as exc:
        raise RuntimeError(f"a worker process died ({exc}); run the same command again: merged and tokenized "
                           "pieces are kept, the rest is redone") from None  # fmt: skip


def write_manifest(run: Run, seconds: float | None = None) -> dict:
    """The one manifest.json the loader reads, once every source is complete."""
    if missing := [m.name for m in run.mergers if not m.complete]:
        raise RuntimeError(f"sources not complete, no manifest written: {missing}")
    manifest = {
        "format_version": shards.FORMAT_VERSION,
        "fingerprint": run.fingerprint,
        "tokenizer_format": run.tokenizer_format,  # genesis_tokenizer.json's "format"; None for other tokenizers
        "tokenizer_dir": str(run.tokenizer_dir.resolve()),
        "vocab_size": run.vocab_size,
        "eos_token_id": run.eos_id,
        "dtype": run.dtype.name,
        "mixture": {"name": run.mix.name, "path": str(run.mix.path), "weights": run.mix.weights},
        "sources": {},
    }
    for spec, m in zip(run.mix.sources, run.mergers):
        manifest["sources"][spec.name] = {"weight": spec.weight, "origin": describe(spec), "schema": spec.schema,
                                          "identity": spec.identity(), **m.manifest_entry()}  # fmt: skip
    if seconds is not None:
        manifest["seconds"] = round(seconds, 2)
    shards.write_json_atomic(run.out / shards.MANIFEST, manifest)
    shutil.rmtree(run.out / PIECES_DIR, ignore_errors=True)
    return shards.verify(run.out, checksum=False)


def prepare(
    mixture: str | Path,
    tokenizer_dir: str | Path,
    output_dir: str | Path,
    *,
    num_proc: int | None = None,
    max_tokens_per_source: int | None = None,
    show_progress: bool = True,
    work_dir: str | Path | None = None,
    piece_bytes: int = PIECE_BYTES,
    overrides: tuple[str, ...] = (),
) -> dict:
    """Tokenize every source of `mixture` into `output_dir` with `num_proc` worker processes
    (default: cores); returns the manifest. Resumable; the same shards at any `num_proc`."""
    t0 = time.perf_counter()
    run = setup_run(mixture, tokenizer_dir, output_dir, max_tokens_per_source=max_tokens_per_source,
                    work_dir=work_dir, piece_bytes=piece_bytes, overrides=overrides)  # fmt: skip
    progress = _Progress(run, show_progress)
    try:
        run_pieces(run, num_proc or os.cpu_count() or 1, progress)
    finally:
        progress.close()
    return write_manifest(run, time.perf_counter() - t0)


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
    pr.add_argument("--num-proc", type=int, default=None, help="worker processes (default: cores); same shards at any N")
    pr.add_argument("--max-tokens-per-source", type=int, default=None, help="cap on train tokens per source")
    pr.add_argument("--no-progress", action="store_true", help="hide the progress display")
    pr.add_argument("--dry-run", action="store_true", help="read a sample of each source; print the predicted time")
    pr.add_argument("--overrides", default="", metavar="SRC[,SRC]",
                    help="sources whose input changed since the last run: prepare them again from scratch")
    pr.add_argument("--executor", choices=("local", "slurm"), default=None,
                    help="run as datatrove tasks (tokenize ranks, then one merge) instead of --num-proc workers")
    pr.add_argument("--tasks", type=int, default=None, help="with --executor: tokenize tasks (ranks)")
    pr.add_argument("--slurm-partition", default=None, help="with --executor slurm: the partition")
    pr.add_argument("--slurm-time", default="24:00:00", help="with --executor slurm: time limit per task")
    pr.add_argument("--slurm-cpus", type=int, default=4, help="with --executor slurm: CPUs per task")
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
        overrides = tuple(x for x in args.overrides.split(",") if x)
        if args.dry_run:
            from training.data.plan import dry_run

            print(dry_run(args.mixture, args.tokenizer, args.output, num_proc=args.num_proc,
                          max_tokens_per_source=args.max_tokens_per_source, overrides=overrides))  # fmt: skip
            return 0
        if args.executor:
            from training.data.engine import prepare_on_engine

            slurm = {"partition": args.slurm_partition, "time": args.slurm_time, "cpus_per_task": args.slurm_cpus}
            manifest = prepare_on_engine(args.mixture, args.tokenizer, args.output, tasks=args.tasks or 1,
                                         executor=args.executor, workers=args.num_proc or -1, slurm=slurm,
                                         max_tokens_per_source=args.max_tokens_per_source, overrides=overrides)  # fmt: skip
            if not manifest:
                print(f"submitted: tokenize ({args.tasks} tasks) then merge; logs in {args.output}/.datatrove")
                return 0
        else:
            manifest = prepare(args.mixture, args.tokenizer, args.output, num_proc=args.num_proc,
                               max_tokens_per_source=args.max_tokens_per_source,
                               show_progress=not args.no_progress, overrides=overrides)  # fmt: skip
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"genesis data: error: {exc}", file=sys.stderr)
        return 2
    print(f"{args.output}: tokenizer {manifest['fingerprint'][:16]}..., {manifest['dtype']} shards")
    print(f"{'source':<24} {'weight':>6} {'docs':>9} {'train tok':>13} {'val tok':>10} {'empty':>6} {'dup':>6} {'non-utf8':>8}")
    for name, s in manifest["sources"].items():
        print(f"{name:<24} {s['weight']:>6.3f} {s['documents']:>9,} {s['train_tokens']:>13,} {s['val_tokens']:>10,} "
              f"{s['dropped_empty']:>6,} {s['dropped_duplicate']:>6,} {s['dropped_non_utf8']:>8,}")  # fmt: skip
    return 0
