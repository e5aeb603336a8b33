"""Checkpoints that stop training only while the state is copied to host memory.

    ckpt = Checkpointer(root, mode="async", keep_last=2, timeout_s=1800, on_commit=fn)  # every rank, at start
    ckpt.save(step, model=..., optimizer=..., scheduler=..., train_state=..., data_state=..., meta=...)
    for record in ckpt.records(): metrics.log(record)    # {"event": "checkpoint", "step", "blocked_s", ...}
    ckpt.close()                                         # at exit: waits for the save in flight to commit

`mode="async"`: on the training thread, the ranks agree on the step, rank 0 prepares the
temporary folder, and every tensor of the model and optimizer shards is copied into one flat host
buffer per part (pinned on CUDA by cudaHostRegister, exactly the planned bytes; allocated once,
reused by every save) together with the RNG, data, train and scheduler states of that step. Then a
background thread, set to the training thread's CUDA device and making no CUDA call of its own
(DCP writes host-staged state with no copy-ahead: core.py), writes the DCP shards and the small parts,
hashes them, builds the manifest and commits by rename, then prunes: the same code and the same
guarantees as a synchronous save (core.py). At most one save is in flight: the next one first
waits for the previous commit (and says so), and `close()` waits for the last.

The background thread runs its collectives on a gloo group of its own, created here on every
rank, so it never shares a process group with the training thread's collectives. It has its own
watchdog: a stalled background save ends the process (exit 124) naming the step and the phase.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

from ._runtime import CheckpointError, Watchdog, is_distributed, rank_and_world, use_group
from .core import Capture, capture, write_and_commit
from .staging import MODES, HostStager, plan_mode

__all__ = ["MODES", "Checkpointer", "HostStager", "plan_mode"]  # pretrain and the benchmark import them from here

logger = logging.getLogger("training.checkpoint")


class Checkpointer:
    """Sync or async saves with one interface and one record per save (see the module docstring)."""

    def __init__(self, root: str | Path, *, mode: str = "sync", keep_last: int = 2, timeout_s: float = 1800.0,
                 on_commit: Callable[[Path, int], None] | None = None):
        if mode not in MODES:
            raise ValueError(f"save_mode must be one of {', '.join(MODES)}, got {mode!r}")
        self.root, self.mode, self.keep_last, self.timeout_s = Path(root), mode, keep_last, timeout_s
        self.on_commit = on_commit
        self._records: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._inflight: int | None = None
        self._stager = HostStager(pin_memory=True) if mode == "async" else None
        # Collective on every rank, at start: the background thread's own gloo group.
        self._group = dist.new_group(backend="gloo") if mode == "async" and is_distributed() else None

    # ------------------------------------------------------------------ API

    def save(self, step: int, *, model, optimizer, scheduler, train_state: dict, data_state: dict,
             meta: dict) -> float:
        """Collective. Returns the seconds training was blocked. Sync: the save is committed on
        return. Async: the state of `step` is in host memory on return; the commit follows."""
        t0 = time.monotonic()
        waited = self.wait(reason=f"before saving step {step}")
        with Watchdog("save" if self.mode == "sync" else "save (staging)", step, self.timeout_s) as wd:
            cap = capture(self.root, step, wd, model=model, optimizer=optimizer, scheduler=scheduler,
                          train_state=train_state, data_state=data_state, meta=meta, keep_last=self.keep_last,
                          stage=self._stager)
            if self.mode == "sync":
                final, manifest = write_and_commit(cap, wd, self.keep_last)
            staging_phases = wd.timings(min_s=0.01)
        blocked = time.monotonic() - t0
        if self.mode == "sync":
            self._committed(final, manifest, cap, blocked, waited)
            return blocked
        self._inflight = step
        device = self._stager.device  # the training thread's CUDA device (None: the state is on CPU)
        self._thread = threading.Thread(target=self._background, args=(cap, blocked, waited, device),
                                        name=f"ckpt-async-save-{step}", daemon=True)
        self._thread.start()
        logger.info("step %d: state staged to host memory in %.2fs (%s); writing in the background", step,
                    blocked, staging_phases)
        return blocked

    def wait(self, reason: str = "") -> float:
        """Block until the save in flight (if any) has committed; re-raise its failure. Returns the
        seconds waited."""
        if self._thread is None:
            return 0.0
        t0 = time.monotonic()
        if self._thread.is_alive():
            logger.info("waiting for the checkpoint of step %s to commit%s", self._inflight,
                        f" {reason}" if reason else "")
        self._thread.join()
        self._thread, self._inflight = None, None
        waited = time.monotonic() - t0
        if self._error is not None:
            err, self._error = self._error, None
            raise err
        return waited

    def records(self) -> list[dict]:
        """The per-save records produced since the last call (thread-safe)."""
        out = []
        while True:
            try:
                out.append(self._records.get_nowait())
            except queue.Empty:
                return out

    def close(self) -> None:
        """Wait for the last save in flight to commit (at exit: the process must not end before)."""
        self.wait(reason="before exit")

    @property
    def staging_bytes(self) -> int:
        return self._stager.nbytes() if self._stager is not None else 0

    # ------------------------------------------------------------------ internals

    def _background(self, cap: Capture, blocked: float, waited: float, device: torch.device | None) -> None:
        try:
            if device is not None:  # a new thread's current device is 0: on rank 1 anything CUDA would
                torch.cuda.set_device(device)  # make a context on rank 0's card. Nothing below should need it.
            with use_group(self._group), Watchdog("async save", cap.step, self.timeout_s) as wd:
                final, manifest = write_and_commit(cap, wd, self.keep_last)
            self._committed(final, manifest, cap, blocked, waited)
        except BaseException as e:  # handed to the training thread at its next save or at close
            rank, _ = rank_and_world()
            logger.error("rank %d: background save of step %d failed: %s", rank, cap.step, e)
            self._error = e if isinstance(e, CheckpointError) else CheckpointError(
                f"background save of step {cap.step} failed: {type(e).__name__}: {e}")

    def _committed(self, final: Path, manifest: dict, cap: Capture, blocked: float, waited: float) -> None:
        total = time.monotonic() - cap.started
        size = sum(f["size"] for f in manifest["files"].values())
        record = {"event": "checkpoint", "step": cap.step, "blocked_s": round(blocked, 4),
                  "total_s": round(total, 4), "bytes": size, "mode": self.mode, "path": str(final)}
        if waited > 0.0005:
            record["waited_for_previous_s"] = round(waited, 4)
        self._records.put(record)
        if self.on_commit is not None:
            try:
                self.on_commit(final, cap.step)
            except Exception as e:  # noqa: BLE001  (a hook never fails a committed save)
                logger.error("after the commit of %s: %s", final, e)
