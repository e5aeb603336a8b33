"""training/hub_sync.py at the huggingface_hub boundary, offline.

In process: what HubSync sends (files, commit messages, revisions) through a patched real `HfApi`
and through the local-folder fake hub (tests/fake_hub), and that the uploaded files load
with from_pretrained. The loop-level tests (the real training/pretrain.py, failing and slow
uploads, resume from a "Hub" checkpoint) are in tests/test_hub_sync_run.py.
"""

from __future__ import annotations

import inspect
import json
import shutil
import threading
import time
from pathlib import Path

import pytest
import torch
from _inspect_fixtures import checkpoint, embedded_data, inspect_run  # noqa: F401  (fixtures)
from genesis_fake_hub import FakeHfApi, install

from training.args import ConfigError, parse_args
from training.hub_resume import download_checkpoint, parse_hub_spec
from training.hub_sync import HubSync, step_revision

REPO = "genesis-test/tiny"
TOKEN = "hf_SENTINELtoken0123456789abcdef"
EXPORT_FILES = {"README.md", "chat_template.jinja", "config.json", "configuration_genesis.py",
                "generation_config.json", "hub.py", "model.safetensors", "modeling_genesis.py", "tokenizer.json",
                "tokenizer_config.json"}


@pytest.fixture
def run_dir(inspect_run, tmp_path):  # noqa: F811
    """An output_dir holding the run's metrics (the card reads val bits per byte from it)."""
    out = tmp_path / "run"
    out.mkdir()
    shutil.copy(inspect_run / "metrics.jsonl", out / "metrics.jsonl")
    return out


def _args(*extra: str):
    return parse_args(["--config", "training/recipes/debug.yaml", "--output_dir", "runs/x", *extra])


def test_bad_flags_are_refused_in_one_line(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    assert HubSync.from_args(_args(), is_main=True) is None  # no push_to_hub: nothing
    with pytest.raises(ConfigError, match="needs hub_model_id"):
        HubSync.from_args(_args("--push_to_hub"), is_main=False)  # on every rank, not only the main one
    with pytest.raises(ConfigError, match="owner/name, got 'tiny'"):
        HubSync.from_args(_args("--push_to_hub", "--hub_model_id", "tiny"), is_main=True)
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(ConfigError, match="HF_TOKEN") as e:
        HubSync.from_args(_args("--push_to_hub", "--hub_model_id", REPO), is_main=False)
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="hub:owner/name@revision"):
        parse_hub_spec("hub:nothing")
    assert parse_hub_spec("hub:a/b@step-00000002") == ("a/b", "step-00000002")


def _wait_done(hub: HubSync, n: int, timeout: float = 120) -> list[dict]:
    events, deadline = [], time.monotonic() + timeout
    while sum(e["status"] in ("done", "failed") for e in events) < n:
        assert time.monotonic() < deadline, events
        time.sleep(0.1)
        events += hub.events()
    return events


