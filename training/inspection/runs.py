"""One run's history from whatever it left: metrics.jsonl, wandb run files, checkpoints.

A SOURCE is any of
    runs/genesis-1b                  an output_dir: metrics.jsonl (curves), wandb/ (one run file per
                                     launch: resumes, config), checkpoints/ (steps, extensions)
    runs/genesis-1b/metrics.jsonl    the metrics alone
    .../run-0a3gme49.wandb           one wandb run file (offline or synced), or a folder of them

How the markers are found (metrics.jsonl records no launch events; see training/metrics.py):
  * resume: a launch that continued from a checkpoint. In metrics.jsonl a killed run's resume
    replays the steps after its last checkpoint, so the step number goes back; a clean restart
    is seen through the wandb files (one per launch). Marked at the step the launch resumed from.
  * extension: max_steps grew (the seed's 20k -> 40k): consecutive checkpoints' lr_schedule, or
    consecutive launches' wandb config, disagree on max_steps. Marked at the resume step.
  * checkpoint: every committed checkpoint still on disk (training.checkpoint), and the steps
    whose records carry "event" (a stopped run).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from training.metrics import is_side_record

from . import InspectError
from .wandb_file import find_run_files, read_run

logger = logging.getLogger(__name__)


@dataclass
class Run:
    name: str
    source: Path
    steps: dict[int, dict] = field(default_factory=dict)  # step -> its LAST record (replays win)
    resumes: list[int] = field(default_factory=list)  # steps a later launch continued from
    extensions: list[tuple[int, int | None, int]] = field(default_factory=list)  # (step, old max, new max)
    checkpoints: list[int] = field(default_factory=list)
    rollbacks: list[tuple[int, int]] = field(default_factory=list)  # (step of the trigger, step restored)
    spikes: list[int] = field(default_factory=list)  # steps whose loss or grad norm spiked
    events: list[dict] = field(default_factory=list)  # records with an "event" (e.g. stopped)
    side_records: list[dict] = field(default_factory=list)  # checkpoint saves, save plans, Hub uploads
    config: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # what was tolerated (a torn last line, ...)

    def series(self, key: str, sub: str | None = None) -> tuple[list[int], list[float]]:
        """(steps, values) of a scalar key, or of one entry of a dict key (val_loss, source)."""
        xs, ys = [], []
        for step in sorted(self.steps):
            v = self.steps[step].get(key)
            if sub is not None:
                v = v.get(sub) if isinstance(v, dict) else None
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                xs.append(step)
                ys.append(float(v))
        return xs, ys

    def val_sources(self) -> list[str]:
        return sorted({s for r in self.steps.values() for s in (r.get("val_loss") or {})})


def read_metrics(path: str | Path, *, allow_partial: bool = False) -> tuple[list[dict], list[str]]:
    """Records of a metrics.jsonl in file order, and notes. A broken line is an InspectError naming
    file and line, except an unterminated LAST line (what a SIGKILL mid-write leaves), which is
    skipped with a note. allow_partial=True skips every broken line with a note instead."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8", errors="replace")
    except OSError as e:
        raise InspectError(f"{path}: cannot read the metrics file ({e.strerror})") from e
    lines = text.split("\n")
    records, notes = [], []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        torn_tail = i == len(lines)  # no newline after it: the line being written when the run died
        try:
            rec = json.loads(line)
            if not isinstance(rec, dict) or not (is_side_record(rec) or isinstance(rec.get("step"), int)):
                raise ValueError("not an object with an integer 'step' or an 'event'")
        except ValueError as e:
            msg = f"{path}:{i}: broken metrics line ({e}): {line[:80]!r}"
            if not (torn_tail or allow_partial):
                raise InspectError(msg + " (pass --allow-partial to skip broken lines)") from None
            notes.append(msg + " skipped")
            logger.warning("%s skipped", msg)
            continue
        records.append(rec)
    if all(is_side_record(r) for r in records):
        raise InspectError(f"{path}: no metrics records in it")
    return records, notes


def _from_records(run: Run, records: list[dict]) -> None:
    """Fill steps/events and the replay resumes (a step that goes back)."""
    prev, rolled_back = None, False
    for rec in records:
        if is_side_record(rec):  # not a training step: kept beside the curve
            run.side_records.append(rec)
            if rec.get("event") == "rollback":
                run.rollbacks.append((rec["trigger_step"], rec["restored_step"]))
                rolled_back = True
            elif rec.get("event") == "spike":
                run.spikes.append(rec["step"])
            continue
        step = rec["step"]
        if prev is not None and step <= prev and not rolled_back:  # a rollback's replay is no resume
            run.resumes.append(step - 1)
        rolled_back = False
        prev = step
        if "event" in rec:
            run.events.append(rec)
        run.steps[step] = rec


