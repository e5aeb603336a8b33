"""`spike_policy: rollback`: heal a run from a loss spike without a person at 3 a.m.

PaLM restarted about 100 steps before a spike and skipped 200-500 batches; OLMo skips steps whose
loss or gradient norm is an outlier; here both happen by themselves:

1. A spike is a loss, or a gradient norm, above `spike_factor` x the running median (SpikeGuard).
   Its optimizer step is never taken. While a spike is pending no checkpoint is written, so the
   state to return to is never pruned and no save of a suspect state can commit (an async save
   in flight when the spike comes is of an earlier step, and is waited for).
2. `rollback_after` spikes within `rollback_window` steps, or one non-finite loss, trigger a
   rollback: every rank restores the newest committed checkpoint from before the first spike
   (the same `restore` path and audit as `--resume`, in-process), and the loader skips every
   global window position from that checkpoint's position to `rollback_skip_margin` steps past
   the last spike. Nothing is read twice; the skip is recorded in the train state (and in
   `<output_dir>/recovery.json` at once, so a kill before the next checkpoint replays it).
3. After `max_rollbacks` rollbacks within `rollback_window`, the run stops (exit 3).

Each spike is logged with the windows behind it (source, epoch, offset, shard, document, the
micro-batch's loss); `genesis spikes RUN [--show STEP]` lists them and prints their text.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
import torch.distributed as dist

logger = logging.getLogger("training.pretrain")

RECORD_FILE = "recovery.json"


def merge_skips(rollbacks: list[dict]) -> dict[str, list[list[int]]]:
    """{source: [[lo, hi], ...]} of every rollback's skipped positions."""
    out: dict[str, list[list[int]]] = {}
    for rb in rollbacks:
        for name, (lo, hi) in rb["skip"].items():
            if hi > lo:
                out.setdefault(name, []).append([lo, hi])
    return out


class Recovery:
    """Spike bookkeeping of one run (every rank holds the same decisions: they follow from the
    all-reduced loss and grad norm)."""

    def __init__(self, args, train_state: dict, rank: int):
        self.args, self.rank = args, rank
        self.path = Path(args.output_dir) / RECORD_FILE
        self.pending: list[dict] = list(train_state.get("pending_spikes", []))  # spikes not yet resolved
        self.step, self.seen = 0, []  # the step in progress: this rank's [(micro, refs, loss tensor)]
        self.rollbacks: list[dict] = self._merged(train_state.get("rollbacks", []), int(train_state.get("step", 0)))

    # ------------------------------------------------------------------ records

    def _merged(self, from_state: list[dict], step: int) -> list[dict]:
        """The train state's rollbacks plus any the durable record holds that the checkpoint of
        `step` predates (a kill between a rollback, which restored a step <= this one, and the
        next checkpoint)."""
        records = {rb["id"]: rb for rb in from_state}
        if self.path.is_file() and step > 0:  # a fresh start in an old folder replays nothing
            try:
                for rb in json.loads(self.path.read_text()).get("rollbacks", []):
                    if rb["id"] not in records and rb["restored_step"] <= step:
                        logger.warning("rollback %s (spikes at %s) is in %s but not in the checkpoint: replaying its "
                                       "decision (the run was stopped before its next checkpoint)", rb["id"],
                                       rb["spikes"], self.path)
                        records[rb["id"]] = rb
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{self.path}: unreadable rollback record ({e}); remove it only if no rollback "
                                 "happened since the last checkpoint") from e
        return sorted(records.values(), key=lambda rb: rb["id"])

    def skips(self, extra: dict | None = None) -> dict[str, list[list[int]]]:
        out = merge_skips(self.rollbacks)
        for name, ivs in (extra or {}).items():
            out.setdefault(name, []).extend([list(map(int, iv)) for iv in ivs])
        return out

    def _write_record(self) -> None:
        if self.rank != 0:
            return
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps({"rollbacks": self.rollbacks}, indent=1))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    # ------------------------------------------------------------------ per step

    @property
    def saving_allowed(self) -> bool:
        return not self.pending

    def begin_step(self, step: int) -> None:
        self.step, self.seen = step, []

    def saw(self, micro: int, refs, loss: torch.Tensor) -> None:
        self.seen.append((micro, list(refs), loss))

    def attribution(self, loader) -> list[dict]:
        """Every rank's windows of the step just made (collective on a spike: every rank knows of it)."""
        mine = []
        for micro, refs, loss in self.seen:
            for name, epoch, offset in refs:
                mine.append({"rank": self.rank, "micro": micro, "source": name, "epoch": epoch, "offset": int(offset),
                             "micro_loss": float(loss), **loader.locate(name, int(offset))})
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            everyone: list = [None] * dist.get_world_size()
            dist.all_gather_object(everyone, mine)
            return [w for part in everyone for w in part]
        return mine

    def judge(self, step: int, nonfinite: bool) -> str:
        """A spike (or non-finite step) was found at `step`: 'skip' for now, 'rollback', or 'stop'."""
        window = self.args.rollback_window
        self.pending = [p for p in self.pending if step - p["step"] < window] + [{"step": step}]
        if not (nonfinite or len(self.pending) >= self.args.rollback_after):
            return "skip"
        recent = [rb for rb in self.rollbacks if step - rb["trigger_step"] < window or rb["trigger_step"] > step]
        return "stop" if len(recent) >= self.args.max_rollbacks else "rollback"

    def clean_step(self, step: int) -> None:
        """A step without a spike: a pending spike older than the window was a one-off (skipped)."""
        self.pending = [p for p in self.pending if step - p["step"] < self.args.rollback_window]

    # ------------------------------------------------------------------ the rollback

    def plan(self, step: int, loader, checkpoints: list[tuple[int, Path]]) -> dict | None:
        """The rollback for the spikes pending at `step`: the checkpoint to restore and where the
        skip ends (`margin` steps' worth of draws past now). None when no committed checkpoint
        predates the first spike. `finish` fills in where the skip starts, after the restore."""
        first = self.pending[0]["step"]
        before = [(s, p) for s, p in checkpoints if s < first]
        if not before:
            return None
        target_step, target = before[-1]
        draws = self.args.rollback_skip_margin * self.args.gradient_accumulation_steps * loader.micro_batch_size
        return {"id": f"{step:08d}-{len(self.rollbacks)}", "trigger_step": step,
                "spikes": [p["step"] for p in self.pending], "restored_step": target_step,
                "checkpoint": str(target), "skip_end": loader.consumed_after(draws)}

    def finish(self, record: dict, loader, lr: float) -> dict:
        """After the restore: skip from the restored position (everything the abandoned steps read,
        and the margin past the last spike); record the decision durably; returns the record."""
        end = record.pop("skip_end")
        record["skip"] = {n: [int(loader.consumed[n]), int(max(end[n], loader.consumed[n]))] for n in end}
        record["skipped_tokens"] = {n: (hi - lo) * loader.window for n, (lo, hi) in record["skip"].items()}
        record["restart_lr"] = lr
        self.rollbacks.append(record)
        self.pending = []
        self._write_record()
        return record


