"""On-disk layout of a checkpoint, its manifest, and finding committed checkpoints.

    <root>/step-00000040/            committed (renamed into place only after every rank finished)
        manifest.json                format, step, world size, parts, every file's size + sha256
        meta.json                    run facts: config, tokenizer fingerprint, batch geometry, versions
        train_state.json             step, tokens_seen, ... (the caller's dict)
        scheduler.json               LR scheduler state_dict (scheduler.pt only if not JSON-able)
        model/                       DCP: one .distcp file per rank + .metadata
        optimizer/                   DCP: one .distcp file per rank + .metadata
        rng/rank-00000.json          python, numpy, torch CPU (+ CUDA) generator states of rank 0
        data/rank-00000.json         the data loader's state_dict of rank 0
    <root>/.tmp-step-00000060-<nonce>/   a save in progress, or a killed one: never a checkpoint
    <root>/.trash-step-00000020-<nonce>/ a checkpoint being pruned: never a checkpoint

A folder is a checkpoint if and only if its manifest.json parses and names its own step.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ._runtime import CheckpointError, fault_point

logger = logging.getLogger("training.checkpoint")

FORMAT = "genesis-checkpoint"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
_STEP_RE = re.compile(r"^step-(\d{8,})$")
TMP_PREFIX, TRASH_PREFIX = ".tmp-step-", ".trash-step-"

# What each part is called in error messages.
PART_LABELS = {
    "manifest": "manifest",
    "meta": "meta",
    "model": "model weights",
    "optimizer": "optimizer state",
    "scheduler": "scheduler state",
    "train_state": "train state",
    "rng": "RNG state",
    "data": "data-loader state",
}


def step_dirname(step: int) -> str:
    return f"step-{step:08d}"


def rank_file(kind: str, rank: int) -> str:
    return f"{kind}/rank-{rank:05d}.json"


def part_of(relpath: str) -> str:
    """'optimizer/__1_0.distcp' -> 'optimizer'; 'rng/rank-00001.json' -> 'rng/rank-00001'."""
    head, _, tail = relpath.partition("/")
    if head in ("rng", "data"):
        return f"{head}/{tail.removesuffix('.json')}"
    if head in ("model", "optimizer"):
        return head
    return relpath.split(".", 1)[0]  # scheduler.json -> scheduler


def label(part: str) -> str:
    kind, _, rank = part.partition("/rank-")
    name = PART_LABELS.get(kind, kind)
    return f"{name} of rank {int(rank)}" if rank else name


# ------------------------------------------------------------------ durable small files


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes_durable(path: Path, data: bytes) -> None:
    """Write via a temp name + fsync + rename, so a reader never sees a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json(path: Path, obj: Any, what: str) -> None:
    try:
        text = json.dumps(obj, indent=1, sort_keys=True)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{what} is not JSON-serialisable ({e}); refusing to save it") from e
    write_bytes_durable(path, text.encode())


