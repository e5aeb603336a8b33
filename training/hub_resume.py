"""`--resume hub:owner/name@step-00000020`: a training checkpoint uploaded by HubSync, back on disk.

training/run_setup.py:restore calls `resolve_hub_resume`: rank 0 downloads checkpoint/ of that revision
into <output_dir>/hub-resume/ with snapshot_download, and the run then resumes from that folder exactly
as from a local checkpoint: manifest, sha256, geometry checks.

The other ranks wait for the download on the process group's key-value store, not in a collective:
a 1B checkpoint is about 12 GB, and a collective waiting for it (the NCCL broadcast this used to be)
hits the process-group timeout (`pg_timeout_minutes`, 30) below about 7 MB/s. Their wait has its own
limit, sized to the download (`download_timeout_s`), and both sides log progress.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path

from training.args import ConfigError
from training.hub_sync import _REPO_RE, CHECKPOINT_IN_REPO, HUB_PREFIX, hub_api, redact

logger = logging.getLogger("training.hub_sync")

RESUME_DIR = "hub-resume"
PROGRESS_EVERY_S = 60.0  # rank 0 logs the bytes on disk, the others that they still wait (tests lower it)
FLOOR_MINUTES = 60.0  # the waiting ranks' limit when the checkpoint's size is unknown or small
MIN_RATE_BYTES_S = 1e6  # the slowest link the wait allows for: 12 GB in 3 h 20 min
_STORE_KEY = "genesis/hub_resume"
_CALLS = [0]  # resolve_hub_resume calls in this process: every rank makes the same ones (store keys)


def download_timeout_s(total_bytes: int | None, floor_minutes: float = FLOOR_MINUTES) -> float:
    """How long the other ranks wait for rank 0's download: the floor, or the checkpoint's size at
    MIN_RATE_BYTES_S where that is longer."""
    return max(floor_minutes * 60.0, (total_bytes or 0) / MIN_RATE_BYTES_S)


def checkpoint_bytes(api, repo: str, rev: str) -> int | None:
    """The size of checkpoint/ at `rev` from the Hub's file listing; None where it cannot be read."""
    try:
        return sum(getattr(f, "size", None) or 0
                   for f in api.list_repo_tree(repo, path_in_repo=CHECKPOINT_IN_REPO, revision=rev, recursive=True))
    except Exception as e:  # noqa: BLE001  (only sizes a timeout: the floor applies)
        logger.info("--resume: the size of %s@%s is unknown (%s); waiting ranks use the floor", repo, rev,
                    type(e).__name__)
        return None


def _gb(n: int | None) -> str:
    return "?" if n is None else f"{n / 1e9:.2f} GB"


def _bytes_under(folder: Path) -> int:
    """Bytes on disk under `folder`, snapshot_download's partial files (.cache/.../*.incomplete) included."""
    total = 0
    for p in folder.rglob("*"):
        try:
            total += p.stat().st_size if p.is_file() else 0
        except OSError:  # moved from .incomplete to its name meanwhile
            pass
    return total


def _watch(spec: str, dst: Path, total: int | None, stop: threading.Event,
           progress: Callable[[int, int | None], None] | None) -> None:
    """Rank 0's progress line every PROGRESS_EVERY_S until `stop`."""
    t0 = time.monotonic()
    while not stop.wait(PROGRESS_EVERY_S):
        done = _bytes_under(dst)
        logger.info("--resume %s: %s of %s on disk (%.1f MB/s)", spec, _gb(done), _gb(total),
                    done / 1e6 / max(time.monotonic() - t0, 1e-9))
        if progress is not None:
            progress(done, total)


def parse_hub_spec(spec: str) -> tuple[str, str | None]:
    """'hub:owner/name@step-00000020' -> ('owner/name', 'step-00000020'); no '@': (repo, None)."""
    repo, _, rev = spec.removeprefix(HUB_PREFIX).partition("@")
    if not _REPO_RE.match(repo):
        raise ConfigError(f"--resume {spec}: expected hub:owner/name@revision, e.g. hub:me/genesis-1b@step-00020000")
    return repo, rev or None