def roll_back(args, accelerator, recovery, checkpointer, model, optimizer, scheduler, loader, meta, ckpt_root,
              step: int):
    """Restore the newest committed checkpoint from before the pending spikes, in-process on every
    rank, and skip their data (training/recovery.py). Returns (train_state, record), or None when no
    such checkpoint exists."""
    from training.checkpoint.layout import committed
    from training.run_setup import log_audit, restore

    checkpointer.wait(reason="before a rollback")  # of a step before the first spike: none starts after it
    plan = recovery.plan(step, loader, committed(ckpt_root))
    if plan is None:
        return None
    logger.warning("ROLLBACK at step %d: spikes at steps %s; restoring %s", step, plan["spikes"], plan["checkpoint"])
    train_state, audit = restore(args, accelerator, model, optimizer, scheduler, loader, meta, ckpt_root,
                                 resume=plan["checkpoint"])
    log_audit(audit, accelerator.is_main_process)
    record = recovery.finish(plan, loader, optimizer.param_groups[0]["lr"])
    loader.set_skips(recovery.skips(extra=read_skip_file(args.skip_data)))
    train_state["rollbacks"] = recovery.rollbacks
    logger.warning("rolled back to step %d (LR %.3g); skipping windows %s (%s tokens)", record["restored_step"],
                   record["restart_lr"], record["skip"], record["skipped_tokens"])
    return train_state, record


def read_skip_file(path: str | None) -> dict:
    """--skip_data: {source: [[lo, hi], ...]} global window positions never to read."""
    if not path:
        return {}
    try:
        skips = json.loads(Path(path).read_text())
        if not isinstance(skips, dict) or not all(
                isinstance(iv, list) and all(isinstance(x, list) and len(x) == 2 and all(isinstance(v, int) for v in x)
                                              and 0 <= x[0] <= x[1] for x in iv) for iv in skips.values()):
            raise ValueError("expected {source: [[lo, hi], ...]} with 0 <= lo <= hi integers")
    except (OSError, ValueError) as e:
        raise ValueError(f"skip_data: {path}: {e}") from e
    return skips
