"""Test double: a local-folder stand-in for the Hub. The `HfApi` methods HubSync and the Hub resume
call, with the same names, arguments and return types, over a folder instead of the network.

Injected from outside the product: `install()` replaces `huggingface_hub.HfApi` with it. A test's
subprocess gets it through this folder's sitecustomize.py (put tests/fake_hub on PYTHONPATH, as
`fake_hub_env` does); an in-process test calls `install` with monkeypatch.

    GENESIS_TEST_FAKE_HUB=/tmp/hub                     # every run in the test talks to this folder
    GENESIS_TEST_FAKE_HUB='{"dir": "/tmp/hub", "fail_commits": 99, "commit_delay_s": 5}'

Layout of the folder (what a test reads back):
    <dir>/<owner>/<name>/refs.json          {"branches": {"main": oid, ...}, "tags": {...}}
    <dir>/<owner>/<name>/commits/<oid>/     the repo's full file tree at that commit
    <dir>/<owner>/<name>/calls.jsonl        one line per write call: what a real Hub would be sent

`fail_commits: N` makes the first N `create_commit` calls of a process raise a 503 (an
HfHubHTTPError, as the real client does); `commit_delay_s` makes each commit take that long.
"""

from __future__ import annotations

import fnmatch
import hashlib
import importlib
import json
import os
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import CommitOperationAdd, CommitOperationDelete
from huggingface_hub.errors import (
    HfHubHTTPError,
    RepositoryNotFoundError,
    Response,
    RevisionNotFoundError,
)
from huggingface_hub.hf_api import GitRefInfo, GitRefs

ENV = "GENESIS_TEST_FAKE_HUB"


HERE = Path(__file__).resolve().parent


def fake_hub_env(hub: str | Path, **options) -> dict:
    """Environment for a subprocess that must talk to the fake Hub in folder `hub`."""
    path = os.pathsep.join(p for p in (str(HERE), os.environ.get("PYTHONPATH", "")) if p)
    raw = json.dumps({"dir": str(hub), **options}) if options else str(hub)
    return {ENV: raw, "PYTHONPATH": path}


def install(setattr_=setattr) -> None:
    """Make `huggingface_hub.HfApi()` return a FakeHfApi over GENESIS_TEST_FAKE_HUB's folder.
    `setattr_`: monkeypatch.setattr in an in-process test (undone after it)."""
    import huggingface_hub
    import huggingface_hub.hf_api

    class HfApi:  # a class, as the real one is (annotations such as `HfApi | None` must still work)
        def __new__(cls, *args, **kwargs):
            cfg = fake_hub_config()
            if cfg is None:
                raise RuntimeError(f"{ENV} is not set: the fake Hub has no folder")
            return FakeHfApi(cfg["dir"], **{k: v for k, v in cfg.items() if k != "dir"})

    setattr_(huggingface_hub, "HfApi", HfApi)
    setattr_(huggingface_hub.hf_api, "HfApi", HfApi)


def fake_hub_config() -> dict | None:
    """The parsed GENESIS_TEST_FAKE_HUB (a folder, or JSON with "dir"), or None in real runs."""
    raw = os.environ.get(ENV, "").strip()
    if not raw:
        return None
    return json.loads(raw) if raw.startswith("{") else {"dir": raw}


def _http_error(cls, status: int, message: str, url: str):
    http = importlib.import_module(Response.__module__.split(".")[0])  # the client huggingface_hub uses
    return cls(message, response=Response(status, request=http.Request("POST", url)))


@dataclass
class FakeCommitInfo:  # the fields of huggingface_hub.CommitInfo that callers read
    oid: str
    commit_url: str
    commit_message: str


@dataclass
class FakeRepoUrl:
    repo_id: str


