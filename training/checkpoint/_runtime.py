"""Process-level machinery for checkpoints: watchdog, timed collectives, fault-injection points.

Why a watchdog thread and not an exception: a rank stuck inside a collective (or a hung NFS write)
is blocked in C code, so nothing can be raised into it. The watchdog logs the step and phase, dumps
every thread's stack with `faulthandler`, and ends the process with `WATCHDOG_EXIT_CODE`, so a
restart loop (torchrun --max-restarts, a cluster requeue) sees a failure instead of a silent hang.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import faulthandler
import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch.distributed as dist

logger = logging.getLogger("training.checkpoint")

WATCHDOG_EXIT_CODE = 124  # like coreutils `timeout`: "ran past its deadline"

# Test-only fault injection (read per call, so a test can set them in a subprocess's environment).
#   GENESIS_CKPT_TEST_STALL="<phase>:<seconds>[:<rank>]"  sleep when that phase starts
#   GENESIS_CKPT_TEST_FAIL="<phase>:enospc[:<rank>]"      raise OSError(ENOSPC) when that phase starts
#   GENESIS_CKPT_TEST_MARKER=<file>                       touched (phase name written) before the stall
_STALL_ENV = "GENESIS_CKPT_TEST_STALL"
_FAIL_ENV = "GENESIS_CKPT_TEST_FAIL"
_MARKER_ENV = "GENESIS_CKPT_TEST_MARKER"


class CheckpointError(RuntimeError):
    """A checkpoint cannot be saved, found, verified or restored. The message names path and part."""


def describe(e: BaseException) -> str:
    """One line for an exception; DCP's CheckpointException (a BaseException holding every failed
    rank's exception and traceback) becomes 'rank 0: OSError: ...; rank 1: ...'."""
    failures = getattr(e, "failures", None)
    if isinstance(failures, dict) and failures:
        parts = []
        for r, pair in sorted(failures.items()):
            exc = pair[0] if isinstance(pair, tuple) else pair
            parts.append(f"rank {r}: {type(exc).__name__}: {exc}")
        return "; ".join(parts)
    return f"{type(e).__name__}: {e}" if not isinstance(e, CheckpointError) else str(e)


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _parse_fault(var: str) -> tuple[str, str, int | None] | None:
    spec = os.environ.get(var)
    if not spec:
        return None
    parts = spec.rsplit(":", 2)
    # phase names contain spaces but never ':'; an optional trailing rank
    if len(parts) == 3 and parts[2].isdigit():
        return parts[0], parts[1], int(parts[2])
    phase, _, arg = spec.rpartition(":")
    return phase, arg, None


def fault_point(phase: str) -> None:
    """Test hook at the start of every phase; a no-op unless a GENESIS_CKPT_TEST_* variable names it."""
    rank, _ = rank_and_world()
    for var in (_FAIL_ENV, _STALL_ENV):
        fault = _parse_fault(var)
        if fault is None or fault[0] != phase or (fault[2] is not None and fault[2] != rank):
            continue
        if var == _FAIL_ENV:
            raise OSError(errno.ENOSPC, f"No space left on device (injected by {_FAIL_ENV} at '{phase}')")
        marker = os.environ.get(_MARKER_ENV)
        if marker:
            Path(marker).write_text(phase)
        time.sleep(float(fault[1]))