def test_real_hfapi_calls(inspect_run, run_dir, monkeypatch):  # noqa: F811
    """The exact calls a real Hub would get: each bound against HfApi's own signature."""
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi
    from huggingface_hub.hf_api import CommitInfo, GitRefInfo, GitRefs, RepoUrl

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    calls, branches = [], {"main": "0" * 40}

    def recorder(name, result):
        real = inspect.signature(getattr(HfApi, name))

        def fake(self, *args, **kwargs):
            bound = real.bind(self, *args, **kwargs)  # TypeError if we call it in a way it does not take
            args_ = dict(list(bound.arguments.items())[1:])
            if name == "create_commit":  # what would be sent: path in repo -> the local file's bytes
                ops = args_.pop("operations")
                args_["operations"] = {op.path_in_repo: Path(op.path_or_fileobj).read_bytes()
                                       for op in ops if isinstance(op, CommitOperationAdd)}
                args_["deleted"] = [op.path_in_repo for op in ops if isinstance(op, CommitOperationDelete)]
            calls.append((name, args_))
            return result(args_) if callable(result) else result
        monkeypatch.setattr(HfApi, name, fake)

    def commit(a):
        oid = f"{len(calls):040d}"
        branches[a.get("revision") or "main"] = oid
        return CommitInfo(commit_url=f"https://huggingface.co/{REPO}/commit/{oid}", commit_message="",
                          commit_description="", oid=oid)

    def branch(a):
        branches[a["branch"]] = a.get("revision")

    recorder("create_repo", RepoUrl(f"https://huggingface.co/{REPO}"))
    recorder("list_repo_files", lambda a: [".gitattributes", "stale.bin"])
    recorder("create_commit", commit)
    recorder("list_repo_refs", lambda a: GitRefs(branches=[GitRefInfo(name=n, ref=f"refs/heads/{n}", target_commit=o)
                                                           for n, o in branches.items()], converts=[], tags=[]))
    recorder("create_branch", branch)
    hub = HubSync(REPO, run_dir, strategy="checkpoint", private=True, api=HfApi())
    hub.submit(checkpoint(inspect_run, 4), 4, {"loss": 5.25, "tokens": 2048})
    events = _wait_done(hub, 1)
    assert hub.close(10) == []
    assert [e["status"] for e in events] == ["done"], events
    assert [c[0] for c in calls] == ["create_repo", "list_repo_files", "create_commit", "list_repo_refs",
                                     "create_branch"]
    assert calls[0][1] == {"repo_id": REPO, "private": True, "exist_ok": True}
    sent = calls[2][1]
    assert sent["repo_id"] == REPO and sent["revision"] == "main"
    assert sent["commit_message"] == "step-00000004: export + training checkpoint (step 4, loss 5.2500, 2,048 tokens)"
    ckpt = checkpoint(inspect_run, 4)
    want = EXPORT_FILES | {f"checkpoint/{p.relative_to(ckpt).as_posix()}" for p in ckpt.rglob("*") if p.is_file()}
    assert set(sent["operations"]) == want
    assert sent["deleted"] == ["stale.bin"]  # the previous upload's leftovers go in the same commit
    for rel in want - EXPORT_FILES:  # the training checkpoint goes up byte for byte
        assert sent["operations"][rel] == (ckpt / rel.removeprefix("checkpoint/")).read_bytes(), rel
    assert calls[4][1] == {"repo_id": REPO, "branch": "step-00000004", "revision": branches["main"]}
    assert TOKEN not in repr(calls)


def test_fake_hub_uploads_load_and_card(inspect_run, run_dir, tmp_path, monkeypatch):  # noqa: F811
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import genesis_hf  # noqa: F401  (registers the Auto classes)
    from training.inspection.models import load_model

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    api = FakeHfApi(tmp_path / "hub")
    hub = HubSync(REPO, run_dir, api=api, revision="latest")
    for step in (2, 4):
        hub.submit(checkpoint(inspect_run, step), step, {"loss": 6.0 - step / 4, "tokens": 512 * step})
    # Concurrent submits from another thread (the async-save commit callback) are safe.
    t = threading.Thread(target=hub.submit, args=(checkpoint(inspect_run, 6), 6, {"loss": 4.0, "tokens": 3072}))
    t.start()
    t.join()
    events = _wait_done(hub, 3)
    assert hub.close(30) == [] and not (run_dir / "hub-staging" / "step-00000002").exists()
    assert [(e["ckpt_step"], e["status"]) for e in events] == [(2, "done"), (4, "done"), (6, "done")]
    assert all("step" not in e and e["event"] == "hub_upload" for e in events)
    calls = [json.loads(line) for line in (tmp_path / "hub" / REPO / "calls.jsonl").read_text().splitlines()]
    assert [(c["call"], c.get("name") or c.get("revision")) for c in calls] == [
        ("create_repo", None), ("create_branch", "latest"),
        ("create_commit", "latest"), ("create_branch", "step-00000002"),
        ("create_commit", "latest"), ("create_branch", "step-00000004"),
        ("create_commit", "latest"), ("create_branch", "step-00000006")]
    commits = [c for c in calls if c["call"] == "create_commit"]
    assert commits[0]["message"] == "step-00000002: export (step 2, loss 5.5000, 1,024 tokens)"
    assert all(set(c["added"]) == EXPORT_FILES and c["deleted"] == [] for c in commits)
    refs = api.list_repo_refs(REPO)
    by_name = {b.name: b.target_commit for b in refs.branches}
    assert by_name["latest"] == by_name["step-00000006"] == commits[2]["oid"]
    assert by_name["step-00000004"] == commits[1]["oid"] and by_name["main"] == "initial"
    # Each step loads on its own, with the weights of that checkpoint.
    for step in (2, 6):
        folder = api.snapshot_dir(REPO, step_revision(step))
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        AutoTokenizer.from_pretrained(folder)
        ref, _, _ = load_model(checkpoint(inspect_run, step))
        sd, want = model.state_dict(), ref.state_dict()
        assert all(torch.equal(sd[k], want[k].to(torch.bfloat16).float()) for k in want)
        card = (folder / "README.md").read_text()
        assert f"| step | {step} |" in card and f'revision="step-{step:08d}"' in card
        assert "| validation bits per byte | python-code " in card and f"(at step {step}) |" in card
    card = (api.snapshot_dir(REPO, "step-00000006") / "README.md").read_text()
    assert "| lineage | run run; parent checkpoint step-00000004; previous upload step-00000004 |" in card
    assert "| last training loss | 4.0 |" in card and "| tokens seen | 3,072 |" in card
    assert not any(TOKEN in p.read_text(errors="ignore") for p in (tmp_path / "hub").rglob("*") if p.is_file())


