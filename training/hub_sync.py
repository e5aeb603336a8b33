"""Checkpoints to the Hub while pretraining, and resuming from them (issue 13).

    hub = HubSync.from_args(args, is_main=accelerator.is_main_process)  # refuses bad flags at start
    ...
    hub.submit(checkpoint_dir, step, summary)   # after a checkpoint COMMITTED; never blocks
    for record in hub.events(): metrics.log(record)
    hub.close(timeout_s)                        # at exit: waits (bounded), names what remained

What one committed checkpoint becomes (rank 0, one background thread, checkpoints in step order):
  1. submit() hard-links the checkpoint's files into <output_dir>/hub-staging/step-XXXXXXXX/checkpoint
     (milliseconds; the links keep the files even when keep_last prunes the checkpoint meanwhile);
  2. the worker exports it (training/export.py: safetensors, tokenizer, generation config) and writes
     the card (step, tokens, loss, val bits per byte, lineage);
  3. ONE Hub commit on hub_revision (default main) holds the export, plus checkpoint/ (the sharded
     training checkpoint, manifest included) with hub_strategy "checkpoint"; files of the previous
     upload that this one lacks are deleted in the same commit, so every commit is a whole snapshot;
  4. a branch step-XXXXXXXX is created at that commit: from_pretrained(repo, revision="step-00000020").
A failed step is retried with exponential backoff from where it failed (the export is not redone,
a commit that went through is not repeated); every attempt is a metrics.jsonl record
{"event": "hub_upload", "ckpt_step": N, "status": "retrying"|"failed"|"done"|"unfinished", ...}.
The records carry no "step" key: readers key training records by "step".

`--resume hub:owner/name@step-00000020` downloads checkpoint/ of that revision back: training/hub_resume.py.

The token is HF_TOKEN, read by huggingface_hub itself; it is never an argument here, and error
text is redacted before it reaches a log line or a record.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import re
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from training.args import ConfigError

logger = logging.getLogger("training.hub_sync")

HUB_PREFIX = "hub:"
STAGING = "hub-staging"
CHECKPOINT_IN_REPO = "checkpoint"
_REPO_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_TOKEN_RE = re.compile(r"hf_[A-Za-z0-9]{10,}")


def step_revision(step: int) -> str:
    return f"step-{step:08d}"


def hub_api():
    """huggingface_hub.HfApi; it reads the token from HF_TOKEN."""
    from huggingface_hub import HfApi

    return HfApi()


def redact(text: str) -> str:
    """`text` without the values of HF_TOKEN / HUGGING_FACE_HUB_TOKEN or anything token-shaped."""
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        if value := os.environ.get(name):
            text = text.replace(value, "***")
    return _TOKEN_RE.sub("hf_***", text)


class _Final(Exception):
    """A failure that retrying cannot fix (the checkpoint cannot be exported)."""


@dataclass
class _Job:
    step: int
    source: Path  # the committed checkpoint as submitted
    staging: Path  # <output_dir>/hub-staging/step-XXXXXXXX
    summary: dict
    linked: bool = True  # False: hard links failed, the worker copies the checkpoint
    phase: str = "queued"
    attempt: int = 0
    error: str | None = None
    oid: str | None = None  # the commit, once it went through
    started: float = field(default_factory=time.monotonic)

    @property
    def checkpoint(self) -> Path:
        return self.staging / "checkpoint"

    @property
    def export(self) -> Path:
        return self.staging / "export"

    def describe(self) -> str:
        what = f"step {self.step} ({step_revision(self.step)}): {self.phase}"
        if self.attempt:
            what += f", attempt {self.attempt}"
        if self.error:
            what += f", last error: {self.error}"
        return what


class HubSync:
    """Uploads each committed checkpoint's export in a background thread (rank 0 only)."""

    def __init__(self, repo_id: str, output_dir: str | Path, *, strategy: str = "every_save",
                 private: bool | None = None, revision: str | None = None, attempts: int = 6,
                 backoff_s: float = 30.0, max_backoff_s: float = 600.0, api=None):
        if strategy not in ("every_save", "checkpoint", "end"):
            raise ConfigError(f"hub_strategy must be every_save, checkpoint or end, got {strategy!r}")
        self.repo_id, self.strategy, self.private = repo_id, strategy, private
        self.revision = revision or "main"
        self.attempts, self.backoff_s, self.max_backoff_s = max(1, attempts), backoff_s, max_backoff_s
        self.output_dir = Path(output_dir)
        self.api = api if api is not None else hub_api()
        self._queue: collections.deque[_Job] = collections.deque()
        self._pending_end: _Job | None = None
        self._events: list[dict] = []
        self._cv = threading.Condition()
        self._stop = threading.Event()
        self._closing = False
        self._repo_ready = False
        self._last_done: str | None = None  # lineage: the previous step's revision in this repo
        self._worker: threading.Thread | None = None
        self._requeue_leftovers()

    @classmethod
    def from_args(cls, args, *, is_main: bool) -> HubSync | None:
        """None without push_to_hub, and on every rank but the main one. Bad flags raise ConfigError
        on EVERY rank, before any work."""
        if not getattr(args, "push_to_hub", False):
            return None
        repo = args.hub_model_id
        if not repo:
            raise ConfigError("push_to_hub needs hub_model_id (owner/name of the Hub model repo)")
        if not _REPO_RE.match(repo):
            raise ConfigError(f"hub_model_id must be owner/name, got {repo!r}")
        if not os.environ.get("HF_TOKEN"):
            raise ConfigError("push_to_hub needs a Hub write token in the HF_TOKEN environment variable "
                              "(read from there only, never from a flag or a file)")
        if not is_main:
            return None
        return cls(repo, args.output_dir, strategy=args.hub_strategy, private=args.hub_private_repo,
                   revision=args.hub_revision, attempts=int(getattr(args, "hub_upload_attempts", 6)),
                   backoff_s=float(getattr(args, "hub_backoff_seconds", 30.0)))

    # ------------------------------------------------------------------ called by the loop

    def submit(self, checkpoint: Path, step: int, summary: dict) -> None:
        """Queue a committed checkpoint. Thread-safe; returns in milliseconds; never raises."""
        try:
            job = self._stage(Path(checkpoint), int(step), dict(summary))
        except Exception as e:  # noqa: BLE001  (an upload problem must never stop training)
            self._record(step, "failed", error=f"cannot stage {checkpoint}: {redact(str(e))}")
            return
        with self._cv:
            if self._stop.is_set():  # after close(): nothing will upload it in this process
                self._events.append(self._event(step, "unfinished", staging=str(job.staging),
                                                error="submitted after close(); re-queued at the next launch"))
                return
            if self.strategy == "end":  # only the newest one is uploaded, at close()
                old, self._pending_end = self._pending_end, job
                if old is not None:
                    shutil.rmtree(old.staging, ignore_errors=True)
                return
            self._queue.append(job)
            self._start_worker()
            self._cv.notify_all()
        logger.info("hub: step %d queued for %s (%s)", step, self.repo_id, self.strategy)

    def events(self) -> list[dict]:
        """The upload records since the last call (for metrics.jsonl), oldest first."""
        with self._cv:
            out, self._events = self._events, []
        return out

    def close(self, timeout_s: float) -> list[str]:
        """Wait at most `timeout_s` for the queued uploads; return a description of each one that
        did not finish (and record it as "unfinished"). The worker thread is a daemon: what remains
        ends with the process."""
        deadline = time.monotonic() + max(0.0, timeout_s)
        with self._cv:
            self._closing = True
            if self._pending_end is not None:
                self._queue.append(self._pending_end)
                self._pending_end = None
                self._start_worker()
            if self._queue:
                logger.info("hub: waiting up to %.0fs for %d upload(s): %s", timeout_s, len(self._queue),
                            "; ".join(j.describe() for j in self._queue))
            while self._queue and (left := deadline - time.monotonic()) > 0:
                self._cv.wait(timeout=min(left, 1.0))
            remaining = list(self._queue)
            self._stop.set()
            self._cv.notify_all()
        for job in remaining:
            self._record(job.step, "unfinished", phase=job.phase, attempt=job.attempt, error=job.error,
                         staging=str(job.staging))
        return [f"{self.repo_id} {j.describe()}; its files stay in {j.staging} (re-queued at the next launch)"
                for j in remaining]

    # ------------------------------------------------------------------ staging

    def _stage(self, ckpt: Path, step: int, summary: dict) -> _Job:
        if not (ckpt / "manifest.json").is_file():
            raise FileNotFoundError(f"{ckpt} is not a committed checkpoint (no manifest.json)")
        staging = self.output_dir / STAGING / step_revision(step)
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        job = _Job(step=step, source=ckpt, staging=staging, summary=summary)
        try:  # checkpoint files are never modified after the commit: links are a snapshot
            shutil.copytree(ckpt, job.checkpoint, copy_function=os.link)
        except OSError as e:  # another file system: copy in the worker (before keep_last prunes it)
            logger.warning("hub: cannot hard-link %s (%s); the upload thread copies it", ckpt, e)
            shutil.rmtree(job.checkpoint, ignore_errors=True)
            job.linked = False
        (staging / "job.json").write_text(json.dumps({"step": step, "source": str(ckpt), "summary": summary}))
        return job

    def _requeue_leftovers(self) -> None:
        """Uploads a killed launch left in hub-staging go first (their links still hold the files)."""
        root = self.output_dir / STAGING
        if self.strategy == "end" or not root.is_dir():
            return
        for staging in sorted(root.glob("step-*")):
            try:
                saved = json.loads((staging / "job.json").read_text())
                if not (staging / "checkpoint" / "manifest.json").is_file():
                    raise FileNotFoundError("no linked checkpoint")
            except (OSError, ValueError) as e:
                logger.warning("hub: dropping %s left by an earlier launch (%s)", staging, e)
                shutil.rmtree(staging, ignore_errors=True)
                continue
            shutil.rmtree(staging / "export", ignore_errors=True)
            self._queue.append(_Job(step=saved["step"], source=Path(saved["source"]), staging=staging,
                                    summary=saved.get("summary") or {}))
            logger.info("hub: re-queued step %d left unuploaded by an earlier launch", saved["step"])
        if self._queue:
            self._start_worker()

    # ------------------------------------------------------------------ the worker

    def _start_worker(self) -> None:
        if self._worker is None or not self._worker.is_alive():
            self._worker = threading.Thread(target=self._run, name="hub-sync", daemon=True)
            self._worker.start()

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._queue and not self._stop.is_set():
                    self._cv.wait()
                if self._stop.is_set():
                    return
                job = self._queue[0]
            self._process(job)
            with self._cv:
                if self._queue and self._queue[0] is job:
                    self._queue.popleft()
                self._cv.notify_all()

    def _process(self, job: _Job) -> None:
        while not self._stop.is_set():
            job.attempt += 1
            try:
                files, nbytes = self._attempt(job)
            except _Final as e:
                job.error = redact(str(e))
                logger.error("hub: step %d cannot be uploaded: %s", job.step, job.error)
                self._record(job.step, "failed", attempt=job.attempt, error=job.error, retryable=False)
                break
            except Exception as e:  # noqa: BLE001  (network, server, disk: retried)
                job.error = redact(f"{type(e).__name__}: {e}")
                if job.attempt >= self.attempts:
                    logger.error("hub: step %d upload to %s given up after %d attempts: %s", job.step,
                                 self.repo_id, job.attempt, job.error)
                    self._record(job.step, "failed", attempt=job.attempt, error=job.error, retryable=True)
                    break
                wait = min(self.backoff_s * 2 ** (job.attempt - 1), self.max_backoff_s)
                logger.warning("hub: step %d upload attempt %d/%d failed (%s); retrying in %.1fs", job.step,
                               job.attempt, self.attempts, job.error, wait)
                self._record(job.step, "retrying", attempt=job.attempt, error=job.error, retry_in_s=wait)
                job.phase = "waiting to retry"
                if self._stop.wait(wait):
                    return  # close() gave up on it: it is named there and stays staged
                continue
            seconds = time.monotonic() - job.started
            logger.info("hub: step %d uploaded to %s@%s (commit %s, %d files, %.1f MB, %.1fs)", job.step,
                        self.repo_id, step_revision(job.step), job.oid, files, nbytes / 1e6, seconds)
            self._record(job.step, "done", attempt=job.attempt, revision=step_revision(job.step),
                         branch=self.revision, commit=job.oid, files=files, bytes=nbytes, seconds=round(seconds, 3))
            self._last_done = step_revision(job.step)
            break
        else:
            return
        shutil.rmtree(job.staging, ignore_errors=True)

    def _attempt(self, job: _Job) -> tuple[int, int]:
        """One try, resuming where the previous one stopped. Returns (files, bytes) sent."""
        from huggingface_hub import CommitOperationAdd, CommitOperationDelete

        if not (job.export / "config.json").is_file():
            job.phase = "exporting"
            self._export(job)
        job.phase = "uploading"
        if not self._repo_ready:
            self.repo_id = self.api.create_repo(self.repo_id, private=self.private, exist_ok=True).repo_id
            if self.revision != "main":
                self.api.create_branch(self.repo_id, branch=self.revision, exist_ok=True)
            self._repo_ready = True
        files = self._files(job)
        if job.oid is None:
            stale = set(self.api.list_repo_files(self.repo_id, revision=self.revision)) - set(files) - {".gitattributes"}
            ops = [CommitOperationAdd(path_in_repo=rel, path_or_fileobj=str(src)) for rel, src in files.items()]
            ops += [CommitOperationDelete(path_in_repo=rel) for rel in sorted(stale)]
            info = self.api.create_commit(self.repo_id, ops, commit_message=self.commit_message(job),
                                          revision=self.revision)
            job.oid = info.oid
        branch = step_revision(job.step)
        refs = self.api.list_repo_refs(self.repo_id)
        if any(b.name == branch for b in refs.branches):
            logger.warning("hub: branch %s already exists in %s (an earlier run?); left as it is, this upload is "
                           "commit %s on %s", branch, self.repo_id, job.oid, self.revision)
        else:
            self.api.create_branch(self.repo_id, branch=branch, revision=job.oid)
        return len(files), sum(p.stat().st_size for p in files.values())

    def commit_message(self, job: _Job) -> str:
        loss, tokens = job.summary.get("loss"), job.summary.get("tokens")
        parts = [f"step {job.step}"]
        if isinstance(loss, (int, float)):
            parts.append(f"loss {loss:.4f}")
        if isinstance(tokens, int):
            parts.append(f"{tokens:,} tokens")
        what = "export + training checkpoint" if self.strategy == "checkpoint" else "export"
        return f"{step_revision(job.step)}: {what} ({', '.join(parts)})"

    def _files(self, job: _Job) -> dict[str, Path]:
        """path in the repo -> local file, sorted."""
        out = {p.relative_to(job.export).as_posix(): p for p in job.export.rglob("*") if p.is_file()}
        if self.strategy == "checkpoint":
            out |= {f"{CHECKPOINT_IN_REPO}/{p.relative_to(job.checkpoint).as_posix()}": p
                    for p in job.checkpoint.rglob("*") if p.is_file()}
        return dict(sorted(out.items()))

    def _export(self, job: _Job) -> None:
        from genesis_hf import GenesisConfig
        from genesis_hf.hub import write_model_card
        from training.checkpoint import CheckpointError, read_meta
        from training.export import ExportError, card_details, export_checkpoint

        if not job.linked and not (job.checkpoint / "manifest.json").is_file():
            try:
                shutil.copytree(job.source, job.checkpoint)
            except OSError as e:
                raise _Final(f"{job.source} is gone before it could be copied (pruned?): {e}") from e
        shutil.rmtree(job.export, ignore_errors=True)
        try:
            export_checkpoint(job.checkpoint, job.export)
            meta = read_meta(job.checkpoint)
            train_state = json.loads((job.checkpoint / "train_state.json").read_text())
        except (ExportError, CheckpointError, OSError, ValueError) as e:
            raise _Final(f"export of {job.source} failed: {e}") from e
        details = card_details(meta, train_state, job.source)
        details["last training loss"] = job.summary.get("loss", details["last training loss"])
        if isinstance(job.summary.get("tokens"), int):
            details["tokens seen"] = f"{job.summary['tokens']:,}"
        if (bpb := job.summary.get("val_bpb")) is None:
            bpb = self._val_bpb(job.step)
        details["validation bits per byte"] = "not measured"
        if bpb:
            at = bpb.pop("at step")
            details["validation bits per byte"] = ", ".join(f"{s} {v:.4f}" for s, v in sorted(bpb.items())) + \
                f" (at step {at})"
        details["lineage"] = self._lineage(job, train_state)
        config = GenesisConfig.from_pretrained(job.export)
        card = write_model_card(job.export, config, details)
        rev = step_revision(job.step)
        with open(card, "a", encoding="utf-8") as f:
            f.write(f"\n## This step on the Hub\n\nEvery uploaded checkpoint is a branch `step-XXXXXXXX`; "
                    f"`{self.revision}` follows the newest.\n\n```python\nAutoModelForCausalLM.from_pretrained("
                    f'"{self.repo_id}", revision="{rev}", trust_remote_code=True)\n```\n')
            if self.strategy == "checkpoint":
                f.write(f"\n`checkpoint/` is the sharded training checkpoint (model, AdamW, scheduler, RNG, data "
                        f"order): continue the run elsewhere with `--resume hub:{self.repo_id}@{rev}`.\n")

    def _val_bpb(self, step: int) -> dict | None:
        """The newest validation bits per byte at or before `step` in metrics.jsonl, per source."""
        path, found = self.output_dir / "metrics.jsonl", None
        try:
            lines = path.read_text().splitlines()
        except OSError:
            return None
        for line in lines:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec.get("step"), int) and rec["step"] <= step and rec.get("val_bpb"):
                found = {**rec["val_bpb"], "at step": rec["step"]}
        return found

    def _lineage(self, job: _Job, train_state: dict) -> str:
        parts = [f"run {self.output_dir.resolve().name}"]
        parent = train_state.get("parent_checkpoint")
        source = Path(parent).parent / "hub_source.json" if parent else None
        if source is not None and source.is_file():
            src = json.loads(source.read_text())
            parts.append(f"resumed from hub:{src['repo']}@{src['revision']}")
        elif parent:
            parts.append(f"parent checkpoint {Path(parent).name}")
        if self._last_done:
            parts.append(f"previous upload {self._last_done}")
        return "; ".join(parts)

    def _event(self, step: int, status: str, **fields) -> dict:
        rec = {"event": "hub_upload", "ckpt_step": int(step), "status": status, "repo": self.repo_id,
               "time": round(time.time(), 3)}
        return rec | {k: v for k, v in fields.items() if v is not None}

    def _record(self, step: int, status: str, **fields) -> None:
        rec = self._event(step, status, **fields)
        with self._cv:
            self._events.append(rec)
