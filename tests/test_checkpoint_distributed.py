"""Checkpoints across processes: FSDP2 on 2 gloo ranks, SIGKILL during a save, the watchdog.

RELIABILITY.md rows 1 (checkpoint half), 2, 3, 5 (for saves) and 10. Each test starts fresh
`python` processes (tests/_dist.py) with a hard timeout. The functions without a `test_` prefix run
inside those processes as fn(rank, world_size, **kwargs).
"""

from __future__ import annotations

import os
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch
from _checkpoint_fixtures import assert_same, build, seed_all, snapshot, train_steps
from _dist import run_ranks, start_ranks

from training.checkpoint import (
    WATCHDOG_EXIT_CODE,
    CheckpointError,
    latest_checkpoint,
    load_checkpoint,
    load_model_weights,
    save_checkpoint,
)
from training.checkpoint.layout import committed, leftovers

pytestmark = pytest.mark.distributed
META = {"seq_len": 16, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 1}


# ------------------------------------------------------------------ run inside the rank processes


def fsdp_train_save(rank: int, world: int, root: str, out: str) -> dict:
    """Train 3 steps, save, train 3 more (the 'straight' run); snapshot the final state."""
    model, opt, sched = build(seed=0, shard=True)
    seed_all(100 + rank)
    train_steps(model, opt, sched, 3)
    full = {n: p.full_tensor() for n, p in model.named_parameters()}  # a test-only gather, for export
    if rank == 0:
        torch.save(full, Path(out) / "full-step3.pt")
    path = save_checkpoint(
        root, 3, model=model, optimizer=opt, scheduler=sched, train_state={"step": 3, "tokens": 3 * 64},
        data_state={"rank": rank, "cursor": 30 + rank}, meta=META,
    )  # fmt: skip
    after = train_steps(model, opt, sched, 3)
    torch.save(snapshot(model, opt), Path(out) / f"straight-{rank}.pt")
    return {"path": str(path), "after": after}


def fsdp_load_train(rank: int, world: int, path: str, out: str) -> dict:
    """Fresh processes, other init and RNG: load, then the same 3 steps as the straight run."""
    model, opt, sched = build(seed=1, shard=True)
    seed_all(999)
    state = load_checkpoint(path, model=model, optimizer=opt, scheduler=sched)
    after = train_steps(model, opt, sched, 3)
    torch.save(snapshot(model, opt), Path(out) / f"resumed-{rank}.pt")
    return {"after": after, "data_state": state["data_state"], "audit": state["audit"]}


def ddp_round_trip(rank: int, world: int, root: str) -> dict:
    """DDP (what Accelerate uses on CPU): save, continue 2 steps; fresh replicas load and match."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.nn.parallel import DistributedDataParallel as DDP

    model, opt, sched = build(seed=0, genesis=False)
    ddp = DDP(model)
    seed_all(50 + rank)
    train_steps(ddp, opt, sched, 2)
    path = save_checkpoint(root, 2, model=ddp, optimizer=opt, scheduler=sched, train_state={"step": 2},
                           data_state={"rank": rank}, meta=META)  # fmt: skip
    after, final = train_steps(ddp, opt, sched, 2), snapshot(model, opt)
    model2, opt2, sched2 = build(seed=3, genesis=False)
    ddp2 = DDP(model2)
    seed_all(0)
    state = load_checkpoint(path, model=ddp2, optimizer=opt2, scheduler=sched2)
    assert train_steps(ddp2, opt2, sched2, 2) == after
    assert_same(final, snapshot(model2, opt2))
    keys = list(FileSystemReader(path / "model").read_metadata().state_dict_metadata)
    return {"data_state": state["data_state"], "keys": keys}


def ac_layout_round_trip(rank: int, world: int, root: str, save_ac: str, load_ac: str) -> dict:
    """Save with activation checkpointing wrapped one way around the FSDP units, resume with it
    wrapped the other way (what an Accelerate upgrade in the middle of a run does)."""
    from torch.distributed.checkpoint import FileSystemReader

    model, opt, sched = build(seed=0, shard=True, ac=save_ac)
    seed_all(100 + rank)
    train_steps(model, opt, sched, 2)
    path = save_checkpoint(root, 2, model=model, optimizer=opt, scheduler=sched, train_state={"step": 2},
                           data_state={"rank": rank}, meta=META)  # fmt: skip
    after, final = train_steps(model, opt, sched, 2), snapshot(model, opt)
    model2, opt2, sched2 = build(seed=1, shard=True, ac=load_ac)
    seed_all(0)
    load_checkpoint(path, model=model2, optimizer=opt2, scheduler=sched2)
    resumed = train_steps(model2, opt2, sched2, 2)
    assert resumed == after, (resumed, after)
    assert_same(final, snapshot(model2, opt2))
    keys = [*FileSystemReader(path / "model").read_metadata().state_dict_metadata,
            *FileSystemReader(path / "optimizer").read_metadata().state_dict_metadata]
    return {"keys": keys}


def fsdp_load_refused(rank: int, world: int, path: str) -> None:
    """Load must raise; weights must be untouched; then re-raise so the process exits non-zero."""
    model, opt, sched = build(seed=1, shard=True)
    before = snapshot(model, opt)
    try:
        load_checkpoint(path, model=model, optimizer=opt, scheduler=sched)
    except CheckpointError:
        assert_same(before, snapshot(model, opt))
        raise
    raise AssertionError("load_checkpoint accepted a checkpoint without optimizer state")


def save_then_stall(rank: int, world: int, root: str, stall: str, marker: str, timeout_s: float = 600) -> None:
    """Commit steps 1 and 2, then stall (to be SIGKILLed, or to trip the watchdog) inside step 3's save."""
    model, opt, sched = build(seed=0, shard=world > 1, genesis=False)
    seed_all(7 + rank)
    for step in (1, 2, 3):
        if step == 3:
            os.environ["GENESIS_CKPT_TEST_STALL"] = stall
            os.environ["GENESIS_CKPT_TEST_MARKER"] = marker
        train_steps(model, opt, sched, 1)
        save_checkpoint(
            root, step, model=model, optimizer=opt, scheduler=sched, train_state={"step": step},
            data_state={"cursor": step}, meta=META, timeout_s=timeout_s,
        )  # fmt: skip


