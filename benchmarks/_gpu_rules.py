"""The rules `benchmarks/gpu_check.py` judges by, kept apart from the runs: is there room on disk
and in host memory for a phase, and did a resumed run repeat the straight one."""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

# The resume check without --deterministic. Step 11's loss comes from the restored weights and the
# restored batch through a deterministic forward, so it must be bit-equal. Every backward after
# that may differ in the last bits (SDPA's flash-attention backward adds dQ with atomics in a
# varying order), and the differences grow through AdamW, so later steps get a tolerance. A wrong
# batch or wrong weights already change step 11's loss; a lost LR or optimizer state moves the later
# steps by far more than rounding. Not yet calibrated on a GPU: the section prints the largest
# differences it saw, so the first GPU run says how much of this room rounding really takes.
LOSS_RTOL = 1e-3
GRAD_RTOL = 1e-2
RESUME_RULE = (f"step 11's loss bit-equal; then loss within {LOSS_RTOL:g} and grad norm within {GRAD_RTOL:g} "
               "relative (flash-attention's backward is not deterministic on CUDA by default)")
# The room a 1B phase needs. pretrain.py plans async staging into at most 80% of the available host
# memory (training/checkpoint/async_save.py) and falls back to sync saves beyond that.
STAGING_HEADROOM = 0.8
WORKING_BYTES_PER_RANK = 6 * 2**30  # a rank's own host memory: the model built in fp32, data, CUDA libraries
DISK_MARGIN_BYTES = 2 * 2**30  # data shards, compile caches, logs
DRY_WORKING_BYTES, DRY_DISK_MARGIN = 2**29, 2**28  # the dry run's debug model


# ----------------------------------------------------------------------------- room on disk and in host memory


def pinned_bytes(config, ranks: int) -> tuple[int, int]:
    """(checkpoint bytes of the whole model, host bytes ONE rank pins to stage its shard).

    A checkpoint holds the fp32 weights and AdamW's two fp32 moments. FSDP2 shards every tensor on
    dim 0, and torch's caching host allocator rounds each pinned block up to a power of two (for the
    1B: 5.59 GiB of shards per rank of two pin 7.50 GiB)."""
    from genesis_hf import GenesisForCausalLM

    with torch.device("meta"):
        model = GenesisForCausalLM(config)
    full = pinned = 0
    for p in model.parameters():
        shard = math.ceil(p.shape[0] / ranks) * math.prod(p.shape[1:]) * 4
        full += p.numel() * 4
        pinned += 1 << (shard - 1).bit_length()
    return 3 * full, 3 * pinned


def host_available() -> int:
    import psutil

    return psutil.virtual_memory().available


def check_room(config, dry: bool, ranks: int, work: Path) -> str:
    """One line on the room the run needs and has; SystemExit with that line (what is missing, and
    what to free) when disk or host memory falls short. Runs before anything is built."""
    working, margin = (DRY_WORKING_BYTES, DRY_DISK_MARGIN) if dry else (WORKING_BYTES_PER_RANK, DISK_MARGIN_BYTES)
    ckpt, per_rank = pinned_bytes(config, ranks)
    # Two checkpoints exist at a time (the one resumed from or kept, and the one being written);
    # each phase deletes its run folder once measured.
    disk_need, disk_free = 2 * ckpt + margin, shutil.disk_usage(work).free
    pinned = per_rank * ranks  # every rank of the run is on this host
    host_need, host_free = int(pinned / STAGING_HEADROOM) + ranks * working, host_available()
    gib = 2**30
    line = (f"disk at {work}: {disk_free / gib:.1f} GiB free, needs {disk_need / gib:.1f} GiB (two "
            f"{ckpt / gib:.2f} GiB checkpoints at a time + {margin / gib:.2f} GiB); host memory: "
            f"{host_free / gib:.1f} GiB available, needs {host_need / gib:.1f} GiB ({pinned / gib:.2f} GiB pinned "
            f"for async saves, at most {STAGING_HEADROOM:.0%} of what is available, + {working / gib:.1f} GiB "
            f"per rank x {ranks})")
    short = []
    if disk_free < disk_need:
        short.append(f"free {(disk_need - disk_free) / gib:.1f} GiB at {work} or pass --work-dir on a larger disk")
    if host_free < host_need:
        short.append(f"free {(host_need - host_free) / gib:.1f} GiB of host memory (other processes, page "
                     "cache held by tmpfs)")
    if short:
        raise SystemExit(f"gpu_check: not enough room: {line}. To run: {'; '.join(short)}.")
    return line


# ----------------------------------------------------------------------------- the resume check


@dataclass
class ResumeCheck:
    ok: bool
    exact: bool  # every compared loss and grad norm bit-equal
    worst_loss: float  # largest relative difference
    worst_grad: float
    problems: list[str]


def compare_resume(straight: dict[int, dict], resumed: dict[int, dict], steps: range, *,
                   exact: bool = False, loss_rtol: float = LOSS_RTOL, grad_rtol: float = GRAD_RTOL) -> ResumeCheck:
    """The resumed run's steps against the straight run's (RESUME_RULE; `exact`: all bit-equal).
    A non-finite value never passes."""
    missing = [s for s in steps if s not in straight or s not in resumed]
    if missing:
        return ResumeCheck(False, False, math.inf, math.inf, [f"steps {missing} not logged by both runs"])

    def rel(step: int, key: str) -> float:
        a, b = straight[step][key], resumed[step][key]
        return 0.0 if a == b else abs(a - b) / max(abs(a), 1e-12)

    loss = {s: rel(s, "loss") for s in steps}
    grad = {s: rel(s, "grad_norm") for s in steps}
    problems = []
    first = steps[0]
    if exact:
        problems += [f"step {s}: {k} {straight[s][k]!r} != {resumed[s][k]!r}" for s in steps
                     for k in ("loss", "grad_norm") if not straight[s][k] == resumed[s][k]]
    else:
        if not straight[first]["loss"] == resumed[first]["loss"]:
            problems.append(f"step {first}: loss {straight[first]['loss']!r} != {resumed[first]['loss']!r} (must be "
                            "bit-equal: the same weights and batch through a deterministic forward)")
        problems += [f"step {s}: loss differs by {loss[s]:.3g} relative (> {loss_rtol:g})"
                     for s in steps if not loss[s] <= loss_rtol]
        problems += [f"step {s}: grad norm differs by {grad[s]:.3g} relative (> {grad_rtol:g})"
                     for s in steps if not grad[s] <= grad_rtol]
    same = all(straight[s][k] == resumed[s][k] for s in steps for k in ("loss", "grad_norm"))
    return ResumeCheck(not problems, same, max(loss.values()), max(grad.values()), problems)