class FakeHfApi:
    """HfApi over a folder. Thread-safe; one instance per process."""

    def __init__(self, root: str | Path, *, fail_commits: int = 0, commit_delay_s: float = 0.0, **_):
        self.root = Path(root)
        self.fail_commits, self.commit_delay_s = int(fail_commits), float(commit_delay_s)
        self._lock = threading.Lock()

    # ---- storage
    def _repo(self, repo_id: str, must_exist: bool = True) -> Path:
        path = self.root / repo_id
        if must_exist and not (path / "refs.json").is_file():
            raise _http_error(RepositoryNotFoundError, 404, f"404 Repository Not Found for url: {repo_id}",
                              f"https://huggingface.co/api/models/{repo_id}")
        return path

    def _refs(self, repo_id: str) -> dict:
        return json.loads((self._repo(repo_id) / "refs.json").read_text())

    def _write_refs(self, repo_id: str, refs: dict) -> None:
        (self._repo(repo_id) / "refs.json").write_text(json.dumps(refs, indent=1, sort_keys=True))

    def _log(self, repo_id: str, record: dict) -> None:
        with open(self.root / repo_id / "calls.jsonl", "a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")

    def _oid(self, repo_id: str, revision: str | None) -> str:
        refs, rev = self._refs(repo_id), revision or "main"
        for kind in ("branches", "tags"):
            if rev in refs[kind]:
                return refs[kind][rev]
        if (self._repo(repo_id) / "commits" / rev).is_dir():
            return rev
        raise _http_error(RevisionNotFoundError, 404, f"404 Revision Not Found: {rev}",
                          f"https://huggingface.co/api/models/{repo_id}/revision/{rev}")

    def snapshot_dir(self, repo_id: str, revision: str | None = None) -> Path:
        """The folder holding the repo's files at `revision` (tests load from it)."""
        return self._repo(repo_id) / "commits" / self._oid(repo_id, revision)

    # ---- the HfApi methods
    def create_repo(self, repo_id: str, *, private: bool | None = None, exist_ok: bool = False, repo_type=None,
                    **_) -> FakeRepoUrl:
        with self._lock:
            path = self._repo(repo_id, must_exist=False)
            if (path / "refs.json").is_file():
                if not exist_ok:
                    raise _http_error(HfHubHTTPError, 409, "409 Conflict: You already created this model repo",
                                      "https://huggingface.co/api/repos/create")
                return FakeRepoUrl(repo_id)
            (path / "commits" / "initial").mkdir(parents=True)
            (path / "refs.json").write_text(json.dumps({"branches": {"main": "initial"}, "tags": {}}))
            self._log(repo_id, {"call": "create_repo", "private": private, "repo_type": repo_type})
            return FakeRepoUrl(repo_id)

    def list_repo_refs(self, repo_id: str, **_) -> GitRefs:
        refs = self._refs(repo_id)
        infos = {kind: [GitRefInfo(name=n, ref=f"refs/{'heads' if kind == 'branches' else 'tags'}/{n}",
                                   target_commit=oid) for n, oid in sorted(refs[kind].items())]
                 for kind in ("branches", "tags")}
        return GitRefs(branches=infos["branches"], converts=[], tags=infos["tags"])

    def list_repo_files(self, repo_id: str, *, revision: str | None = None, **_) -> list[str]:
        base = self.snapshot_dir(repo_id, revision)
        return sorted(str(p.relative_to(base)) for p in base.rglob("*") if p.is_file())

    def create_branch(self, repo_id: str, *, branch: str, revision: str | None = None, exist_ok: bool = False,
                      **_) -> None:
        self._create_ref(repo_id, "branches", branch, revision, exist_ok)

    def create_tag(self, repo_id: str, *, tag: str, revision: str | None = None, exist_ok: bool = False,
                   **_) -> None:
        self._create_ref(repo_id, "tags", tag, revision, exist_ok)

    def _create_ref(self, repo_id, kind, name, revision, exist_ok) -> None:
        with self._lock:
            refs = self._refs(repo_id)
            if name in refs[kind]:
                if exist_ok:
                    return
                raise _http_error(HfHubHTTPError, 409, f"409 Conflict: reference {name} already exists",
                                  f"https://huggingface.co/api/models/{repo_id}/branch/{name}")
            refs[kind][name] = self._oid(repo_id, revision)
            self._write_refs(repo_id, refs)
            self._log(repo_id, {"call": f"create_{kind[:-1] if kind == 'tags' else 'branch'}", "name": name,
                                "revision": revision})

    def create_commit(self, repo_id: str, operations, *, commit_message: str, revision: str | None = None,
                      **_) -> FakeCommitInfo:
        operations = list(operations)
        if self.commit_delay_s:
            time.sleep(self.commit_delay_s)
        with self._lock:
            if self.fail_commits > 0:
                self.fail_commits -= 1
                raise _http_error(HfHubHTTPError, 503, "503 Service Unavailable (fake hub: injected failure)",
                                  f"https://huggingface.co/api/models/{repo_id}/commit/{revision or 'main'}")
            rev = revision or "main"
            refs = self._refs(repo_id)
            if rev not in refs["branches"]:
                raise _http_error(RevisionNotFoundError, 404, f"404 Revision Not Found: {rev}",
                                  f"https://huggingface.co/api/models/{repo_id}/commit/{rev}")
            parent = self.snapshot_dir(repo_id, rev)
            digest = hashlib.sha1(f"{repo_id}{rev}{time.time_ns()}{commit_message}".encode()).hexdigest()
            tree = self._repo(repo_id) / "commits" / digest
            shutil.copytree(parent, tree, copy_function=os.link)  # unchanged files shared with the parent
            added, deleted = [], []
            for op in operations:
                dst = tree / op.path_in_repo
                if isinstance(op, CommitOperationAdd):
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    dst.unlink(missing_ok=True)
                    shutil.copyfile(op.path_or_fileobj, dst)
                    added.append(op.path_in_repo)
                elif isinstance(op, CommitOperationDelete):
                    dst.unlink()
                    deleted.append(op.path_in_repo)
                else:
                    raise TypeError(f"fake hub: unsupported operation {op!r}")
            refs["branches"][rev] = digest
            self._write_refs(repo_id, refs)
            self._log(repo_id, {"call": "create_commit", "revision": rev, "message": commit_message,
                                "added": sorted(added), "deleted": sorted(deleted), "oid": digest})
            return FakeCommitInfo(oid=digest, commit_url=f"https://huggingface.co/{repo_id}/commit/{digest}",
                                  commit_message=commit_message)

    def snapshot_download(self, repo_id: str, *, revision: str | None = None, local_dir=None,
                          allow_patterns=None, **_) -> str:
        src = self.snapshot_dir(repo_id, revision)
        patterns = [allow_patterns] if isinstance(allow_patterns, str) else allow_patterns
        dst = Path(local_dir)
        for rel in self.list_repo_files(repo_id, revision=revision):
            if patterns is None or any(fnmatch.fnmatch(rel, p) for p in patterns):
                (dst / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src / rel, dst / rel)
        return str(dst)
