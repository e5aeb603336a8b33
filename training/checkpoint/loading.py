"""load_checkpoint, load_model_weights and check_resume_compatible.

Nothing here falls back silently: every part the resumed run needs is verified against the manifest
and restored, or the load raises CheckpointError naming the checkpoint and the part. Skipping the
optimizer state is possible only through `reset_optimizer=True`, which is logged as a warning and
recorded in the audit.
"""

from __future__ import annotations

import logging
import pickle
import time
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from . import core
from . import layout as L
from ._runtime import CheckpointError, Watchdog, agree, barrier, describe, rank_and_world
from .state import load_scheduler, restore_rng, unwrap_optimizer, unwrap_scheduler

logger = logging.getLogger("training.checkpoint")


# What a DCP `.metadata` pickle may name: DCP's own metadata records, the storage index, dtypes,
# sizes, layouts, paths. Nothing that can call arbitrary code when unpickled.
_METADATA_GLOBALS = {
    *(("torch.distributed.checkpoint.metadata", n) for n in (
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
        "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("collections", "OrderedDict"),
    *(("pathlib", n) for n in ("Path", "PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath")),
}


class _MetadataUnpickler(pickle.Unpickler):
    """Admits only `_METADATA_GLOBALS` and torch dtypes; any other global is refused before it is
    looked up, so a crafted `.metadata` cannot run code (DCP itself uses a bare `pickle.load`)."""

    def find_class(self, module: str, name: str):
        allowed = (module, name) in _METADATA_GLOBALS or (
            module == "torch" and isinstance(getattr(torch, name, None), torch.dtype))
        if not allowed:
            raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed in checkpoint metadata")
        return super().find_class(module, name)


class SafeFileSystemReader(dcp.FileSystemReader):
    """`dcp.FileSystemReader` whose `.metadata` goes through `_MetadataUnpickler`. Used on every
    load path (resume, Hub resume, export, playground, `genesis eval`): all go through `_dcp_load`."""

    def read_metadata(self, *args, **kwargs) -> Metadata:
        path = Path(self._get_metadata_path(kwargs.get("rank")))
        try:
            with self.fs.create_stream(path, "rb") as f:
                metadata = _MetadataUnpickler(f).load()
        except (pickle.UnpicklingError, AttributeError, EOFError, ImportError, IndexError, TypeError,
                ValueError) as e:
            raise CheckpointError(f"{path}: refused: not plain DCP metadata ({e}); checkpoints are only "
                                  "loaded from files our own runs wrote") from e
        if not isinstance(metadata, Metadata):
            raise CheckpointError(f"{path}: refused: holds a {type(metadata).__name__}, not DCP Metadata")
        if getattr(metadata, "storage_meta", None) is None:  # as DCP's own reader does
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def read_dcp_metadata(folder: str | Path) -> Metadata:
    """The `.metadata` of one DCP folder, read safely."""
    return SafeFileSystemReader(folder).read_metadata()


def _dcp_load(sd: dict, ckpt: Path, part: str, no_dist: bool = False) -> None:
    """Load `sd` in place from ckpt/part; refuse keys in the checkpoint the target does not have
    (DCP would silently ignore them: a bigger model's extra layers would vanish)."""
    reader = SafeFileSystemReader(ckpt / part)
    try:
        if part == "model":
            saved = set(reader.read_metadata().state_dict_metadata)
            extra = sorted(saved - set(sd))
            if extra:
                raise CheckpointError(
                    f"model weights in {ckpt} do not fit the model: the checkpoint has {len(extra)} "
                    f"tensors the model lacks, e.g. {extra[:3]}"
                )
        with core.quiet_single_process():
            dcp.load(
                sd, storage_reader=reader, planner=core._SafeLoadPlanner(), no_dist=no_dist or core._no_dist()
            )
    except CheckpointError:
        raise
    except (Exception, CheckpointException) as e:  # DCP raises on every rank alike
        raise CheckpointError(
            f"{L.label(part)} in {ckpt} does not fit or cannot be read: {describe(e)}"
        ) from e


def _optimizer_audit(opt: torch.optim.Optimizer) -> list[dict]:
    groups = []
    for i, g in enumerate(opt.param_groups):
        steps = []
        for p in g["params"]:
            s = opt.state.get(p, {}).get("step")
            if s is not None:
                steps.append(float(s.full_tensor() if hasattr(s, "full_tensor") else s))
        groups.append(
            {
                "group": i,
                "lr": float(g.get("lr", float("nan"))),
                "params": len(g["params"]),
                "params_with_state": len(steps),
                "step_min": min(steps) if steps else None,
                "step_max": max(steps) if steps else None,
            }
        )
    return groups


def load_checkpoint(
    path: str | Path,
    *,
    model,
    optimizer,
    scheduler,
    reset_optimizer: bool = False,
    verify: str = "sha256",
    timeout_s: float = 1800.0,
    reset_rng_and_data: bool = False,
    reshard: bool = False,
    rng_seed: int = 0,
) -> dict:
    """Restore model, optimizer, scheduler and this rank's RNG from a committed checkpoint.

    Collective: every rank calls it. Returns {"train_state", "data_state" (this rank), "meta",
    "audit"}. The caller restores its data loader from data_state. RNG is restored last.
    `verify`: "sha256" (every file hashed, the work split across ranks) or "size" (sizes only).
    `reshard`: resume on another world size (a GPU died; `--overrides world_size`). Model,
    optimizer and scheduler reshard through DCP; the data-loader state is merged from every saved
    rank (positions are global, the per-source token counts are summed onto rank 0), so no window
    is replayed or skipped; per-rank RNG cannot map and is re-derived from (`rng_seed`, step,
    rank). Both are logged and recorded in the audit.
    `reset_rng_and_data`: neither RNG nor data state is restored (data_state is None); logged.
    """
    if verify not in ("sha256", "size"):
        raise ValueError(f"verify must be 'sha256' or 'size', got {verify!r}")
    path = Path(path)
    rank, world = rank_and_world()
    opt = unwrap_optimizer(optimizer)
    started = time.monotonic()
    with Watchdog("load", None, timeout_s) as wd:
        barrier(wd, "waiting for every rank to call load")
        wd.phase("verifying files")
        manifest, err, hashed = None, None, 0
        skip = {"optimizer"} if reset_optimizer else set()
        try:
            manifest = L.read_manifest(path)
            wd.step = manifest["step"]
            saved_world = manifest.get("world_size")
            resharding = reshard and saved_world != world and not reset_rng_and_data
            per_rank = [f"rng/rank-{rank:05d}", f"data/rank-{rank:05d}"]
            if reset_rng_and_data or resharding:
                skip |= {L.part_of(f) for f in manifest["files"] if f.startswith("rng/")}
                per_rank = [f"data/rank-{r:05d}" for r in range(saved_world or 0)] if resharding else []
            if reset_rng_and_data:
                skip |= {L.part_of(f) for f in manifest["files"] if f.startswith("data/")}
            required = ["meta", "model", "scheduler", "train_state", *per_rank]
            required += [] if reset_optimizer else ["optimizer"]
            if saved_world != world and not (reset_rng_and_data or resharding):
                raise CheckpointError(
                    f"{path} was saved by {saved_world} ranks, this run has {world}: pass --overrides world_size "
                    "(keeping the tokens per step, e.g. with --gradient_accumulation_steps, and adding it to the "
                    "overrides) to resume on another world size: the data position carries over exactly and "
                    "each rank's RNG is re-derived"
                )
            sizes = {
                rel: info["size"] for rel, info in manifest["files"].items() if L.part_of(rel) not in skip
            }
            subset = set(L.share_of_files(sizes, rank, world)) if verify == "sha256" else set()
            hashed = L.verify_files(path, manifest, required, subset, skip_parts=skip)
        except CheckpointError as e:
            err = str(e)
        agree(err)

        wd.phase("loading model and optimizer shards")
        if reset_optimizer:
            logger.warning(
                "RESET OPTIMIZER: loading weights only from %s; AdamW moments and step counts start "
                "from zero (requested by reset_optimizer=True)",
                path,
            )
            model_sd = get_model_state_dict(model)
            _dcp_load(model_sd, path, "model")
            set_model_state_dict(model, model_sd)
        else:
            model_sd, optim_sd = get_state_dict(model, opt)
            _dcp_load(model_sd, path, "model")
            _dcp_load(optim_sd, path, "optimizer")
            try:
                set_state_dict(model, opt, model_state_dict=model_sd, optim_state_dict=optim_sd)
            except Exception as e:
                raise CheckpointError(f"optimizer state in {path} does not fit the optimizer: {e}") from e
        del model_sd

        wd.phase("restoring scheduler, train and data state")
        err, out = None, {}
        try:
            load_scheduler(path, manifest["files"], scheduler)
            last_lr = getattr(unwrap_scheduler(scheduler), "_last_lr", None)
            if reset_optimizer and last_lr and len(last_lr) == len(opt.param_groups):
                # normally the LR comes back with the optimizer's param_groups; without them, take
                # the restored scheduler's, so the next step does not run at the construction LR
                for group, lr in zip(opt.param_groups, last_lr):
                    group["lr"] = lr
            out["train_state"] = L.read_json(path / "train_state.json", "train_state", path)
            out["meta"] = L.read_json(path / "meta.json", "meta", path)
            out["data_state"], rng = None, None
            if resharding:
                out["data_state"] = _merged_data_state(path, saved_world, rank)
            elif not reset_rng_and_data:
                out["data_state"] = L.read_json(path / L.rank_file("data", rank), per_rank[1], path)
                rng = L.read_json(path / L.rank_file("rng", rank), per_rank[0], path)
                if not (isinstance(rng, dict) and "python" in rng and "torch_cpu" in rng):
                    raise CheckpointError(f"RNG state of rank {rank} in {path} is malformed")
        except CheckpointError as e:
            err = str(e)
        agree(err)

        inner_sched = unwrap_scheduler(scheduler)
        ts = out["train_state"]
        audit = {
            "checkpoint": str(path),
            "step": manifest["step"],
            "tokens_seen": ts.get("tokens_seen", ts.get("tokens")),
            "world_size": {"saved": manifest.get("world_size"), "now": world},
            "model": "restored",
            "optimizer": "RESET (reset_optimizer=True)" if reset_optimizer else "restored",
            "optimizer_groups": _optimizer_audit(opt),
            "scheduler": {
                "type": type(inner_sched).__name__,
                "last_epoch": getattr(inner_sched, "last_epoch", None),
                "last_lr": list(getattr(inner_sched, "_last_lr", []) or []),
            },
            "data_state": "RESET (reset_rng_and_data=True)" if reset_rng_and_data
            else f"merged from {saved_world} saved ranks for rank {rank} of {world}" if resharding
            else f"restored for rank {rank}",
            "rng": "RESET (reset_rng_and_data=True)" if reset_rng_and_data
            else f"RE-DERIVED from (seed {rng_seed}, step {manifest['step']}, rank {rank}): saved by {saved_world} "
                 f"ranks, this run has {world}" if resharding
            else f"restored for rank {rank}",
            "verify": verify,
            "files_verified": len(manifest["files"]) - sum(L.part_of(f) in skip for f in manifest["files"]),
            "bytes_hashed_by_this_rank": hashed,
            "load_seconds": round(time.monotonic() - started, 2),
        }
        if rank == 0:
            logger.info("resume audit:\n%s", format_audit(audit))
        wd.phase("restoring RNG")
        if reset_rng_and_data:
            logger.warning(
                "RESET RNG AND DATA STATE: %s was saved by %s ranks, this run has %d; generators and data "
                "loaders start fresh (requested by reset_rng_and_data=True)",
                path,
                manifest.get("world_size"),
                world,
            )
        elif resharding:
            audit["rng_generators"] = derive_rng(rng_seed, manifest["step"], rank)
            logger.warning("resharded resume %s: %d -> %d ranks; data state merged from every saved rank, RNG "
                           "re-derived from (seed %d, step %d, rank %d)", path, saved_world, world, rng_seed,
                           manifest["step"], rank)
        else:
            audit["rng_generators"] = restore_rng(rng, f"{path} (rank {rank})")
    core._last_loaded = str(path)
    return {**out, "audit": audit}


def _merged_data_state(path: Path, saved_world: int, rank: int) -> dict:
    """This rank's loader state on another world size, from every saved rank's. Positions and the
    mixture segment are global (identical on all saved ranks: checked); the per-source token counts
    are per rank, so their sums go to rank 0 and the other ranks start from zero."""
    states = [L.read_json(path / L.rank_file("data", r), f"data/rank-{r:05d}", path) for r in range(saved_world)]
    shared = ("sources", "segment", "batches", "seq_len", "seed", "split", "fingerprint")
    for r, st in enumerate(states[1:], start=1):
        differs = [k for k in shared if st.get(k) != states[0].get(k)]
        if differs:
            raise CheckpointError(f"data states of {path} disagree between rank 0 and rank {r} on {differs}; "
                                  "cannot merge them for another world size")
    merged = dict(states[0])
    totals: dict[str, int] = {}
    for st in states:
        for name, n in (st.get("tokens_by_source") or {}).items():
            totals[name] = totals.get(name, 0) + int(n)
    merged["tokens_by_source"] = totals if rank == 0 else dict.fromkeys(totals, 0)
    return merged


def derive_rng(seed: int, step: int, rank: int) -> list[str]:
    """Seed every generator of this process from (seed, step, rank): deterministic, distinct per
    rank, and logged, for a resume whose saved per-rank RNG states do not map (another world size)."""
    import random
    import zlib

    import numpy as np

    value = zlib.crc32(f"genesis-rng:{seed}:{step}:{rank}".encode())
    random.seed(value)
    np.random.seed(value)
    torch.default_generator.manual_seed(value)
    done = ["python", "numpy", "torch_cpu"]
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.manual_seed(value)  # this rank's device only
        done.append("cuda")
    return done


def format_audit(audit: dict) -> str:
    lines = [f"  {k}: {v}" for k, v in audit.items() if k != "optimizer_groups"]
    for g in audit.get("optimizer_groups", []):
        lines.append(
            f"  optimizer group {g['group']}: lr={g['lr']:.3e} params={g['params']} "
            f"with_state={g['params_with_state']} adam_step=[{g['step_min']}, {g['step_max']}]"
        )
    return "\n".join(lines)


def load_model_weights(path: str | Path, model: torch.nn.Module) -> dict:
    """Single process, no process group: the full model weights of a (sharded) checkpoint into a
    plain module, e.g. for `genesis export`. Model files are sha256-verified. Returns meta."""
    path = Path(path)
    manifest = L.read_manifest(path)
    others = {L.part_of(f) for f in manifest["files"]} - {"model", "meta"}
    L.verify_files(path, manifest, ["model", "meta"], None, skip_parts=others)
    sd = get_model_state_dict(model)
    _dcp_load(sd, path, "model", no_dist=True)
    set_model_state_dict(model, sd)
    return L.read_meta(path)


def check_resume_compatible(saved_meta: dict, current_meta: dict, overrides: Iterable[str] = ()) -> list[str]:
    """Refuse a resume whose batch geometry or tokenizer differs, unless the field is overridden.

    Compares RESUME_FIELDS. `current_meta` may omit world_size (taken from the process group) and
    tokens_per_step (computed from its factors). Returns the overrides actually used (each logged
    as a WARNING); raises CheckpointError listing every mismatch otherwise.
    """
    overrides = set(overrides)
    unknown = overrides - set(core.RESUME_FIELDS)
    if unknown:
        raise ValueError(f"unknown override(s) {sorted(unknown)}; valid: {', '.join(core.RESUME_FIELDS)}")
    current = dict(current_meta)
    current.setdefault("world_size", rank_and_world()[1])
    for meta in (current, saved_meta := dict(saved_meta)):
        factors = ("per_device_train_batch_size", "gradient_accumulation_steps", "seq_len", "world_size")
        if "tokens_per_step" not in meta and all(isinstance(meta.get(f), int) for f in factors):
            prod = 1
            for f in factors:
                prod *= meta[f]
            meta["tokens_per_step"] = prod
    used, mismatches, names = [], [], []
    for field in core.RESUME_FIELDS:
        s, c = saved_meta.get(field), current.get(field)
        if s == c:
            continue
        if field in overrides:
            logger.warning("resume override: %s was %r in the checkpoint, now %r (--overrides)", field, s, c)
            used.append(field)
        else:
            mismatches.append(f"{field}: checkpoint {s!r}, now {c!r}")
            names.append(field)
    if mismatches:
        hint = ""
        if "world_size" in names and saved_meta.get("tokens_per_step") == current.get("tokens_per_step"):
            hint = (" The tokens per step are unchanged, so resuming on another world size is exact: the data "
                    "position carries over and each rank's RNG is re-derived.")
        raise CheckpointError(
            "cannot resume: the run does not match the checkpoint (" + "; ".join(mismatches) + "). To accept "
            f"the change deliberately, pass --overrides {','.join(sorted(set(names) | overrides))}." + hint
        )
    return used
