"""Host staging for async saves, and the plan a run makes before step 1 (host memory, disk).

    stager = HostStager()                      # one per Checkpointer; buffers live as long as it
    staged = stager("model", model_sd)         # same structure, every tensor a view into one buffer
    mode, record = plan_mode("async", model, out / "checkpoints", keep_last=2)   # every rank

Staging copies a part's tensors into ONE flat host buffer, pinned in place with cudaHostRegister
when the state is on CUDA, so the bytes planned at start are the bytes pinned (docs/checkpoints.md,
"One flat buffer per part"). The plan says whether async staging fits the host (else sync, with the
numbers) and whether the checkpoint filesystem holds the checkpoints that exist at once (else a
one-line CheckpointError, before any training).
"""

from __future__ import annotations

import copy
import logging
import math
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

from . import layout as L
from ._runtime import CheckpointError

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
