"""Checkpoints to the Hub through the REAL training/pretrain.py (2 gloo ranks unless noted), with
the local-folder fake hub (tests/fake_hub, injected through its sitecustomize: the Hub boundary is in
the subprocess).

    run 1: uploads (export + training checkpoint) at steps 2 and 4, each commit slowed to 2 s:
           the exit waits for the one in flight
    run 2: a fresh output folder resumes from hub:genesis-test/tiny@step-00000002 and reproduces
           run 1's losses bit for bit; a tampered shard on the "Hub" and another world size are
           refused as a local resume refuses them
    runs 3-5: one process: uploads that always fail (retried, given up, training goes on), an exit
           timeout shorter than the upload (what remained is named), refusals at start
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
from _pretrain_fixtures import embedded_data  # noqa: F401  (fixture)
from _pretrain_run import ok, read_metrics, run_pretrain
from genesis_fake_hub import FakeHfApi, fake_hub_env

pytestmark = pytest.mark.distributed

REPO = "genesis-test/tiny"
TOKEN = "hf_SENTINELtoken0123456789abcdef"
ARGS = ("--max_steps", "4", "--save_steps", "2", "--logging_steps", "1", "--resume", "auto")
PUSH = ("--push_to_hub", "--hub_model_id", REPO)


def _env(hub: Path, **fake) -> dict:
    return {**fake_hub_env(hub, **fake), "HF_TOKEN": TOKEN}


def hub_events(out: Path) -> list[tuple[int, str]]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [(r["ckpt_step"], r["status"]) for r in map(json.loads, lines) if r.get("event") == "hub_upload"]


def assert_no_token(*places) -> None:
    for place in places:
        if isinstance(place, Path):
            files = [p for p in place.rglob("*") if p.is_file()] if place.is_dir() else [place]
            bad = [p for p in files if TOKEN.encode() in p.read_bytes()]
            assert not bad, f"the HF_TOKEN value was written to {bad}"
        else:
            assert TOKEN not in place


@pytest.fixture(scope="module")
def uploaded(tmp_path_factory, embedded_data):  # noqa: F811
    """Run 1: (output dir, fake hub dir, the run's result)."""
    root = tmp_path_factory.mktemp("hubrun")
    out, hub = root / "run", root / "hub"
    res = ok(run_pretrain(out, embedded_data, *ARGS, *PUSH, "--hub_strategy", "checkpoint",
                          env=_env(hub, commit_delay_s=2.0)))
    return out, hub, res


def test_uploads_while_training_and_exit_waits(uploaded):
    out, hub, res = uploaded
    assert sorted(read_metrics(out)) == [1, 2, 3, 4]  # every training record, none shadowed by an event
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["ckpt_step"], r["status"]) for r in lines if r.get("event") == "hub_upload"] == [(2, "done"), (4, "done")]
    # Step 4 was saved at the last step: its upload was in flight at exit, and the exit waited for it.
    assert re.search(r"hub: waiting up to 1800s for [12] upload\(s\): .*step 4 \(step-00000004\)", res.stderr), \
        res.stderr[-3000:]
    api = FakeHfApi(hub)
    refs = {b.name: b.target_commit for b in api.list_repo_refs(REPO).branches}
    assert set(refs) == {"main", "step-00000002", "step-00000004"} and refs["main"] == refs["step-00000004"]
    files = api.list_repo_files(REPO, revision="step-00000002")
    assert "model.safetensors" in files and "checkpoint/manifest.json" in files
    assert any(f.startswith("checkpoint/optimizer/") for f in files)
    assert not (out / "hub-staging").exists() or not any((out / "hub-staging").iterdir())
    assert_no_token(res.stdout, res.stderr, out, hub)


def test_async_saves_hand_over_from_their_commit(embedded_data, tmp_path):  # noqa: F811
    """save_mode async: the commit runs in a background thread, which calls hub.submit."""
    out, hub = tmp_path / "run", tmp_path / "hub"
    res = ok(run_pretrain(out, embedded_data, *ARGS, *PUSH, "--save_mode", "async", env=_env(hub)))
    assert hub_events(out) == [(2, "done"), (4, "done")]
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert next(r for r in records if r.get("event") == "checkpoint_plan")["mode"] == "async"
    losses = read_metrics(out)
    for step in (2, 4):  # the card carries the loss of the step that was saved
        card = (FakeHfApi(hub).snapshot_dir(REPO, f"step-{step:08d}") / "README.md").read_text()
        assert f"| last training loss | {losses[step]['loss']} |" in card
    assert_no_token(res.stdout, res.stderr, out, hub)


