"""Small reliability pieces of the pretraining loop: launch environment, start-up collective
check, loss-spike guard (the test-only fault injection is training/fault_injection.py).

Kept out of pretrain.py so the loop reads top to bottom.
"""

from __future__ import annotations

import faulthandler
import glob
import logging
import os
import statistics
import subprocess
import sys
import threading
import time
from collections import deque

logger = logging.getLogger(__name__)

# Consumer GeForce cards: PCIe peer-to-peer between them hangs NCCL collectives without NVLink
# (nccl-tests #117; the seed needed NCCL_P2P_DISABLE=1).
_CONSUMER_GPU = ("GeForce", "RTX 4090", "RTX 4080", "RTX 3090", "RTX 3080", "TITAN")


# Tests only: comma-separated GPU model names that stand in for the driver's, so that a CPU machine
# takes the same decisions as a 2x RTX 4090 one (tests/test_alignment_fsdp.py).
GPU_NAMES_ENV = "GENESIS_TEST_GPU_NAMES"


def _gpu_names_without_cuda() -> list[str]:
    """GPU model names read from the driver, WITHOUT initialising CUDA (env must be set first)."""
    if fake := os.environ.get(GPU_NAMES_ENV, "").strip():
        return [n.strip() for n in fake.split(",") if n.strip()]
    names = []
    for info in glob.glob("/proc/driver/nvidia/gpus/*/information"):
        try:
            for line in open(info, encoding="utf-8", errors="replace"):
                if line.startswith("Model:"):
                    names.append(line.split(":", 1)[1].strip())
        except OSError:
            pass
    if not names:
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20, check=False)
            names = [n.strip() for n in out.stdout.splitlines() if n.strip()]
        except (OSError, subprocess.SubprocessError):
            pass
    return names


LAUNCH_ENV_KEYS = ("PYTORCH_CUDA_ALLOC_CONF", "NCCL_P2P_DISABLE", "NCCL_IB_DISABLE")
_NOTES: list[str] | None = None  # set_launch_env's first answer: a second call reports the same


def launch_env() -> dict[str, str | None]:
    """The variables `set_launch_env` manages, as this process sees them (reports, tests)."""
    return {key: os.environ.get(key) for key in LAUNCH_ENV_KEYS}


def set_launch_env() -> list[str]:
    """Set the environment the seed needed, before torch touches CUDA. Returns lines to log.

    Called first by every script that trains (training/pretrain.py, alignment/sft.py, alignment/dpo.py).
    User values always win: a variable already set is left alone (and reported).

    On consumer cards both NCCL transports that need hardware support are turned off, as
    `accelerate launch` does for RTX 40xx (accelerate/commands/launch.py `multi_gpu_launcher`):
    P2P hangs collectives without NVLink, and Accelerate's own state check refuses RTX 40xx on
    drivers older than 550.40.07 unless NCCL_P2P_DISABLE AND NCCL_IB_DISABLE are both set
    (accelerate/state.py, `check_cuda_p2p_ib_support`). A workstation has no InfiniBand to lose;
    consumer cards across nodes over IB can export NCCL_IB_DISABLE=0.
    """
    global _NOTES
    if _NOTES is not None:  # alignment/dpo.py imports alignment/sft.py: both call it
        return _NOTES
    notes = _NOTES = []
    names = _gpu_names_without_cuda()
    if not names:
        return notes
    wanted = {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}  # less fragmentation at 2048 x micro 4
    if any(any(c.lower() in n.lower() for c in _CONSUMER_GPU) for n in names):
        wanted["NCCL_P2P_DISABLE"] = "1"
        wanted["NCCL_IB_DISABLE"] = "1"
    for key, value in wanted.items():
        if key in os.environ:
            notes.append(f"{key}={os.environ[key]} (set by you; left as is)")
        else:
            os.environ[key] = value
            notes.append(f"{key}={value} (set for {names[0]})")
    # Dump the NCCL flight recorder on a collective timeout, so a hang leaves evidence.
    os.environ.setdefault("TORCH_NCCL_DUMP_ON_TIMEOUT", "1")
    os.environ.setdefault("TORCH_FR_BUFFER_SIZE", "2000")
    return notes


def _die(msg: str, code: int = 124) -> None:
    logger.error(msg)
    print(msg, file=sys.stderr, flush=True)
    faulthandler.dump_traceback(all_threads=True)
    os._exit(code)


class Deadline:
    """`with Deadline("start-up all-reduce", step=0, seconds=60):` -- on expiry, log the phase and
    step, dump every thread's stack and exit the process (a hang becomes an error)."""

    def __init__(self, phase: str, *, step: int | None, seconds: float):
        self.phase, self.step, self.seconds = phase, step, seconds
        self._timer: threading.Timer | None = None

    def __enter__(self):
        msg = (f"rank {os.environ.get('RANK', '0')}: '{self.phase}' at step {self.step} did not finish "
               f"within {self.seconds:.0f}s; exiting (a peer is probably dead or stuck)")
        self._timer = threading.Timer(self.seconds, _die, args=(msg,))
        self._timer.daemon = True
        self._timer.start()
        return self

    def __exit__(self, *exc):
        self._timer.cancel()
        return False


def startup_check(accelerator, seconds: float) -> float:
    """A timed all-reduce over every rank before any work; returns its latency in seconds."""
    import torch

    t0 = time.monotonic()
    with Deadline("start-up collective check (all-reduce)", step=0, seconds=seconds):
        ones = torch.ones(1, device=accelerator.device)
        total = accelerator.reduce(ones, reduction="sum")
        if int(total.item()) != accelerator.num_processes:
            raise RuntimeError(
                f"start-up collective check: all-reduce gave {total.item()}, expected {accelerator.num_processes}"
            )
    return time.monotonic() - t0


class SpikeGuard:
    """Flags a loss (or a gradient norm) above `factor` x the running median of the last `window`
    accepted ones.

    The histories are part of the train state, so a resumed run makes the same decisions.
    """

    def __init__(self, factor: float, window: int, history: list[float] | None = None,
                 grad_history: list[float] | None = None):
        self.factor = factor
        self.history: deque[float] = deque(history or [], maxlen=max(window, 1))
        self.grad_history: deque[float] = deque(grad_history or [], maxlen=max(window, 1))

    def _check(self, value: float, history: deque) -> tuple[bool, float | None]:
        if self.factor <= 0 or len(history) < min(10, history.maxlen):
            return False, None
        median = statistics.median(history)
        return value > self.factor * median, median

    def is_spike(self, loss: float) -> tuple[bool, float | None]:
        return self._check(loss, self.history)

    def is_grad_spike(self, grad_norm: float) -> tuple[bool, float | None]:
        return self._check(grad_norm, self.grad_history)

    def accept(self, loss: float, grad_norm: float | None = None) -> None:
        self.history.append(loss)
        if grad_norm is not None:
            self.grad_history.append(grad_norm)