def save_on_rank0_only(rank: int, world: int, root: str, timeout_s: float) -> None:
    """The misuse behind accelerate #2000: only rank 0 saves. Rank 1 idles, then leaves."""
    model, opt, sched = build(seed=0, genesis=False)
    if rank == 0:
        save_checkpoint(root, 1, model=model, optimizer=opt, scheduler=sched, train_state={},
                        data_state={}, meta=META, timeout_s=timeout_s)  # fmt: skip
    else:
        time.sleep(timeout_s + 3)


# ------------------------------------------------------------------ tests


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    res = run_ranks(
        "test_checkpoint_distributed:fsdp_train_save", 2,
        kwargs={"root": str(out / "checkpoints"), "out": str(out)}, result_dir=out / "r1", timeout=150,
    )  # fmt: skip
    for r in res:
        assert r.returncode == 0, f"rank {r.rank} failed:\n{r.stderr[-4000:]}"
    return out, res


def test_fsdp_resume_is_exact(fsdp_run):
    out, straight = fsdp_run
    path = straight[0].value["path"]
    resumed = run_ranks(
        "test_checkpoint_distributed:fsdp_load_train", 2,
        kwargs={"path": path, "out": str(out)}, result_dir=out / "r2", timeout=150,
    )  # fmt: skip
    for s, r in zip(straight, resumed):
        assert r.returncode == 0, f"rank {r.rank} failed:\n{r.stderr[-4000:]}"
        assert r.value["after"] == s.value["after"], "per-step losses after the resume differ"
        assert r.value["data_state"] == {"rank": r.rank, "cursor": 30 + r.rank}
        groups = r.value["audit"]["optimizer_groups"]
        assert groups[0]["step_min"] == groups[0]["step_max"] == 3.0
        a = torch.load(out / f"straight-{r.rank}.pt", weights_only=True)
        b = torch.load(out / f"resumed-{r.rank}.pt", weights_only=True)
        assert any(k.endswith("exp_avg_sq") for k in a)
        assert_same(a, b)


@pytest.mark.parametrize("save_ac,load_ac", [("before", "after"), ("after", "before")])
def test_resume_across_activation_checkpointing_layouts(tmp_path, save_ac, load_ac):
    """Accelerate 1.15 sharded each decoder layer and wrapped it for activation checkpointing;
    1.16 wraps first and shards the wrapper. Checkpoint keys are the plain HF names either way,
    so a run that upgrades Accelerate mid-way resumes exactly (weights, AdamW moments, losses)."""
    res = run_ranks("test_checkpoint_distributed:ac_layout_round_trip", 2,
                    kwargs={"root": str(tmp_path / "ck"), "save_ac": save_ac, "load_ac": load_ac},
                    result_dir=tmp_path / "r", timeout=150)  # fmt: skip
    for r in res:
        assert r.returncode == 0, f"rank {r.rank} failed:\n{r.stderr[-4000:]}"
    keys = res[0].value["keys"]
    assert "model.layers.0.self_attn.q_proj.weight" in keys
    assert not any("_checkpoint_wrapped_module" in k or "_fsdp" in k for k in keys), keys