class Watchdog:
    """Deadline for one save or load. `phase(name)` records where we are; expiry kills the process.

    Used as a context manager; the thread is a daemon and is stopped on exit of the block.
    """

    def __init__(self, what: str, step: int | None, timeout_s: float):
        if timeout_s <= 0:
            raise ValueError(f"checkpoint timeout_s must be > 0, got {timeout_s}")
        self.what, self.step, self.timeout_s = what, step, timeout_s
        self.current = "starting"
        self._started = time.monotonic()
        self._marks: list[tuple[str, float]] = [("starting", self._started)]
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, name=f"ckpt-watchdog-{what}", daemon=True)

    def __enter__(self) -> Watchdog:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._done.set()
        self._thread.join(timeout=5.0)

    def phase(self, name: str) -> None:
        self.current = name
        self._marks.append((name, time.monotonic()))
        logger.debug("checkpoint %s step %s: %s", self.what, self.step, name)
        fault_point(name)

    def timings(self, min_s: float = 0.05) -> str:
        """'writing model and optimizer shards 1.2 s, hashing files 0.4 s, ...' (phases >= min_s)."""
        ends = [t for _, t in self._marks[1:]] + [time.monotonic()]
        spans = [(name, end - t) for (name, t), end in zip(self._marks, ends)]
        return ", ".join(f"{name} {d:.2f} s" for name, d in spans if d >= min_s)

    def remaining(self) -> float:
        return max(1.0, self.timeout_s - (time.monotonic() - self._started))

    def collective_timeout(self) -> float:
        """Time left minus a margin, so a monitored barrier reports the missing ranks itself before
        the watchdog has to kill the process."""
        return max(1.0, self.remaining() - min(30.0, 0.1 * self.timeout_s))

    def _watch(self) -> None:
        if self._done.wait(self.timeout_s):
            return
        rank, world = rank_and_world()
        msg = (
            f"checkpoint {self.what} of step {self.step} exceeded its {self.timeout_s:.0f} s deadline in "
            f"phase '{self.current}' (rank {rank} of {world}); a rank is probably stuck in a collective or "
            f"on storage. Dumping all thread stacks and exiting with code {WATCHDOG_EXIT_CODE}."
        )
        if self.current.startswith("waiting for every rank"):
            msg += f" Did every rank call the checkpoint {self.what}? It is collective."
        # stderr first and without locks: the stuck thread may hold a logging handler's lock.
        err = sys.__stderr__ or sys.stderr
        print(f"[genesis checkpoint watchdog] {msg}", file=err, flush=True)
        try:
            faulthandler.dump_traceback(file=err, all_threads=True)
        except (ValueError, OSError, AttributeError):  # stderr without a file descriptor
            pass
        err.flush()
        # If logging blocks on such a lock, this timer still ends the process.
        threading.Timer(5.0, os._exit, args=(WATCHDOG_EXIT_CODE,)).start()
        logger.critical(msg)
        for handler in logging.getLogger().handlers:
            handler.flush()
        os._exit(WATCHDOG_EXIT_CODE)


# ---------------------------------------------------------------- collectives with a timeout

_CONTROL_GROUP: Any = None
_THREAD = threading.local()  # .group: the process group of this thread's checkpoint collectives


@contextlib.contextmanager
def use_group(group: Any):
    """Run this thread's checkpoint collectives (barriers, gathers, DCP's planning) on `group`.

    A background save runs its collectives on a group of its own while the training thread keeps
    using the default one: two threads must never issue collectives on the same group.
    """
    prev = getattr(_THREAD, "group", None)
    _THREAD.group = group
    try:
        yield
    finally:
        _THREAD.group = prev


def thread_group() -> Any:
    """The group set by `use_group` in this thread, else None (the default group)."""
    return getattr(_THREAD, "group", None)


def _control_group() -> Any:
    """A gloo group for small control messages (barriers, agreed errors, file lists).

    gloo gives `monitored_barrier` (names the ranks that did not arrive) and keeps these tiny
    pickled objects off the GPU. When the default group is already gloo we use it directly. The
    first call is itself collective; every rank reaches it because every rank must call save/load.
    A thread inside `use_group` uses its own (gloo) group instead.
    """
    global _CONTROL_GROUP
    if (own := thread_group()) is not None:
        return own
    if dist.get_backend() == "gloo":
        return None
    if _CONTROL_GROUP is None:
        _CONTROL_GROUP = dist.new_group(backend="gloo")
    return _CONTROL_GROUP


def barrier(wd: Watchdog, name: str) -> None:
    wd.phase(name)
    if not is_distributed():
        return
    timeout = datetime.timedelta(seconds=wd.collective_timeout())
    try:
        dist.monitored_barrier(group=_control_group(), timeout=timeout, wait_all_ranks=True)
    except RuntimeError as e:
        hint = " (every rank must call it)" if name.startswith("waiting for every rank") else ""
        raise CheckpointError(
            f"checkpoint {wd.what} of step {wd.step}: '{name}' failed or timed out{hint}: {e}"
        ) from e


def gather(obj: Any) -> list[Any]:
    """all_gather_object on the control group; [obj] in a single process."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj, group=_control_group())
    return out


def agree(error: str | None) -> None:
    """Every rank contributes its error (or None); if any rank failed, every rank raises.

    Without this, one rank raising while the others enter the next collective is a hang.
    """
    rank, world = rank_and_world()
    if world == 1:
        if error:
            raise CheckpointError(error)
        return
    failed = [(r, e) for r, e in gather((rank, error)) if e]
    if failed:
        unique = sorted({e for _, e in failed})
        ranks = ", ".join(str(r) for r, _ in failed)
        raise CheckpointError(f"{' | '.join(unique)} (on rank {ranks})")
