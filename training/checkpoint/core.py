"""save_checkpoint / load_checkpoint: sharded, atomic, verified, watched.

Model and optimizer go through torch.distributed.checkpoint (DCP) with the state-dict helpers of
`torch.distributed.checkpoint.state_dict`, so one code path serves a plain module, DDP and FSDP2:
every rank writes only its own shards, and nothing is ever gathered onto rank 0 (the gather over
PCIe is what hung the seed run). The small parts are JSON files beside them, and the whole folder is
committed by one rename after every rank has finished.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import logging
import os
import platform
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.state_dict import (
    get_state_dict,
)

from . import layout as L
from ._runtime import (
    CheckpointError,
    Watchdog,
    agree,
    barrier,
    describe,
    gather,
    rank_and_world,
    thread_group,
)
from .state import capture_rng, scheduler_file, unwrap_optimizer

logger = logging.getLogger("training.checkpoint")

# Fields that must match between the checkpoint and the resuming run (meta keys).
RESUME_FIELDS = (
    "world_size",
    "tokens_per_step",
    "per_device_train_batch_size",
    "seq_len",
    "gradient_accumulation_steps",
    "tokenizer_fingerprint",
)
_last_loaded: str | None = None  # recorded as meta["parent_checkpoint"] by the next save


class _SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's planner unpickles non-tensor values (optimizer param_groups) with weights_only=False;
    ours allows only tensors and plain containers."""

    def load_bytes(self, read_item, value):
        obj = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            from torch.distributed.checkpoint._nested_dict import set_element

            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