def download_checkpoint(spec: str, output_dir: str | Path,
                        progress: Callable[[int, int | None], None] | None = None) -> Path:
    """Download checkpoint/ of a Hub revision into <output_dir>/hub-resume/<owner>--<name>@<rev>/
    and return the checkpoint folder. A revision that does not exist is named with those that do.
    `progress(bytes_on_disk, total_bytes or None)` is called once before the download and then
    every PROGRESS_EVERY_S from a watcher thread."""
    from huggingface_hub.errors import RepositoryNotFoundError

    from training.checkpoint import CheckpointError

    repo, rev = parse_hub_spec(spec)
    api = hub_api()
    try:
        refs = api.list_repo_refs(repo)
    except RepositoryNotFoundError as e:
        raise CheckpointError(f"--resume {spec}: the Hub repo {repo} does not exist or is not visible with "
                              "this HF_TOKEN") from e
    names = sorted({r.name for r in [*refs.branches, *refs.tags]})
    steps = [n for n in names if re.fullmatch(r"step-\d{8,}", n)]
    if rev is None:
        if not steps:
            raise CheckpointError(f"--resume {spec}: {repo} has no step-XXXXXXXX revisions (it has: "
                                  f"{', '.join(names) or 'none'})")
        rev = steps[-1]
        logger.info("--resume %s: the newest step revision is %s", spec, rev)
    elif rev not in names and not re.fullmatch(r"[0-9a-f]{40}", rev):
        raise CheckpointError(f"--resume {spec}: revision {rev!r} does not exist in {repo}; it has: "
                              f"{', '.join(names) or 'none'}")
    dst = Path(output_dir) / RESUME_DIR / f"{repo.replace('/', '--')}@{rev}"
    dst.mkdir(parents=True, exist_ok=True)
    total = checkpoint_bytes(api, repo, rev)
    logger.info("--resume %s: downloading %s of %s@%s into %s", spec, _gb(total), repo, rev, dst)
    if progress is not None:
        progress(0, total)
    t0 = time.monotonic()
    stop = threading.Event()
    watcher = threading.Thread(target=_watch, args=(spec, dst, total, stop, progress), daemon=True,
                               name="hub-resume-progress")
    watcher.start()
    try:
        local = Path(api.snapshot_download(repo_id=repo, revision=rev, local_dir=dst,
                                           allow_patterns=[f"{CHECKPOINT_IN_REPO}/*"]))
    finally:
        stop.set()
        watcher.join()
    ckpt = local / CHECKPOINT_IN_REPO
    if not (ckpt / "manifest.json").is_file():
        raise CheckpointError(f"--resume {spec}: {repo}@{rev} holds no training checkpoint "
                              f"({CHECKPOINT_IN_REPO}/manifest.json); it was uploaded without "
                              "hub_strategy checkpoint")
    (local / "hub_source.json").write_text(json.dumps({"repo": repo, "revision": rev}))
    logger.info("--resume %s: downloaded to %s in %.1fs", spec, ckpt, time.monotonic() - t0)
    return ckpt


def resolve_hub_resume(spec: str, output_dir: str | Path, accelerator,
                       floor_minutes: float = FLOOR_MINUTES) -> str:
    """The local checkpoint folder for `--resume hub:...`: rank 0 downloads, every rank gets the path
    (or the same error), so no rank waits on a download that failed.

    The other ranks poll the default process group's store (no collective is in flight, so no
    process-group timeout applies) for at most `download_timeout_s(size, floor_minutes)`, the size
    being what rank 0 read from the Hub, and log what they wait for every PROGRESS_EVERY_S."""
    import torch.distributed as dist

    from training.checkpoint import CheckpointError

    _CALLS[0] += 1
    key = f"{_STORE_KEY}/{_CALLS[0]}"
    store = None
    if accelerator.num_processes > 1 and dist.is_available() and dist.is_initialized():
        store = dist.distributed_c10d._get_default_store()  # the rendezvous store every rank reaches

    if accelerator.is_main_process:
        def publish(done: int, total: int | None) -> None:
            if store is not None:
                store.set(f"{key}/progress", json.dumps({"done": done, "total": total}))

        try:
            box = ["ok", str(download_checkpoint(spec, output_dir, progress=publish))]
        except ConfigError as e:
            box = ["config", str(e)]
        except Exception as e:  # noqa: BLE001  (every rank must learn of it, not hang)
            box = ["error", redact(str(e) if isinstance(e, CheckpointError) else
                                   f"--resume {spec}: download failed: {type(e).__name__}: {e}")]
        if store is not None:
            store.set(f"{key}/result", json.dumps(box))
    elif store is not None:
        box = _wait_for_download(store, key, spec, accelerator.process_index, floor_minutes)
    else:  # not distributed although several processes: nothing to wait on (should not happen)
        raise CheckpointError(f"--resume {spec}: {accelerator.num_processes} processes without a process group")
    kind, value = box
    if kind == "config":
        raise ConfigError(value)
    if kind == "error":
        raise CheckpointError(value)
    return value


def _wait_for_download(store, key: str, spec: str, rank: int, floor_minutes: float) -> list:
    """A non-main rank: poll for rank 0's result, within the limit its announced size allows."""
    from training.checkpoint import CheckpointError

    t0 = last_log = time.monotonic()
    total = None
    while not store.check([f"{key}/result"]):
        now = time.monotonic()
        done = None
        if store.check([f"{key}/progress"]):
            state = json.loads(store.get(f"{key}/progress"))
            done, total = state["done"], state["total"]
        limit = download_timeout_s(total, floor_minutes)
        if now - t0 > limit:
            raise CheckpointError(
                f"--resume {spec}: rank {rank} waited {limit / 60:.1f} min for rank 0 to download the checkpoint "
                f"({_gb(done)} of {_gb(total)} on its disk at last report); giving up. On a slow link, download "
                f"checkpoint/ of that revision yourself (`hf download`) and --resume the folder")
        if now - last_log >= PROGRESS_EVERY_S:
            logger.info("--resume %s: rank %d waiting for rank 0's download (%s of %s so far; %.0f s of at most "
                        "%.0f s)", spec, rank, _gb(done), _gb(total), now - t0, limit)
            last_log = now
        time.sleep(min(1.0, PROGRESS_EVERY_S))
    return json.loads(store.get(f"{key}/result"))
