"""How a run lives with its launcher, its folder and the signals a scheduler sends.

    die_with_launcher()                       # first thing in a launched worker (before torch)
    lock = RunLock(output_dir).acquire()      # rank 0, before anything touches the folder
    stop = StopRequest(early_warning="SIGUSR1")  # the loop asks `stop.requested` once per step

Workers die with their launcher. torchrun (under `accelerate launch`) starts every worker in a
session of its own, so when the launcher is SIGKILLed (the OOM killer, `kill -9`, a watchdog) its
workers keep running, blocked in a collective whose peer is gone, holding GPU memory and the run
folder. Linux's parent-death signal ends them with SIGKILL the moment the launcher goes: nothing is
half-committed, because a checkpoint commits by one rename after every rank has written.

One run per folder. Rank 0 holds an exclusive `flock` on `<output_dir>/run.lock` for its whole
life; a second run on the same folder is refused before it writes anything, naming the holder's
host and pid. The kernel drops the lock when the holder dies, so a crash never blocks a restart.

A polite stop saves first. SIGTERM (Slurm preemption, `scancel`, `docker stop`, systemd, the
launcher forwarding its own SIGTERM), SIGINT and the scheduler's early-warning signal (Slurm's
`--signal=USR1@120`) set a flag. Every rank finishes the optimizer step it is in; the ranks agree
on the stop in the collective they make after every step anyway; a checkpoint of that step is
committed (an async save in flight is waited for); the run exits with EXIT_STOPPED. A second
signal stops at once, as the signal's default action does.
"""

from __future__ import annotations

import ctypes
import datetime
import errno
import json
import logging
import os
import signal
import socket
import sys
import threading
from pathlib import Path

logger = logging.getLogger(__name__)

# sysexits.h EX_TEMPFAIL, "temporary failure; the user is invited to retry": the run stopped on a
# signal after committing a checkpoint, and the same command resumes it. (`accelerate launch` itself
# exits 128 + the signal, 143 for SIGTERM, once its workers have stopped: see docs/pretraining.md.)
EXIT_STOPPED = 75
LOCK_NAME = "run.lock"
_PR_SET_PDEATHSIG = 1


def launched_worker() -> bool:
    """True in a process started by torchrun's elastic agent (what `accelerate launch` runs)."""
    return "TORCHELASTIC_RUN_ID" in os.environ


def die_with_launcher(sig: int = signal.SIGKILL) -> str | None:
    """Ask the kernel to send `sig` to this process when its parent (the launcher) exits.

    Only in launched workers on Linux; returns a line to log, or None when not applicable. If the
    launcher died before the request was made (the parent is already init), exit now.
    """
    if not (launched_worker() and sys.platform.startswith("linux")):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
            return f"parent-death signal not set: prctl failed ({os.strerror(ctypes.get_errno())})"
    except (OSError, AttributeError) as e:
        return f"parent-death signal not set: {e}"
    parent = os.getppid()
    if parent == 1:  # orphaned between fork and prctl: the launcher is already gone
        print("[genesis] the launcher exited before this worker started; exiting", file=sys.stderr, flush=True)
        os._exit(1)
    return f"this worker gets {signal.Signals(sig).name} when its launcher (pid {parent}) exits"


# ----------------------------------------------------------------------------- one run per folder


class RunFolderBusy(ValueError):
    """Another live process holds the run folder's lock."""


class RunLock:
    """An exclusive, non-blocking `flock` on <folder>/run.lock, released when the process ends.

    The file says who holds it (host, pid, start time, command): the refusal names them. It is
    rewritten by each new holder and never deleted (deleting a lock file races with a new holder).
    """

    def __init__(self, folder: str | Path):
        self.path = Path(folder) / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            raise RunFolderBusy(
                f"{self.path.parent} is in use by a live run ({self.describe_holder()}); refusing to start a "
                "second run in the same output_dir. Wait for it, stop it, or pick another --output_dir"
            ) from None
        holder = {"host": socket.gethostname(), "pid": os.getpid(),
                  "started_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  "command": " ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv[:3]))}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        os.fsync(fd)
        self._fd = fd
        return self

    def describe_holder(self) -> str:
        try:
            h = json.loads(self.path.read_text())
            return f"host {h['host']}, pid {h['pid']}, since {h['started_utc']}"
        except (OSError, ValueError, KeyError, TypeError):
            return f"holder unknown: {self.path} is locked but unreadable"

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None


# ----------------------------------------------------------------------------- polite stop


class StopRequest:
    """Turns SIGTERM, SIGINT and `early_warning` into a flag the loop reads once per step.

    Handlers are installed on the main thread only (Python delivers signals there). The first
    signal sets `signal_name`; a second one restores the default action and re-sends itself, so a
    user who presses Ctrl-C twice, or a scheduler that means it, is obeyed at once.
    """

    def __init__(self, early_warning: str | None = "SIGUSR1"):
        names = ["SIGTERM", "SIGINT"] + ([early_warning] if early_warning else [])
        self.signals = []
        for name in dict.fromkeys(names):
            sig = getattr(signal, name, None)
            if not isinstance(sig, signal.Signals):
                raise ValueError(f"stop_signal: unknown signal {name!r} (e.g. SIGUSR1, SIGUSR2, SIGTERM)")
            self.signals.append(sig)
        self.signal_name: str | None = None
        self._previous: dict[signal.Signals, object] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def _handle(self, signum, frame) -> None:
        sig = signal.Signals(signum)
        if self.signal_name is not None:  # the second signal: its default action, now
            signal.signal(sig, signal.SIG_DFL)
            os.kill(os.getpid(), sig)
            return
        self.signal_name = sig.name
        # stderr directly: a handler must not wait on a lock the interrupted code may hold
        print(f"[genesis] {sig.name} received: finishing this optimizer step, saving a checkpoint, then "
              f"exiting with code {EXIT_STOPPED} (send it again to stop at once)", file=sys.stderr, flush=True)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


def take_run_lock(output_dir: str, accelerator) -> RunLock | None:
    """Rank 0 locks <output_dir>/run.lock; every rank learns the outcome, so a second run into a
    live run's folder is refused on every rank before anything is written (exit 2)."""
    from accelerate.utils import broadcast_object_list

    lock, box = None, [None]
    if accelerator.is_main_process:
        try:
            lock = RunLock(output_dir).acquire()
        except (ValueError, OSError) as e:
            box = [str(e)]
    if accelerator.num_processes > 1:
        broadcast_object_list(box, from_process=0)
    if box[0] is not None:
        raise RunFolderBusy(box[0])
    return lock