def test_fsdp_checkpoint_exports_and_reshards_to_one_process(fsdp_run):
    """The 2-rank sharded checkpoint loads into a plain module (export) and, with the explicit
    reset_rng_and_data flag only, resumes in 1 process (model and AdamW state resharded)."""
    out, straight = fsdp_run
    path = Path(straight[0].value["path"])
    full = torch.load(out / "full-step3.pt", weights_only=True)
    plain, _, _ = build(seed=8)
    meta = load_model_weights(path, plain)
    assert meta["world_size"] == 2 and meta["step"] == 3
    assert_same(full, dict(plain.named_parameters()))
    model, opt, sched = build(seed=8)
    with pytest.raises(CheckpointError, match="saved by 2 ranks, this run has 1"):
        load_checkpoint(path, model=model, optimizer=opt, scheduler=sched)
    state = load_checkpoint(path, model=model, optimizer=opt, scheduler=sched, reset_rng_and_data=True)
    assert state["data_state"] is None and state["audit"]["rng"].startswith("RESET")
    assert state["audit"]["optimizer_groups"][0]["step_max"] == 3.0
    assert_same(full, dict(model.named_parameters()))


def test_ddp_resume_is_exact(tmp_path):
    res = run_ranks("test_checkpoint_distributed:ddp_round_trip", 2, kwargs={"root": str(tmp_path / "c")},
                    result_dir=tmp_path / "r", timeout=120)  # fmt: skip
    for r in res:
        assert r.returncode == 0, f"rank {r.rank} failed:\n{r.stderr[-4000:]}"
        assert r.value["data_state"] == {"rank": r.rank}
        assert r.value["keys"] and not any(k.startswith("module.") for k in r.value["keys"])


def test_fsdp_every_rank_writes_its_own_shard(fsdp_run):
    out, straight = fsdp_run
    ckpt = Path(straight[0].value["path"])
    for part in ("model", "optimizer"):
        sizes = {r: (ckpt / part / f"__{r}_0.distcp").stat().st_size for r in range(2)}
        # a full-state gather would put (nearly) everything in rank 0's file
        assert min(sizes.values()) > 0.35 * sum(sizes.values()), (part, sizes)
    assert sorted(p.name for p in (ckpt / "rng").iterdir()) == ["rank-00000.json", "rank-00001.json"]
    assert sorted(p.name for p in (ckpt / "data").iterdir()) == ["rank-00000.json", "rank-00001.json"]


def test_fsdp_missing_optimizer_refused_on_every_rank(fsdp_run, tmp_path):
    out, straight = fsdp_run
    broken = tmp_path / "step-00000003"
    shutil.copytree(straight[0].value["path"], broken)
    shutil.rmtree(broken / "optimizer")
    res = run_ranks(
        "test_checkpoint_distributed:fsdp_load_refused", 2, kwargs={"path": str(broken)},
        result_dir=tmp_path / "r", timeout=120,
    )  # fmt: skip
    for r in res:
        assert r.returncode not in (0, None), f"rank {r.rank} exited {r.returncode}"
        assert "optimizer state missing from" in r.stderr and str(broken) in r.stderr, r.stderr[-3000:]