_NESTED = {"val_loss": "val_loss", "val_bpb": "val_bpb", "val_unigram": "val_unigram", "val_bigram": "val_bigram",
           "val_bigram_bpb": "val_bigram_bpb", "val_vs_bigram": "val_vs_bigram", "tokens": "tokens_by_source"}


def _wandb_row(row: dict) -> dict | None:
    step = row.get("step", row.get("_step"))
    if step is None:
        return None
    rec: dict = {"step": int(step)}
    for k, v in row.items():
        group, _, sub = k.partition("/")
        if sub and group in _NESTED:  # MetricsLogger flattens these dicts to "<group>/<source>"
            rec.setdefault(_NESTED[group], {})[sub] = v
        elif not k.startswith("_") and k != "step":
            rec[k] = v
    return rec


def _from_wandb(run: Run, files: list[Path], *, curves: bool, allow_partial: bool) -> None:
    launches = []
    for f in files:
        wr = read_run(f)
        if wr.pending_block:
            run.notes.append(f"{f}: ends at a block boundary mid-record (a run still writing, or killed): "
                             f"read its {wr.n_records} whole records")
        elif wr.truncated_at is not None:
            msg = f"{f}: truncated at byte {wr.truncated_at}, not at a block boundary (damaged or cut short); " \
                  f"read {wr.n_records} records"
            if not allow_partial and f == files[-1] and curves:
                raise InspectError(msg + " (pass --allow-partial to plot what is there)")
            run.notes.append(msg)
        launches.append(wr)
    launches.sort(key=lambda w: w.start_time or 0)
    prev_max = None
    for i, wr in enumerate(launches):
        rows = [r for r in map(_wandb_row, wr.history) if r is not None]
        if curves:
            _from_records(run, rows)
        run.config.update(wr.config)
        first = min((r["step"] for r in rows), default=None)
        new_max = wr.config.get("max_steps")
        if i > 0 and first is not None:
            run.resumes.append(first - 1)
            if prev_max is not None and new_max is not None and new_max != prev_max:
                run.extensions.append((first - 1, prev_max, int(new_max)))
        prev_max = new_max if new_max is not None else prev_max


def _from_checkpoints(run: Run, root: Path) -> None:
    from training.checkpoint.layout import committed

    prev_max = None
    for step, path in committed(root):
        run.checkpoints.append(step)
        try:
            ts = json.loads((path / "train_state.json").read_text())
            new_max = (ts.get("lr_schedule") or {}).get("max_steps")
        except (OSError, ValueError):
            new_max = None
        if prev_max is not None and new_max is not None and new_max != prev_max:
            anchor = (ts.get("lr_schedule") or {}).get("anchor_step")
            at = anchor if anchor is not None else run_resume_before(run, step)
            run.extensions.append((at, prev_max, new_max))
        prev_max = new_max if new_max is not None else prev_max
        if not run.config:
            try:
                run.config = dict(json.loads((path / "meta.json").read_text()).get("recipe") or {})
            except (OSError, ValueError):
                pass


def run_resume_before(run: Run, step: int) -> int:
    earlier = [s for s in run.resumes if s < step]
    return max(earlier) if earlier else step


def load_run(source: str | Path, *, allow_partial: bool = False, name: str | None = None) -> Run:
    """A Run from any SOURCE (module docstring). InspectError names the source when it is none."""
    src = Path(source)
    if not src.exists():
        raise InspectError(f"{src}: no such file or folder")
    if src.is_file():
        if src.suffix == ".wandb":
            run = Run(name=name or src.stem.removeprefix("run-"), source=src)  # run-<id>.wandb
            _from_wandb(run, [src], curves=True, allow_partial=allow_partial)
        elif src.suffix == ".jsonl":
            run = Run(name=name or src.parent.name, source=src)
            records, run.notes = read_metrics(src, allow_partial=allow_partial)
            _from_records(run, records)
        else:
            raise InspectError(f"{src}: not a metrics.jsonl or a run-*.wandb file")
    else:
        run = Run(name=name or src.name, source=src)
        metrics, wandb_files = src / "metrics.jsonl", find_run_files(src)
        if metrics.is_file():
            records, run.notes = read_metrics(metrics, allow_partial=allow_partial)
            _from_records(run, records)
            if wandb_files:  # launches and config only; the curves come from metrics.jsonl
                _from_wandb(run, wandb_files, curves=False, allow_partial=True)
        elif wandb_files:
            _from_wandb(run, wandb_files, curves=True, allow_partial=allow_partial)
            run.name = name or run.config.get("run_name") or read_run(wandb_files[0]).run_id or run.name
        else:
            raise InspectError(f"{src}: not a run folder (no metrics.jsonl and no run-*.wandb under it)")
        _from_checkpoints(run, src / "checkpoints")
    if not run.steps:
        raise InspectError(f"{src}: no logged steps in it")
    run.resumes = sorted(set(run.resumes))
    run.extensions = sorted({e[0]: e for e in run.extensions}.values())  # one per step
    return run