def test_resume_from_the_hub(uploaded, embedded_data, tmp_path):  # noqa: F811
    first, hub, _ = uploaded
    out = tmp_path / "elsewhere"
    spec = f"hub:{REPO}@step-00000002"
    res = ok(run_pretrain(out, embedded_data, *ARGS[:-1], spec, env=_env(hub)))
    assert f"downloaded_from: {spec}" in res.stdout
    assert (out / "hub-resume" / "genesis-test--tiny@step-00000002" / "checkpoint" / "manifest.json").is_file()
    want, got = read_metrics(first), read_metrics(out)
    assert sorted(got) == [3, 4] and all(got[s]["loss"] == want[s]["loss"] for s in (3, 4))  # bit-identical


def test_hub_resume_keeps_the_local_refusals(uploaded, embedded_data, tmp_path):  # noqa: F811
    _, hub, _ = uploaded
    spec = f"hub:{REPO}@step-00000002"
    res = run_pretrain(tmp_path / "other-world", embedded_data, *ARGS[:-1], spec, env=_env(hub), nproc=1)
    assert res.returncode == 2 and "world_size" in res.stderr and not read_metrics(tmp_path / "other-world")
    # A shard altered on the "Hub" (same size): the manifest's sha256 refuses it after the download.
    api = FakeHfApi(hub)
    tree = api.snapshot_dir(REPO, "step-00000002")
    shard = sorted((tree / "checkpoint" / "model").glob("*.distcp"))[0]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.unlink()  # the fake shares unchanged files between commits by hard links
    shard.write_bytes(bytes(data))
    out = tmp_path / "tampered"
    res = run_pretrain(out, embedded_data, *ARGS[:-1], spec, env=_env(hub))
    assert res.returncode != 0 and "model weights" in res.stderr and "sha256" in res.stderr
    assert not read_metrics(out)
    res = run_pretrain(tmp_path / "missing", embedded_data, *ARGS[:-1], f"hub:{REPO}@step-00000099",
                       env=_env(hub), nproc=1)
    assert res.returncode == 2
    assert f"revision 'step-00000099' does not exist in {REPO}; it has: main, step-00000002, step-00000004" in res.stderr


def test_failing_uploads_never_stop_training(embedded_data, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    res = ok(run_pretrain(out, embedded_data, *ARGS, *PUSH, "--hub_upload_attempts", "2",
                          "--hub_backoff_seconds", "0.05", nproc=1, env=_env(tmp_path / "hub", fail_commits=99)))
    assert sorted(read_metrics(out)) == [1, 2, 3, 4]
    assert hub_events(out) == [(2, "retrying"), (2, "failed"), (4, "retrying"), (4, "failed")]
    assert "upload to genesis-test/tiny given up after 2 attempts" in res.stderr
    assert (out / "checkpoints" / "step-00000004").is_dir()
    assert_no_token(res.stdout, res.stderr, out)


def test_exit_bound_names_what_remained(embedded_data, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    t0 = time.monotonic()
    res = ok(run_pretrain(out, embedded_data, *ARGS, *PUSH, "--hub_exit_timeout_minutes", "0.02", nproc=1,
                          env=_env(tmp_path / "hub", commit_delay_s=120)))
    assert time.monotonic() - t0 < 100  # not the 2 x 120 s the uploads would take
    assert "hub upload not finished at exit: genesis-test/tiny step 2 (step-00000002): uploading" in res.stderr
    assert "step 4 (step-00000004): queued" in res.stderr
    assert hub_events(out) == [(2, "unfinished"), (4, "unfinished")]
    assert sorted(p.name for p in (out / "hub-staging").iterdir()) == ["step-00000002", "step-00000004"]


def test_bad_hub_flags_are_refused_before_training(embedded_data, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    res = run_pretrain(out, embedded_data, *ARGS, *PUSH, env={"HF_TOKEN": ""})  # 2 ranks: both refuse
    assert res.returncode != 0
    for rank in (0, 1):
        assert f"[rank {rank}] ERROR training.pretrain: push_to_hub needs a Hub write token in the HF_TOKEN " \
               "environment variable" in res.stderr
    res = run_pretrain(out, embedded_data, *ARGS, "--push_to_hub", nproc=1, env={"HF_TOKEN": TOKEN})
    assert res.returncode == 2 and "pretrain: push_to_hub needs hub_model_id" in res.stderr
    assert not read_metrics(out) and not (out / "checkpoints").exists()