def test_failing_upload_retried_then_given_up(inspect_run, run_dir, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    api = FakeHfApi(tmp_path / "hub", fail_commits=4)
    hub = HubSync(REPO, run_dir, api=api, attempts=3, backoff_s=0.05)
    hub.submit(checkpoint(inspect_run, 2), 2, {"loss": 5.0, "tokens": 1024})
    hub.submit(checkpoint(inspect_run, 4), 4, {"loss": 4.5, "tokens": 2048})  # 1 failure left: retried, done
    events = _wait_done(hub, 2)
    assert hub.close(10) == []
    assert [(e["ckpt_step"], e["status"], e["attempt"]) for e in events] == [
        (2, "retrying", 1), (2, "retrying", 2), (2, "failed", 3), (4, "retrying", 1), (4, "done", 2)]
    assert [e["retry_in_s"] for e in events if e["status"] == "retrying"] == [0.05, 0.1, 0.05]
    assert "503 Service Unavailable" in events[2]["error"] and events[2]["retryable"] is True
    assert [b.name for b in api.list_repo_refs(REPO).branches] == ["main", "step-00000004"]


def test_close_names_what_remained(inspect_run, run_dir, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    hub = HubSync(REPO, run_dir, api=FakeHfApi(tmp_path / "hub", commit_delay_s=30))
    hub.submit(checkpoint(inspect_run, 2), 2, {"loss": 5.0, "tokens": 1024})
    hub.submit(checkpoint(inspect_run, 4), 4, {"loss": 4.5, "tokens": 2048})
    t0 = time.monotonic()
    left = hub.close(1.0)
    assert time.monotonic() - t0 < 5
    assert len(left) == 2 and "step 2 (step-00000002): uploading" in left[0] and "step 4 (step-00000004): queued" in left[1]
    assert str(run_dir / "hub-staging" / "step-00000004") in left[1]
    assert [(e["ckpt_step"], e["status"]) for e in hub.events()] == [(2, "unfinished"), (4, "unfinished")]
    # The next launch re-queues what the last one left staged, oldest first.
    again = HubSync(REPO, run_dir, api=FakeHfApi(tmp_path / "hub2"))
    assert [e["ckpt_step"] for e in _wait_done(again, 2)] == [2, 4]
    assert again.close(10) == []


def test_end_strategy_uploads_the_last_at_close(inspect_run, run_dir, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    api = FakeHfApi(tmp_path / "hub")
    hub = HubSync(REPO, run_dir, api=api, strategy="end")
    for step in (2, 4):
        hub.submit(checkpoint(inspect_run, step), step, {"loss": 5.0, "tokens": 1024 * step})
    time.sleep(0.5)
    assert hub.events() == [] and not (tmp_path / "hub" / REPO).exists()  # nothing before the end
    assert hub.close(60) == []
    assert [(e["ckpt_step"], e["status"]) for e in hub.events()] == [(4, "done")]
    assert [b.name for b in api.list_repo_refs(REPO).branches] == ["main", "step-00000004"]


def test_download_names_the_revisions_that_exist(inspect_run, run_dir, tmp_path, monkeypatch):  # noqa: F811
    from training.checkpoint import CheckpointError

    monkeypatch.setenv("GENESIS_TEST_FAKE_HUB", str(tmp_path / "hub"))
    install(monkeypatch.setattr)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    with pytest.raises(CheckpointError, match=f"the Hub repo {REPO} does not exist"):
        download_checkpoint(f"hub:{REPO}@step-00000002", tmp_path / "new")
    hub = HubSync(REPO, run_dir, strategy="every_save")
    hub.submit(checkpoint(inspect_run, 2), 2, {"loss": 5.0, "tokens": 1024})
    assert _wait_done(hub, 1)[-1]["status"] == "done" and hub.close(10) == []
    with pytest.raises(CheckpointError, match="revision 'step-00000009' does not exist in .*; it has: main, "
                                              "step-00000002"):
        download_checkpoint(f"hub:{REPO}@step-00000009", tmp_path / "new")
    with pytest.raises(CheckpointError, match="holds no training checkpoint .* without hub_strategy checkpoint"):
        download_checkpoint(f"hub:{REPO}", tmp_path / "new")  # newest step; an export only
