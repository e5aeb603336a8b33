"""`--resume hub:owner/name@step-00000020`: a training checkpoint uploaded by HubSync, back on disk.

training/run_setup.py:restore calls `resolve_hub_resume`: rank 0 downloads checkpoint/ of that revision
into <output_dir>/hub-resume/ with snapshot_download (the others wait on one broadcast), and the run then
resumes from that folder exactly as from a local checkpoint: manifest, sha256, geometry checks.
"""

from __future__ import annotations

import json
import logging
import re
import time
from pathlib import Path

from training.args import ConfigError
from training.hub_sync import _REPO_RE, CHECKPOINT_IN_REPO, HUB_PREFIX, hub_api, redact

logger = logging.getLogger("training.hub_sync")

RESUME_DIR = "hub-resume"


def parse_hub_spec(spec: str) -> tuple[str, str | None]:
    """'hub:owner/name@step-00000020' -> ('owner/name', 'step-00000020'); no '@': (repo, None)."""
    repo, _, rev = spec.removeprefix(HUB_PREFIX).partition("@")
    if not _REPO_RE.match(repo):
        raise ConfigError(f"--resume {spec}: expected hub:owner/name@revision, e.g. hub:me/genesis-1b@step-00020000")
    return repo, rev or None


def download_checkpoint(spec: str, output_dir: str | Path) -> Path:
    """Download checkpoint/ of a Hub revision into <output_dir>/hub-resume/<owner>--<name>@<rev>/
    and return the checkpoint folder. A revision that does not exist is named with those that do."""
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
    t0 = time.monotonic()
    local = Path(api.snapshot_download(repo_id=repo, revision=rev, local_dir=dst,
                                       allow_patterns=[f"{CHECKPOINT_IN_REPO}/*"]))
    ckpt = local / CHECKPOINT_IN_REPO
    if not (ckpt / "manifest.json").is_file():
        raise CheckpointError(f"--resume {spec}: {repo}@{rev} holds no training checkpoint "
                              f"({CHECKPOINT_IN_REPO}/manifest.json); it was uploaded without "
                              "hub_strategy checkpoint")
    (local / "hub_source.json").write_text(json.dumps({"repo": repo, "revision": rev}))
    logger.info("--resume %s: downloaded to %s in %.1fs", spec, ckpt, time.monotonic() - t0)
    return ckpt


def resolve_hub_resume(spec: str, output_dir: str | Path, accelerator) -> str:
    """The local checkpoint folder for `--resume hub:...`: rank 0 downloads, every rank gets the path
    (or the same error) through one broadcast, so no rank waits on a download that failed."""
    from accelerate.utils import broadcast_object_list

    from training.checkpoint import CheckpointError

    box: list = [None]
    if accelerator.is_main_process:
        try:
            box = [("ok", str(download_checkpoint(spec, output_dir)))]
        except ConfigError as e:
            box = [("config", str(e))]
        except Exception as e:  # noqa: BLE001  (every rank must learn of it, not hang)
            box = [("error", redact(str(e) if isinstance(e, CheckpointError) else
                                    f"--resume {spec}: download failed: {type(e).__name__}: {e}"))]
    if accelerator.num_processes > 1:
        broadcast_object_list(box, from_process=0)
    kind, value = box[0]
    if kind == "config":
        raise ConfigError(value)
    if kind == "error":
        raise CheckpointError(value)
    return value