def read_json(path: Path, part: str, ckpt: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as e:
        raise CheckpointError(f"{label(part)} missing from {ckpt}: {path.name} not found") from e
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{label(part)} in {ckpt} is unreadable ({path.name}: {e})") from e


def sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def share_of_files(sizes: dict[str, int], rank: int, world: int) -> list[str]:
    """This rank's share of the files to hash: largest first to the least-loaded rank, so ranks
    finish together. Deterministic: every rank computes the same split from the same sizes."""
    loads, mine = [0] * world, []
    for rel, size in sorted(sizes.items(), key=lambda kv: (-kv[1], kv[0])):
        r = loads.index(min(loads))
        loads[r] += max(size, 1)
        if r == rank:
            mine.append(rel)
    return mine


def hash_files(folder: Path, rels: list[str]) -> dict[str, str]:
    """sha256 of several files at once: hashlib releases the GIL, so threads use several cores."""
    if not rels:
        return {}
    workers = max(1, min(len(rels), 8, (os.cpu_count() or 1) // max(1, int(os.environ.get("WORLD_SIZE", 1)))))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return dict(zip(rels, pool.map(lambda rel: sha256_file(folder / rel), rels)))


def list_files(folder: Path) -> list[str]:
    """Every regular file under `folder`, relative, sorted (the manifest excluded)."""
    out = []
    for dirpath, _, names in os.walk(folder):
        for n in names:
            rel = os.path.relpath(os.path.join(dirpath, n), folder)
            if rel != MANIFEST:
                out.append(rel.replace(os.sep, "/"))
    return sorted(out)


# ------------------------------------------------------------------ manifest


def read_manifest(ckpt: Path) -> dict:
    """The parsed manifest, or CheckpointError naming the checkpoint and the manifest."""
    ckpt = Path(ckpt)
    if not ckpt.is_dir():
        raise CheckpointError(f"{ckpt} is not a checkpoint: no such directory")
    m = read_json(ckpt / MANIFEST, "manifest", ckpt)
    ok = (
        isinstance(m, dict)
        and m.get("format") == FORMAT
        and isinstance(m.get("step"), int)
        and isinstance(m.get("files"), dict)
        and isinstance(m.get("parts"), list)
    )
    if not ok:
        raise CheckpointError(f"manifest of {ckpt} is malformed (not a {FORMAT} manifest)")
    if m.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(
            f"manifest of {ckpt} has format version {m['format_version']}; this code reads <= {FORMAT_VERSION}"
        )
    match = _STEP_RE.match(ckpt.name)
    if match and int(match.group(1)) != m["step"]:
        raise CheckpointError(f"manifest of {ckpt} says step {m['step']}, the folder name disagrees")
    return m


def verify_files(
    ckpt: Path,
    manifest: dict,
    required: list[str],
    hash_subset: set[str] | None,
    skip_parts: set[str] = frozenset(),
) -> int:
    """Check required parts are listed, every listed file (outside `skip_parts`) exists with its size,
    and (for the files in `hash_subset`, None = all) its sha256. Returns bytes hashed. Raises
    CheckpointError naming the checkpoint and the part.
    """
    parts = set(manifest["parts"])
    for part in required:
        if part not in parts:
            raise CheckpointError(f"{label(part)} missing from {ckpt}: the manifest does not list it")
    to_hash = []
    for rel, info in sorted(manifest["files"].items()):
        part, path = part_of(rel), ckpt / rel
        if part in skip_parts:
            continue
        try:
            size = path.stat().st_size
        except FileNotFoundError as e:
            raise CheckpointError(
                f"{label(part)} missing from {ckpt}: {rel} is listed in the manifest but not on disk"
            ) from e
        if size != info["size"]:
            kind = "empty (zero bytes)" if size == 0 else "truncated or altered"
            raise CheckpointError(
                f"{label(part)} in {ckpt} is damaged: {rel} is {kind}, {size} bytes where the manifest "
                f"says {info['size']}"
            )
        if hash_subset is None or rel in hash_subset:
            to_hash.append(rel)
    for rel, digest in sorted(hash_files(ckpt, to_hash).items()):
        if digest != manifest["files"][rel]["sha256"]:
            raise CheckpointError(
                f"{label(part_of(rel))} in {ckpt} is damaged: {rel} is corrupted (its sha256 does not "
                "match the manifest)"
            )
    return sum(manifest["files"][rel]["size"] for rel in to_hash)


# ------------------------------------------------------------------ finding checkpoints


def committed(root: Path, damaged: list[Path] | None = None) -> list[tuple[int, Path]]:
    """(step, path) of every committed checkpoint under root, oldest first. `step-*` folders whose
    manifest is missing or broken are skipped (and appended to `damaged` if given)."""
    root = Path(root)
    if not root.is_dir():
        return []
    out = []
    for child in root.iterdir():
        match = _STEP_RE.match(child.name)
        if not (match and child.is_dir()):
            continue
        try:
            m = read_manifest(child)
        except CheckpointError as e:
            logger.warning("ignoring %s: not a committed checkpoint (%s)", child, e)
            if damaged is not None:
                damaged.append(child)
            continue
        out.append((m["step"], child))
    return sorted(out)


def leftovers(root: Path) -> list[Path]:
    """Temporary and trash folders left by a killed save or prune."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.name.startswith((TMP_PREFIX, TRASH_PREFIX)))


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest committed checkpoint under `root` (by step), or None. Leftovers are reported.

    Our saves never leave a `step-*` folder without a valid manifest, so one that exists was damaged
    or made by hand: it is skipped with an ERROR when newer than the checkpoint returned, and when
    no valid checkpoint remains this raises instead of letting `--resume auto` start from scratch.
    """
    for p in leftovers(Path(root)):
        logger.warning("ignoring %s: an unfinished save or prune (removed at the next save)", p)
    damaged: list[Path] = []
    found = committed(Path(root), damaged)
    if not found and damaged:
        raise CheckpointError(
            f"no valid checkpoint under {root}, but {', '.join(p.name for p in sorted(damaged))} look like "
            "damaged ones (manifest missing or broken); refusing to start from scratch over them. "
            "Inspect with `python -m training.checkpoint verify`, then move them away."
        )
    newest = found[-1] if found else None
    for p in sorted(damaged):
        if newest and p.name > newest[1].name:
            logger.error(
                "%s is newer than %s but damaged (no valid manifest); resuming from the older", p, newest[1]
            )
    return newest[1] if newest else None


def resolve_resume(resume: str | None, root: str | Path) -> Path | None:
    """None/'' -> None; 'auto' -> latest_checkpoint(root) (None = fresh start); a path -> that checkpoint."""
    if resume is None or str(resume).strip() == "":
        return None
    if str(resume) == "auto":
        found = latest_checkpoint(root)
        logger.info("resume auto: %s", found if found else f"no checkpoint under {root}, starting fresh")
        return found
    path = Path(resume)
    if not (path / MANIFEST).exists() and committed(path):
        raise CheckpointError(
            f"--resume {path} is a checkpoint root, not a checkpoint: use --resume auto or one of "
            + ", ".join(p.name for _, p in committed(path))
        )
    step = read_manifest(path)["step"]
    newer = [p for s, p in committed(Path(root)) if s > step and p.resolve() != path.resolve()]
    if newer:
        raise CheckpointError(
            f"--resume {path} (step {step}) is older than {newer[-1]} in the same output folder {root}; "
            "continuing would mix two runs' checkpoints. Move the newer checkpoints elsewhere "
            "or use a fresh output_dir."
        )
    return path


def read_meta(path: str | Path) -> dict:
    """meta.json of a committed checkpoint (no process group needed)."""
    path = Path(path)
    read_manifest(path)
    meta = read_json(path / "meta.json", "meta", path)
    if not isinstance(meta, dict):
        raise CheckpointError(f"meta in {path} is malformed: expected a JSON object")
    return meta


def remove_tree(path: Path) -> None:
    """Rename to a .trash name first (atomic), then delete: a kill mid-delete never leaves a
    half-deleted folder that still looks like a checkpoint."""
    trash = path.with_name(f"{TRASH_PREFIX}{path.name.removeprefix('step-')}-{os.urandom(4).hex()}")
    os.rename(path, trash)
    fsync_dir(path.parent)
    fault_point("deleting pruned checkpoint")
    shutil.rmtree(trash, ignore_errors=True)