def _wait_for(marker: Path, ranks, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while not marker.exists():
        if any(p.poll() is not None for p in ranks.procs):
            res = ranks.wait(5)
            pytest.fail(f"save process ended before the stall point:\n{res[0].stderr[-4000:]}")
        if time.monotonic() > deadline:
            ranks.kill()
            pytest.fail("stall point never reached")
        time.sleep(0.1)


@pytest.mark.parametrize(
    "phase, expect_latest, expect_steps",
    [
        ("writing model and optimizer shards", 2, [1, 2]),  # row 3: before shards are written
        ("barrier before commit", 2, [1, 2]),  # row 3: after shards and hashes, before the manifest
        ("pruning", 3, [1, 2, 3]),  # row 10: committed, not yet pruned
        ("deleting pruned checkpoint", 3, [2, 3]),  # row 10: killed mid-delete of step 1
    ],
)
def test_sigkill_during_save(tmp_path, phase, expect_latest, expect_steps):
    root, marker = tmp_path / "ckpt", tmp_path / "marker"
    ranks = start_ranks(
        "test_checkpoint_distributed:save_then_stall", 1,
        kwargs={"root": str(root), "stall": f"{phase}:300", "marker": str(marker)}, result_dir=tmp_path / "r",
    )  # fmt: skip
    _wait_for(marker, ranks)
    ranks.kill(signal.SIGKILL)
    assert ranks.wait(30)[0].returncode == -signal.SIGKILL
    assert [s for s, _ in committed(root)] == expect_steps
    if expect_latest == 2:
        assert leftovers(root), "the killed save left no temporary folder (test did not hit the save)"
    latest = latest_checkpoint(root)
    assert latest is not None and latest.name == f"step-{expect_latest:08d}"

    model, opt, sched = build(seed=5, genesis=False)
    state = load_checkpoint(latest, model=model, optimizer=opt, scheduler=sched)
    assert state["train_state"] == {"step": expect_latest}
    # the next save clears the leftovers and commits normally
    train_steps(model, opt, sched, 1)
    save_checkpoint(root, 4, model=model, optimizer=opt, scheduler=sched, train_state={"step": 4},
                    data_state={}, meta=META)  # fmt: skip
    assert not leftovers(root)
    assert [s for s, _ in committed(root)] == [expect_latest, 4]


def test_watchdog_ends_a_stalled_save(tmp_path):
    """Row 5 for saves: rank 1 stalls before the commit; both ranks end non-zero, promptly."""
    timeout_s = 6.0
    started = time.monotonic()
    res = run_ranks(
        "test_checkpoint_distributed:save_then_stall", 2,
        kwargs={"root": str(tmp_path / "ckpt"), "stall": "barrier before commit:300:1",
                "marker": str(tmp_path / "m"), "timeout_s": timeout_s},
        result_dir=tmp_path / "r", timeout=120,
    )  # fmt: skip
    wall = time.monotonic() - started
    assert wall < 90, f"took {wall:.0f} s: the stalled rank was not stopped by its watchdog"
    stalled = res[1]
    assert stalled.returncode == WATCHDOG_EXIT_CODE, stalled.stderr[-3000:]
    assert "step 3" in stalled.stderr and "phase 'barrier before commit'" in stalled.stderr
    assert "Thread" in stalled.stderr  # faulthandler's stack dump
    assert res[0].returncode not in (0, None)
    assert "barrier before commit" in res[0].stderr, res[0].stderr[-3000:]
    assert [s for s, _ in committed(tmp_path / "ckpt")] == [1, 2]


def test_save_on_one_rank_only_fails_fast_and_clearly(tmp_path):
    res = run_ranks("test_checkpoint_distributed:save_on_rank0_only", 2,
                    kwargs={"root": str(tmp_path / "c"), "timeout_s": 5.0}, result_dir=tmp_path / "r",
                    timeout=90)  # fmt: skip
    assert res[0].returncode not in (0, None)
    assert "waiting for every rank to call save" in res[0].stderr and "every rank must call it" in res[0].stderr
    assert latest_checkpoint(tmp_path / "c") is None


def test_a_rank_killed_mid_save_does_not_hang_the_others(tmp_path):
    """Rank 1 is SIGKILLed while writing its state; rank 0 must fail promptly (not wait for a
    30-minute collective timeout), and the partial save is never picked."""
    root, marker = tmp_path / "ckpt", tmp_path / "marker"
    ranks = start_ranks(
        "test_checkpoint_distributed:save_then_stall", 2,
        kwargs={"root": str(root), "stall": "writing per-rank state:300:1", "marker": str(marker)},
        result_dir=tmp_path / "r",
    )  # fmt: skip
    _wait_for(marker, ranks)
    killed_at = time.monotonic()
    os.killpg(ranks.procs[1].pid, signal.SIGKILL)
    res = ranks.wait(90)
    assert time.monotonic() - killed_at < 60
    assert res[1].returncode == -signal.SIGKILL
    assert res[0].returncode not in (0, None)
    assert "saving step 3" in res[0].stderr and "writing per-rank state" in res[0].stderr, res[0].stderr[-3000:]
    assert [s for s, _ in committed(root)] == [1, 2]
    assert latest_checkpoint(root).name == "step-00000002"
