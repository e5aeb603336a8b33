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

import copy
import logging
import math
import os
import queue
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

from . import layout as L
from ._runtime import CheckpointError, Watchdog, is_distributed, rank_and_world, use_group
from .core import Capture, capture, write_and_commit

logger = logging.getLogger("training.checkpoint")

MODES = ("sync", "async")
HEADROOM = 0.8  # plan staging into at most this share of the host's available memory
_TEST_MEMORY_ENV = "GENESIS_TEST_HOST_MEMORY_BYTES"  # tests: pretend the host has this much available
_TEST_DISK_ENV = "GENESIS_TEST_DISK_FREE_BYTES"  # tests: pretend the checkpoint filesystem has this much free
# Written beyond the tensor bytes: torch.save framing and DCP's .metadata (measured 2.0-2.4 KB per tensor),
# and per rank its RNG state (25 KB) and the small JSON parts.
BYTES_PER_TENSOR_WRITTEN, BYTES_PER_RANK_WRITTEN = 4096, 2**20


ALIGN = 64  # bytes: every tensor's view starts on this boundary of its part's flat buffer


def _local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def _tensors(obj) -> list[torch.Tensor]:
    """The tensor leaves of a state dict, in the order `_rebuild` visits them (DTensors as themselves)."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _tensors(v)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _tensors(v)]
    return []


def _rebuild(obj, leaf: Callable):
    """A copy of a state dict's structure with every tensor replaced by leaf(tensor) and every other
    value deep-copied (the optimizer's param_groups change as training goes on)."""
    if isinstance(obj, torch.Tensor):
        return leaf(obj)
    if isinstance(obj, dict):
        return {k: _rebuild(v, leaf) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_rebuild(v, leaf) for v in obj)
    return copy.deepcopy(obj)


def _aligned(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN


def _layout(tensors) -> list[tuple[torch.dtype, tuple[int, ...]]]:
    return [(_local(t).dtype, tuple(_local(t).shape)) for t in tensors]


def _slots(tensors) -> tuple[list[torch.Tensor], list[int]]:
    """(the distinct tensors, each tensor's index among them). Two names for one tensor (a tied
    weight: the state dict holds it as embed_tokens and lm_head) share one place in the buffer."""
    first: dict[tuple, int] = {}
    distinct, index = [], []
    for t in tensors:
        loc = _local(t)
        key = (loc.untyped_storage()._cdata, loc.storage_offset(), tuple(loc.shape), loc.stride(), loc.dtype)
        if key not in first:
            first[key] = len(distinct)
            distinct.append(t)
        index.append(first[key])
    return distinct, index


def flat_bytes(tensors) -> int:
    """The size of the flat host buffer that holds these tensors' local shards: what staging
    allocates, and pins, byte for byte."""
    return _Flat.size_of(_layout(_slots(tensors)[0]))


def _cuda_device_of(tensors) -> torch.device | None:
    """The CUDA device the state lives on, or None (CPU training: nothing is pinned)."""
    for t in tensors:
        if _local(t).is_cuda:
            return _local(t).device
    return None


class _Flat:
    """One part's host buffer: a single allocation, pinned in place with cudaHostRegister, and one
    view per tensor into it.

    Not `tensor.pin_memory()` per tensor (what torch's `_create_cpu_state_dict(pin_memory=True)` does):
    that goes through the caching host allocator, which rounds every block up to the next power of
    two and keeps it (7.50 GiB pinned for a 5.59 GiB shard of the 1B), and it is one cudaHostAlloc per
    tensor. cudaHostRegister pins exactly the bytes allocated here, so planned == pinned.
    """

    @staticmethod
    def sizes(layout: list[tuple[torch.dtype, tuple[int, ...]]]) -> list[int]:
        """Each view's share of the buffer: its bytes rounded up to ALIGN."""
        return [_aligned(math.prod(shape) * dtype.itemsize) for dtype, shape in layout]

    @staticmethod
    def size_of(layout: list[tuple[torch.dtype, tuple[int, ...]]]) -> int:
        return sum(_Flat.sizes(layout))

    def __init__(self, layout: list[tuple[torch.dtype, tuple[int, ...]]], pin: bool):
        self.layout = layout
        sizes = self.sizes(layout)
        self.buffer = torch.empty(sum(sizes), dtype=torch.uint8)
        self.pinned = pin and self.buffer.numel() > 0
        if self.pinned:
            from torch.cuda import _pin_memory_utils

            _pin_memory_utils.pin_memory(self.buffer.data_ptr(), self.buffer.numel())
        self.views, offset = [], 0
        for (dtype, shape), size in zip(layout, sizes, strict=True):
            n = math.prod(shape) * dtype.itemsize
            self.views.append(self.buffer[offset:offset + n].view(dtype).view(shape))
            offset += size
        self.nbytes = offset

    def release(self) -> None:
        if self.pinned:
            from torch.cuda import _pin_memory_utils

            _pin_memory_utils.unpin_memory(self.buffer.data_ptr())
            self.pinned = False


class HostStager:
    """Copies a state dict's tensors into one flat host buffer per part (pinned when the state is on
    CUDA and `pin_memory`), allocated on first use and reused while the tensors keep their shapes.
    DTensor shards stay DTensors around their host views: DCP writes them as shards."""

    def __init__(self, pin_memory: bool = True):
        self.pin_memory = pin_memory
        self.device: torch.device | None = None  # the CUDA device of the last state staged, if any
        self._flat: dict[str, _Flat] = {}

    @torch.no_grad()
    def __call__(self, part: str, state_dict: dict) -> dict:
        from torch.distributed.tensor import DTensor

        tensors = _tensors(state_dict)
        self.device = _cuda_device_of(tensors)
        pin = self.pin_memory and self.device is not None
        distinct, index = _slots(tensors)
        layout = _layout(distinct)
        flat = self._flat.get(part)
        if flat is None or flat.layout != layout or flat.pinned != (pin and flat.nbytes > 0):
            if flat is not None:  # the structure changed (e.g. AdamW state appeared after the first step)
                flat.release()
            flat = self._flat[part] = _Flat(layout, pin)
        for t, view in zip(distinct, flat.views, strict=True):
            view.copy_(_local(t).detach(), non_blocking=pin)
        slots = iter(index)

        def leaf(t: torch.Tensor) -> torch.Tensor:
            view = flat.views[next(slots)]
            # the same global shape and placements around the host view (no device copy on the way)
            return DTensor(view, t._spec, requires_grad=False) if isinstance(t, DTensor) else view

        staged = _rebuild(state_dict, leaf)
        if pin:
            torch.cuda.synchronize(self.device)  # the non-blocking copies must land before training goes on
        return staged

    def nbytes(self) -> int:
        """Host bytes allocated (and pinned, on CUDA) by this stager."""
        return sum(f.nbytes for f in self._flat.values())


def _tensor_bytes(obj) -> int:
    return sum(_local(t).numel() * _local(t).element_size() for t in _tensors(obj))


def _adamw_state_like(params: list[torch.Tensor]) -> dict:
    """Meta tensors shaped like AdamW's state of these parameters: a 0-dim fp32 `step` and two
    moments like each parameter (the optimizer holds no state before its first step)."""
    with torch.device("meta"):
        return {i: {"step": torch.zeros((), dtype=torch.float32),
                    "exp_avg": torch.empty(_local(p).shape, dtype=p.dtype),
                    "exp_avg_sq": torch.empty(_local(p).shape, dtype=p.dtype)} for i, p in enumerate(params)}


def staging_parts(model: torch.nn.Module) -> dict[str, list[torch.Tensor]]:
    """The tensors this rank stages and writes, per part, as a save will see them: the model's state
    dict (a tied weight appears under both names, as in get_state_dict) and AdamW's state."""
    return {"model": _tensors(model.state_dict()), "optimizer": _tensors(_adamw_state_like(list(model.parameters())))}


def staging_need(model: torch.nn.Module) -> int:
    """Host bytes one rank's stager allocates (and pins, on CUDA): the flat buffers of its parts."""
    return sum(flat_bytes(ts) for ts in staging_parts(model).values())


def checkpoint_bytes(model: torch.nn.Module) -> int:
    """Bytes this rank writes into a checkpoint, at most: its shards of every part, in their dtype,
    with the framing of each tensor, and its small parts."""
    parts = staging_parts(model).values()
    return sum(_tensor_bytes(ts) + BYTES_PER_TENSOR_WRITTEN * len(ts) for ts in parts) + BYTES_PER_RANK_WRITTEN


def host_available() -> int:
    if os.environ.get(_TEST_MEMORY_ENV):
        return int(os.environ[_TEST_MEMORY_ENV])
    import psutil

    return psutil.virtual_memory().available


def disk_free(root: Path) -> int:
    """Free bytes on the filesystem that holds (or will hold) `root`."""
    if os.environ.get(_TEST_DISK_ENV):
        return int(os.environ[_TEST_DISK_ENV])
    path = Path(root).absolute()
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def _reduce(values: list[float], op) -> list[float]:
    if not (dist.is_available() and dist.is_initialized()):
        return [int(v) for v in values]
    t = torch.tensor(values, dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=op)
    return [int(v) for v in t.tolist()]


def plan_mode(requested: str, model: torch.nn.Module, root: str | Path | None = None,
              keep_last: int = 2) -> tuple[str, dict]:
    """(mode to use, a record for metrics.jsonl). Collective; call before step 1.

    Host memory: async needs each rank's flat staging buffers, for every rank on this host; if that
    does not fit, say so with the numbers and save synchronously. Disk (when `root` is given, either
    mode): the checkpoint filesystem must hold the checkpoints that exist at once (keep_last, plus the
    new one, written before the oldest is pruned), less those already there; if not, raise
    CheckpointError with the numbers, before any training."""
    if requested not in MODES:
        raise ValueError(f"save_mode must be one of {', '.join(MODES)}, got {requested!r}")
    record = {"event": "checkpoint_plan", "requested": requested, "mode": requested}
    ranks_here = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    need = staging_need(model)
    # The largest shard decides the host memory; every rank's shards are written to the same storage.
    total, ckpt = _reduce([need * ranks_here], dist.ReduceOp.MAX)[0], _reduce([checkpoint_bytes(model)],
                                                                               dist.ReduceOp.SUM)[0]
    if root is not None:
        root = Path(root)
        free = _reduce([disk_free(root)], dist.ReduceOp.MIN)[0]  # every rank decides on the same numbers
        existing = len(L.committed(root)) if root.is_dir() else 0
        at_once = keep_last + 1
        disk_need = max(1, at_once - existing) * ckpt
        record |= {"checkpoint_bytes": ckpt, "disk_need_bytes": disk_need, "disk_free_bytes": free}
        if disk_need > free:
            raise CheckpointError(
                f"not enough disk for checkpoints under output_dir {root.parent}: one checkpoint is about "
                f"{ckpt / 2**30:.2f} GiB (model + 2 AdamW moments, every rank's shards) and {at_once} exist at "
                f"once (keep_last {keep_last} + the one being written; {existing} already there), so "
                f"{disk_need / 2**30:.2f} GiB must be free but {free / 2**30:.2f} GiB is: free "
                f"{(disk_need - free) / 2**30:.2f} GiB more, or point output_dir at a larger disk")
        logger.info("checkpoint plan: %.2f GiB per checkpoint, %.2f GiB of disk needed for %d at once, "
                    "%.2f GiB free under %s", ckpt / 2**30, disk_need / 2**30, at_once, free / 2**30, root)
    if requested == "sync":
        return "sync", record
    available = host_available()
    record |= {"need_bytes": total, "available_bytes": available, "ranks_on_host": ranks_here}
    if total > HEADROOM * available:
        record["mode"] = "sync"
        record["reason"] = (f"async staging needs {total / 2**30:.2f} GiB of host memory ({ranks_here} rank(s) x "
                            f"{need / 2**30:.2f} GiB) but {available / 2**30:.2f} GiB is available "
                            f"(planned at most {HEADROOM:.0%} of it): saving synchronously")
    else:
        logger.info("checkpoint plan: async staging pins %.2f GiB of host memory (%d rank(s) x %.2f GiB), "
                    "%.2f GiB available", total / 2**30, ranks_here, need / 2**30, available / 2**30)
    return record["mode"], record


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