@contextlib.contextmanager
def quiet_single_process():
    """DCP warns on every single-process save/load ("assuming the intent is ..."): that is our intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _no_dist() -> bool:
    return not (dist.is_available() and dist.is_initialized())


def _versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("transformers", "accelerate", "datasets", "tokenizers"):
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            pass
    return out


def _json_error(obj: Any, what: str) -> str | None:
    try:
        json.dumps(obj)
    except (TypeError, ValueError) as e:
        return f"{what} is not JSON-serialisable: {e}"
    return None if isinstance(obj, dict) else f"{what} must be a dict, got {type(obj).__name__}"


@dataclass
class Capture:
    """Everything a checkpoint of `step` holds, taken at that step: tensors (live, or copies in host
    memory for a background write) and the small parts as plain values."""

    root: Path
    step: int
    final: Path
    tmp: Path
    model_sd: dict
    optim_sd: dict
    rng: dict
    data_state: dict
    train_state: dict
    meta: dict
    scheduler: tuple[str, bytes]
    started: float  # time.monotonic() when the save began (barrier included)
    host_staged: bool = False  # the tensors are copies in host memory (written from a background thread)


def save_checkpoint(
    root: str | Path,
    step: int,
    *,
    model,
    optimizer,
    scheduler,
    train_state: dict,
    data_state: dict,
    meta: dict,
    keep_last: int = 2,
    timeout_s: float = 1800.0,
) -> Path:
    """Save a checkpoint of `step` under `root` and return its committed path.

    Collective: EVERY rank must call it with the same root and step (the ranks check this first).
    `data_state` is this rank's; `train_state` and `meta` are taken from rank 0. After the commit,
    rank 0 prunes to the newest `keep_last` (>= 2) committed checkpoints. For a save that blocks
    training only while the state is copied to host memory, see `AsyncCheckpointer`.
    """
    with Watchdog("save", step, timeout_s) as wd:
        cap = capture(root, step, wd, model=model, optimizer=optimizer, scheduler=scheduler,
                      train_state=train_state, data_state=data_state, meta=meta, keep_last=keep_last)
        final, _ = write_and_commit(cap, wd, keep_last)
    return final


def capture(root, step, wd, *, model, optimizer, scheduler, train_state, data_state, meta, keep_last,
            stage=None) -> Capture:
    """Collective. Check the call, prepare the temporary folder (rank 0), and take the state of `step`.

    stage: None to keep the live tensors (they are written before training goes on), or a callable
    (part name, state dict) -> state dict that copies the tensors to host memory.
    """
    if keep_last < 2:
        raise ValueError(
            f"keep_last must be >= 2 (got {keep_last}): with one, a crash while pruning or writing "
            "could leave no complete checkpoint"
        )
    if not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be a non-negative int, got {step!r}")
    root = Path(root)
    rank, world = rank_and_world()
    opt = unwrap_optimizer(optimizer)
    started = time.monotonic()
    barrier(wd, "waiting for every rank to call save")
    wd.phase("agreeing on the step")
    local_err = (
        _json_error(train_state, "train_state")
        or _json_error(data_state, f"data_state of rank {rank}")
        or _json_error(meta, "meta")
    )
    ts_digest = hashlib.sha256(json.dumps(train_state, sort_keys=True, default=str).encode()).hexdigest()
    views = gather((step, str(root.resolve()), os.urandom(4).hex(), ts_digest))
    if len({(v[0], v[1]) for v in views}) > 1:
        seen = sorted({(v[0], v[1]) for v in views})
        local_err = local_err or (
            f"ranks called save_checkpoint with different (step, root): {seen}; every rank must "
            "call it at the same step with the same root"
        )
    if len({v[3] for v in views}) > 1 and rank == 0:
        logger.warning("train_state differs across ranks at step %d; saving rank 0's", step)
    agree(local_err)
    nonce = views[0][2]
    final = root / L.step_dirname(step)
    tmp = root / f"{L.TMP_PREFIX}{step:08d}-{nonce}"

    wd.phase("preparing folders")
    err = None
    if rank == 0:
        err = _prepare_root(root, final, tmp, step)
    agree(err)
    try:
        wd.phase("collecting state dicts")
        if not opt.state and rank == 0:
            logger.warning(
                "saving an optimizer that has taken no step: torch's get_state_dict initialises its state "
                "with a zero-LR step, so AdamW step counts (bias correction) start at 1 from here"
            )
        # Sharded (DTensor) state dicts under FSDP2: each rank holds only its shard; no gather.
        model_sd, optim_sd = get_state_dict(model, opt)
        if stage is not None:
            wd.phase("staging to host memory")
            model_sd, optim_sd = stage("model", model_sd), stage("optimizer", optim_sd)
        meta = {**meta, "step": step, "world_size": world, "versions": _versions()}
        meta.setdefault("parent_checkpoint", _last_loaded)
        meta["saved_utc"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        # The small parts as values of this step: JSON round trips are deep copies.
        return Capture(root, step, final, tmp, model_sd, optim_sd, capture_rng(), json.loads(json.dumps(data_state)),
                       json.loads(json.dumps(train_state)), json.loads(json.dumps(meta)), scheduler_file(scheduler),
                       started, host_staged=stage is not None)
    except BaseException as e:
        _abandon(e, root, tmp, final, step, wd)


def write_and_commit(cap: Capture, wd, keep_last: int) -> tuple[Path, dict]:
    """Collective. Write the captured state into the temporary folder, hash it, commit it by rename,
    then prune. Returns (committed path, manifest). On any failure the temporary folder goes and
    the previous checkpoint is untouched."""
    rank, _ = rank_and_world()
    try:
        _write_parts(wd, cap)
        manifest = _hash_and_collect(wd, cap.tmp, cap.step)
        barrier(wd, "barrier before commit")
        wd.phase("commit")
        err = _commit(cap.tmp, cap.final, manifest) if rank == 0 else None
        agree(err)
    except BaseException as e:
        _abandon(e, cap.root, cap.tmp, cap.final, cap.step, wd)
    if rank == 0:
        wd.phase("pruning")
        _prune(cap.root, keep_last)
    size = sum(f["size"] for f in manifest["files"].values())
    logger.info(
        "saved checkpoint %s (%.1f MB, %d files) in %.1f s (%s)",
        cap.final,
        size / 1e6,
        len(manifest["files"]),
        time.monotonic() - cap.started,
        wd.timings(),
    )
    return cap.final, manifest


def _abandon(e: BaseException, root: Path, tmp: Path, final: Path, step: int, wd) -> None:
    rank, _ = rank_and_world()
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    if isinstance(e, KeyboardInterrupt | SystemExit):
        raise e
    found = L.committed(root)
    prev = found[-1][1] if found else None
    raise CheckpointError(
        f"saving step {step} to {final} failed in phase '{wd.current}': {describe(e)}. The "
        f"temporary folder was removed; the previous checkpoint ({prev}) is untouched."
    ) from e


def _prepare_root(root: Path, final: Path, tmp: Path, step: int) -> str | None:
    try:
        root.mkdir(parents=True, exist_ok=True)
        for stale in L.leftovers(root):
            logger.warning("removing %s left by an interrupted save or prune", stale)
            shutil.rmtree(stale, ignore_errors=True)
        if final.exists():
            return f"refusing to save step {step}: {final} already exists (checkpoints are never overwritten)"
        newer = [p for s, p in L.committed(root) if s > step]
        if newer:
            return (
                f"refusing to save step {step} into {root}: it already holds {newer[-1].name} from a later "
                "step (another run or an abandoned branch); use a fresh output_dir"
            )
        tmp.mkdir()
    except OSError as e:
        return f"cannot prepare {tmp}: {e}"
    return None


def _write_parts(wd, cap: Capture) -> None:
    rank, _ = rank_and_world()
    wd.phase("writing model and optimizer shards")
    # Host-staged state is written with no copy-ahead, as torch's own async path does
    # (FileSystemWriter.stage): with copy-ahead, one writer thread and CUDA available, DCP takes its
    # overlapping loader, which calls current_stream(), stream() and stream.synchronize() from the
    # writing thread (torch/distributed/checkpoint/filesystem.py, _write_files_from_queue).
    copy_ahead = 0 if cap.host_staged else 10_000_000
    for part, sd in (("model", cap.model_sd), ("optimizer", cap.optim_sd)):
        writer = dcp.FileSystemWriter(cap.tmp / part, sync_files=True, overwrite=False,
                                      per_thread_copy_ahead=copy_ahead)
        with quiet_single_process():
            dcp.save(sd, storage_writer=writer, no_dist=_no_dist(), process_group=thread_group())
    wd.phase("writing per-rank state")
    err = None
    try:
        L.write_json(cap.tmp / L.rank_file("rng", rank), cap.rng, f"RNG state of rank {rank}")
        L.write_json(cap.tmp / L.rank_file("data", rank), cap.data_state, f"data_state of rank {rank}")
        if rank == 0:
            L.write_json(cap.tmp / "train_state.json", cap.train_state, "train_state")
            L.write_json(cap.tmp / "meta.json", cap.meta, "meta")
            L.write_bytes_durable(cap.tmp / cap.scheduler[0], cap.scheduler[1])
    except (OSError, CheckpointError) as e:
        err = f"rank {rank} could not write its state: {e}"
    agree(err)


def _hash_and_collect(wd, tmp: Path, step: int) -> dict:
    """Each rank hashes a slice of the files (parallel sha256), rank 0 assembles the manifest."""
    wd.phase("hashing files")
    rank, world = rank_and_world()
    files = L.list_files(tmp)
    mine, err = {}, None
    try:
        sizes = {rel: (tmp / rel).stat().st_size for rel in files}
        share = L.share_of_files(sizes, rank, world)
        mine = {rel: {"size": sizes[rel], "sha256": h} for rel, h in L.hash_files(tmp, share).items()}
    except OSError as e:
        err = f"rank {rank} could not hash {tmp}: {e}"
    agree(err)
    merged: dict = {}
    for part in gather(mine):
        merged.update(part)
    if set(merged) != set(files):  # ranks saw different listings (a lagging shared filesystem?)
        unseen = sorted(set(files) ^ set(merged))[:5]
        err = f"rank {rank} sees files that were not hashed or misses hashed ones: {unseen}"
    agree(err)
    parts = sorted({L.part_of(rel) for rel in merged})
    expected = {"model", "optimizer", "scheduler", "train_state", "meta"}
    expected |= {f"{k}/rank-{r:05d}" for k in ("rng", "data") for r in range(world)}
    missing = sorted(expected - set(parts))
    if missing:
        raise CheckpointError(f"save of step {step} is incomplete before commit: missing {missing}")
    return {
        "format": L.FORMAT,
        "format_version": L.FORMAT_VERSION,
        "step": step,
        "world_size": world,
        "parts": parts,
        "files": dict(sorted(merged.items())),
    }


def _commit(tmp: Path, final: Path, manifest: dict) -> str | None:
    """Rank 0: manifest (durable), fsync folders, rename into place, fsync the parent."""
    try:
        L.write_json(tmp / L.MANIFEST, manifest, "manifest")
        for d in [tmp, *(p for p in tmp.rglob("*") if p.is_dir())]:
            L.fsync_dir(d)
        if final.exists():
            return f"refusing to commit: {final} appeared during the save (two runs share {final.parent}?)"
        os.rename(tmp, final)
        L.fsync_dir(final.parent)
    except OSError as e:
        return f"commit of {final} failed: {e}"
    return None


def _prune(root: Path, keep_last: int) -> None:
    found = L.committed(root)
    for step, path in found[: max(0, len(found) - keep_last)]:
        try:
            L.remove_tree(path)
            logger.info("pruned checkpoint %s (keep_last=%d)", path, keep_last)
        except OSError as e:  # the new checkpoint is committed; a failed prune must not fail the save
            logger.error("could not prune %s (step %d): %s", path, step, e)
