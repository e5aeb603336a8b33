"""save_mode: async on the REAL script (2 gloo ranks): still atomic, still exact, never left behind.

A stall injected into the background phase (GENESIS_CKPT_TEST_STALL, training/checkpoint/_runtime.py)
makes "training went on while the checkpoint was written" certain rather than a matter of timing.
"""

from __future__ import annotations

import json
import time

import pytest
import torch
from _pretrain_fixtures import embedded_data  # noqa: F401  (fixture)
from _pretrain_run import (
    assert_same_tensors,
    checkpoint_tensors,
    ok,
    read_metrics,
    run_pretrain,
)

from training.checkpoint import latest_checkpoint

pytestmark = pytest.mark.distributed

N = 12
ARGS = ("--max_steps", str(N), "--save_steps", "4", "--logging_steps", "1", "--resume", "auto")
STALL = "hashing files:3"  # every background save sleeps 3 s before hashing (steps take ~0.05 s here)


def records(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def straight(tmp_path_factory, embedded_data):  # noqa: F811
    """The uninterrupted run, saved synchronously: the reference for every async run."""
    out = tmp_path_factory.mktemp("sync-straight")
    ok(run_pretrain(out, embedded_data, *ARGS, "--save_mode", "sync"))
    return out


def test_async_run_equals_sync_and_records_every_save(straight, embedded_data, tmp_path):  # noqa: F811
    out = tmp_path / "async"
    res = ok(run_pretrain(out, embedded_data, *ARGS, "--save_mode", "async"))
    a, b = read_metrics(straight), read_metrics(out)
    assert [a[s]["loss"] for s in sorted(a)] == [b[s]["loss"] for s in sorted(b)]
    saves = [r for r in records(out) if r.get("event") == "checkpoint"]
    assert [r["step"] for r in saves] == [4, 8, 12]
    for r in saves:
        assert r["mode"] == "async" and r["bytes"] > 0 and 0 <= r["blocked_s"] <= r["total_s"]
    plan = next(r for r in records(out) if r.get("event") == "checkpoint_plan")
    assert plan["mode"] == plan["requested"] == "async" and plan["need_bytes"] > 0
    assert "state staged to host memory" in res.stderr
    # The async checkpoint holds exactly what the synchronous one holds.
    assert_same_tensors(checkpoint_tensors(straight / "checkpoints" / f"step-{N:08d}"),
                        checkpoint_tensors(out / "checkpoints" / f"step-{N:08d}"))


def test_sigkill_during_background_save_then_resume_is_bit_identical(straight, embedded_data, tmp_path):  # noqa: F811
    """Step 4's save is written while steps 5-8 train; step 8's save is still being written when
    every rank is SIGKILLed after step 10. The resume picks step 4 (never the half-written 8) and
    the run's per-step losses and final weights equal the uninterrupted run's, bit for bit."""
    out = tmp_path / "killed"
    env = {"GENESIS_CKPT_TEST_STALL": STALL, "GENESIS_TEST_FAULTS": "kill@10"}
    res = run_pretrain(out, embedded_data, *ARGS, "--save_mode", "async", env=env)
    assert res.returncode != 0, "the run was meant to be SIGKILLed after step 10"
    ckpts = out / "checkpoints"
    assert latest_checkpoint(ckpts).name == "step-00000004"
    assert list(ckpts.glob(".tmp-step-00000008-*")), "step 8 should have been caught mid-write"
    recs = records(out)
    # Training went on while step 4's checkpoint was being written: steps after 4 were logged
    # before its commit record, and the save of step 8 had to wait for it.
    commit_at = next(i for i, r in enumerate(recs) if r.get("event") == "checkpoint" and r["step"] == 4)
    assert any(r.get("step", 0) > 4 and "loss" in r for r in recs[:commit_at])
    assert "waiting for the checkpoint of step 4 to commit before saving step 8" in res.stderr

    res = ok(run_pretrain(out, embedded_data, *ARGS, "--save_mode", "async"))
    assert "resume audit:" in res.stdout and "checkpoint: " in res.stdout and "step-00000004" in res.stdout
    a, b = read_metrics(straight), read_metrics(out)
    assert sorted(a) == sorted(b) == list(range(1, N + 1))
    for step in a:
        for key in ("loss", "grad_norm", "lr", "tokens", "tokens_by_source"):
            assert a[step][key] == b[step][key], f"step {step}: {key} {a[step][key]!r} != {b[step][key]!r}"
    assert not list(ckpts.glob(".tmp-step-*"))
    assert_same_tensors(checkpoint_tensors(straight / "checkpoints" / f"step-{N:08d}"),
                        checkpoint_tensors(ckpts / f"step-{N:08d}"))


def test_exit_waits_for_the_last_commit(embedded_data, tmp_path):  # noqa: F811
    out = tmp_path / "exit"
    t0 = time.monotonic()
    res = ok(run_pretrain(out, embedded_data, "--max_steps", "4", "--save_steps", "4", "--save_mode", "async",
                          env={"GENESIS_CKPT_TEST_STALL": STALL}))
    assert time.monotonic() - t0 > 3
    assert "waiting for the checkpoint of step 4 to commit before exit" in res.stderr
    assert latest_checkpoint(out / "checkpoints").name == "step-00000004"
    (save,) = [r for r in records(out) if r.get("event") == "checkpoint"]
    assert save["total_s"] >= 3 > save["blocked_s"]


def test_stalled_background_save_trips_the_watchdog(embedded_data, tmp_path):  # noqa: F811
    out = tmp_path / "stall"
    res = run_pretrain(out, embedded_data, "--max_steps", "8", "--save_steps", "2", "--save_mode", "async",
                       "--save_timeout_minutes", "0.05", env={"GENESIS_CKPT_TEST_STALL": "hashing files:60"},
                       timeout=120)
    assert res.returncode != 0
    assert "checkpoint async save of step 2 exceeded its 3 s deadline in phase 'hashing files'" in res.stderr
    assert latest_checkpoint(out / "checkpoints") is None  # nothing half-made was committed


def test_short_host_memory_falls_back_to_sync_and_says_so(embedded_data, tmp_path):  # noqa: F811
    out = tmp_path / "short"
    res = ok(run_pretrain(out, embedded_data, "--max_steps", "2", "--save_steps", "2", "--save_mode", "async",
                          nproc=1, env={"GENESIS_TEST_HOST_MEMORY_BYTES": "1000"}))
    assert "save_mode async -> sync: async staging needs" in res.stderr and "0.00 GiB is available" in res.stderr
    plan = next(r for r in records(out) if r.get("event") == "checkpoint_plan")
    assert (plan["requested"], plan["mode"], plan["available_bytes"]) == ("async", "sync", 1000)
    assert plan["need_bytes"] > 1000 and "saving synchronously" in plan["reason"]
    (save,) = [r for r in records(out) if r.get("event") == "checkpoint"]
    assert save["mode"] == "sync"


def test_the_staged_state_is_the_state_of_the_step(tmp_path, monkeypatch):
    """In one process: the optimizer keeps stepping while the save is written (a 2 s stall in the
    background), and what is committed is the state at the save, not the state at the write."""
    from training.checkpoint import load_checkpoint
    from training.checkpoint.async_save import Checkpointer

    monkeypatch.setenv("GENESIS_CKPT_TEST_STALL", "writing model and optimizer shards:2")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)

    def step():
        model(torch.randn(4, 8)).square().mean().backward()
        opt.step()
        sched.step()
        opt.zero_grad()

    step()
    ck = Checkpointer(tmp_path, mode="async", keep_last=2, timeout_s=60)
    blocked = ck.save(1, model=model, optimizer=opt, scheduler=sched, train_state={"step": 1},
                      data_state={"pos": 1}, meta={"m": 1})
    at_save = {k: v.clone() for k, v in model.state_dict().items()}
    moments = {k: v["exp_avg"].clone() for k, v in opt.state_dict()["state"].items()}
    assert blocked < 2
    for _ in range(3):
        step()  # while the background thread sleeps before writing
    ck.close()
    (rec,) = ck.records()
    assert rec["step"] == 1 and rec["total_s"] >= 2 > rec["blocked_s"]

    fresh = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4))
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=0.1)
    fresh_sched = torch.optim.lr_scheduler.LambdaLR(fresh_opt, lambda s: 1.0)
    state = load_checkpoint(tmp_path / "step-00000001", model=fresh, optimizer=fresh_opt, scheduler=fresh_sched)
    assert state["train_state"] == {"step": 1}
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, at_save[k]), k
        assert not torch.equal(v, model.state_dict()[k]), f"{k}: the later steps should have moved it"
    for k, v in fresh_opt.state_dict()["state"].items():
        assert torch.equal(v["exp_avg"], moments[k])
    assert fresh_sched.last_epoch == 1


def test_save_mode_is_checked(tmp_path):
    from training.args import ConfigError, parse_args

    recipe = tmp_path / "r.yaml"
    recipe.write_text("save_mode: background\n")
    with pytest.raises(ConfigError, match="save_mode.*sync.*async"):
        parse_args(["--config", str(recipe)])
    from training.checkpoint.async_save import Checkpointer

    with pytest.raises(ValueError, match="save_mode must be one of sync, async, got 'later'"):
        Checkpointer(tmp_path, mode="later")
