"""`genesis data prepare` beyond one machine: tasks of datatrove's executors (local or Slurm).

    genesis data prepare --mixture M --tokenizer TOK --output DATA --executor local --tasks 8
    genesis data prepare --mixture M --tokenizer TOK --output /shared/DATA --executor slurm --tasks 256 \\
        --slurm-partition cpu --slurm-time 12:00:00 --slurm-cpus 4

Two datatrove pipelines, the second depending on the first:
1. **tokenize**, ``--tasks`` ranks: rank ``r`` of ``n`` tokenizes every ``n``-th piece of the one
   global piece order (sources as listed, pieces by index; `prepare.Run.order`) into
   ``DATA/.pieces`` and writes its partial ledger ``DATA/.tasks/task-RRRRR.json`` (the pieces it
   did, with their counts). Pieces are the same ones ``--num-proc`` workers tokenize;
2. **merge**, 1 rank: merges each source's pieces in piece order (`training.data.merge`) and writes
   the one ``manifest.json``: the same shards, byte for byte, as ``--num-proc N``.

datatrove records each finished rank in ``DATA/.datatrove/<step>/completions``; running the same
command again runs only the ranks that did not finish (a killed task reruns alone), and inside a
rank a piece with its ledger is not tokenized again. The output folder must be on a file system
every node sees.

Token budgets: tasks do not talk to each other, so a task skips a piece of a budgeted source when
the pieces before it are all tokenized (their ledgers are on the shared folder) and already hold
``1.05 x budget + validation_max_tokens`` tokens; the waste is about one piece per task. Should
duplicates leave the merge short of the budget, the merge tokenizes the next pieces itself.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from training.data import shards
from training.data.pieces import PIECE_BYTES, piece_path, tokenize_piece

logger = logging.getLogger(__name__)


class _Step:
    """A picklable datatrove step (a plain callable: ``step(data, rank, world_size)``)."""

    def __init__(self, mixture, tokenizer_dir, output_dir, work_dir=None, max_tokens_per_source=None,
                 piece_bytes=PIECE_BYTES, overrides=()):  # fmt: skip
        self.kw = {"mixture": str(mixture), "tokenizer_dir": str(tokenizer_dir), "output_dir": str(output_dir),
                   "work_dir": str(work_dir) if work_dir else None, "max_tokens_per_source": max_tokens_per_source,
                   "piece_bytes": piece_bytes, "overrides": tuple(overrides)}  # fmt: skip

    def _run(self, merge: bool):
        from training.data.prepare import setup_run

        kw = dict(self.kw)
        return setup_run(kw.pop("mixture"), kw.pop("tokenizer_dir"), kw.pop("output_dir"), merge=merge, **kw)


def _budget_reached(run, s: int, i: int, prefix: dict) -> bool:
    """Do pieces 0..i-1 of source `s` all exist and hold enough tokens for its budget?"""
    job = run.jobs[s]
    if job["budget"] is None:
        return False
    if prefix.get(s) == "reached":  # the pieces after a skipped one are skipped too
        return True
    k, tokens = prefix.get(s, (0, 0))
    while k < i:
        ledger = piece_path(Path(job["pieces_dir"]), job["spec"]["name"], k).with_suffix(".json")
        if not ledger.is_file():
            break
        tokens += json.loads(ledger.read_text())["tokens"]
        k += 1
    reached = k == i and tokens >= 1.05 * job["budget"] + run.mix.validation_max_tokens
    prefix[s] = "reached" if reached else (k, tokens)
    return reached


class TokenizeStep(_Step):
    def __call__(self, data=None, rank: int = 0, world_size: int = 1):
        run = self._run(merge=False)
        done, prefix = [], {}
        for k, (s, i) in enumerate(run.order()):
            if k % world_size == rank and not _budget_reached(run, s, i, prefix):
                done.append(tokenize_piece(run.jobs[s], i))
        tasks = run.out / ".tasks"
        tasks.mkdir(parents=True, exist_ok=True)
        shards.write_json_atomic(tasks / f"task-{rank:05d}.json", {"rank": rank, "world_size": world_size,
                                                                   "pieces": done})  # fmt: skip
        yield from data or ()


class MergeStep(_Step):
    def __call__(self, data=None, rank: int = 0, world_size: int = 1):
        from training.data.prepare import write_manifest

        run = self._run(merge=True)
        for s, m in enumerate(run.mergers):
            m.merge_ready()
            while not m.complete:  # a piece the tasks skipped (budget estimate short) or lost
                logger.warning("merge: tokenizing piece %d of source %r itself", m.next_piece, m.name)
                tokenize_piece(run.jobs[s], m.next_piece)
                m.merge_ready()
        write_manifest(run)
        yield from data or ()


def prepare_on_engine(mixture, tokenizer_dir, output_dir, *, tasks: int, executor: str = "local",
                      workers: int = -1, slurm: dict | None = None, **kw) -> dict:  # fmt: skip
    """Run tokenize (`tasks` ranks) then merge (1 rank) on datatrove's `executor`; returns the
    manifest (local), or submits the Slurm jobs and returns {} (the merge job writes it)."""
    from training.data.prepare import setup_run

    out = Path(output_dir)
    setup_run(mixture, tokenizer_dir, out, **kw)  # refuse bad input and changed pieces before any task starts
    logs = out / ".datatrove"
    steps = (TokenizeStep(mixture, tokenizer_dir, out, **kw), MergeStep(mixture, tokenizer_dir, out, **kw))
    if executor == "local":
        from datatrove.executor import LocalPipelineExecutor

        tok = LocalPipelineExecutor([steps[0]], tasks=tasks, workers=workers, logging_dir=str(logs / "tokenize"))
        merge = LocalPipelineExecutor([steps[1]], tasks=1, workers=1, logging_dir=str(logs / "merge"), depends=tok)
        merge.run()
        return shards.verify(out, checksum=False)
    if executor == "slurm":
        from datatrove.executor import SlurmPipelineExecutor

        opts = dict(slurm or {})
        tok = SlurmPipelineExecutor([steps[0]], tasks=tasks, logging_dir=str(logs / "tokenize"),
                                    job_name="genesis-tokenize", **opts)  # fmt: skip
        merge = SlurmPipelineExecutor([steps[1]], tasks=1, logging_dir=str(logs / "merge"), depends=tok,
                                      job_name="genesis-merge", **opts)  # fmt: skip
        merge.run()
        return {}
    raise ValueError(f"--executor must be local or slurm, got {executor!r}")


def task_ledgers(output_dir) -> list[dict]:
    """The partial ledgers the tokenize tasks wrote (for inspection)."""
    return [json.loads(p.read_text()) for p in sorted((Path(output_dir) / ".tasks").glob("task-*.json"))]
