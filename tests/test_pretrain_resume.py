"""RELIABILITY.md rows 1, 3, 6, 8, 10 on the REAL script: `accelerate launch` with 2 gloo ranks.

One straight run of N steps is the reference. Another run is SIGKILLed three times at random
steps (a test-only hook kills every rank right after the step) and resumed with `--resume auto`
in a new process each time: its per-step losses, grad norms, LRs and consumed batches must be
bit-identical to the straight run's, and its final weights and AdamW moments torch.equal.
"""

from __future__ import annotations

import json
import random
import shutil

import pytest
from _pretrain_fixtures import embedded_data  # noqa: F401  (fixture)
from _pretrain_run import (
    assert_same_tensors,
    checkpoint_tensors,
    kill_group,
    ok,
    read_metrics,
    run_pretrain,
    start_pretrain,
    wait_for,
    wait_for_step,
)

from training.checkpoint import latest_checkpoint

pytestmark = pytest.mark.distributed

N = 8
ARGS = ("--max_steps", str(N), "--save_steps", "2", "--logging_steps", "1", "--resume", "auto")


def batch_log(out) -> dict:
    """(rank, step, micro) -> sha of the batch; the last write wins (a replayed step overwrites)."""
    log = {}
    for f in sorted((out / "batches").glob("rank-*.jsonl")):
        for line in f.read_text().splitlines():
            r = json.loads(line)
            log[(r["rank"], r["step"], r["micro"])] = r["sha"]
    return log


@pytest.fixture(scope="module")
def straight(tmp_path_factory, embedded_data):  # noqa: F811
    out = tmp_path_factory.mktemp("straight")
    ok(run_pretrain(out, embedded_data, *ARGS, env={"GENESIS_TEST_BATCH_LOG": str(out / "batches")}))
    return out


def test_kill_and_resume_three_times_is_bit_identical(straight, embedded_data, tmp_path):  # noqa: F811
    out = tmp_path / "resumed"
    kills = sorted(random.Random(0).sample(range(2, N), 3))
    env = {"GENESIS_TEST_BATCH_LOG": str(out / "batches")}
    for k in kills:
        res = run_pretrain(out, embedded_data, *ARGS, env=env | {"GENESIS_TEST_FAULTS": f"kill@{k}"})
        assert res.returncode != 0, f"the run was meant to be SIGKILLed after step {k}"
        assert max(read_metrics(out)) == k
    res = ok(run_pretrain(out, embedded_data, *ARGS, env=env))
    assert "resume audit:" in res.stdout and "optimizer: restored" in res.stdout

    a, b = read_metrics(straight), read_metrics(out)
    assert sorted(a) == sorted(b) == list(range(1, N + 1))
    for step in a:  # row 1 (losses) and row 8 (LR after every resume point)
        for key in ("loss", "grad_norm", "lr", "tokens", "tokens_by_source"):
            assert a[step][key] == b[step][key], f"step {step}: {key} {a[step][key]!r} != {b[step][key]!r}"
    # Row 6: every rank consumed exactly the straight run's batches, in the same order.
    assert batch_log(out) == batch_log(straight)
    assert len(batch_log(straight)) == N * 2 * 2  # steps x ranks x accumulation
    # ... across an epoch boundary: some source was consumed past its number of windows.
    state = json.loads((out / "checkpoints" / f"step-{N:08d}" / "data" / "rank-00000.json").read_text())
    assert any(s["consumed"] > s["n_windows"] for s in state["sources"].values()), state["sources"]
    # Row 1: final weights and AdamW moments.
    assert_same_tensors(checkpoint_tensors(straight / "checkpoints" / f"step-{N:08d}"),
                        checkpoint_tensors(out / "checkpoints" / f"step-{N:08d}"))


def test_keep_last_prunes_only_after_commit(straight):
    # Row 10: debug.yaml keeps 2; saves at 2, 4, 6, 8 leave exactly the last two, no temp folders.
    names = sorted(p.name for p in (straight / "checkpoints").iterdir())
    assert names == [f"step-{N - 2:08d}", f"step-{N:08d}"], names


def test_sigkill_during_save_never_picks_the_partial(straight, embedded_data, tmp_path):  # noqa: F811
    # Row 3: start from the straight run's step N-2, stall the save of step N after the shards
    # are written, SIGKILL every process, then resume: the partial folder is ignored.
    out = tmp_path / "killed-in-save"
    (out / "checkpoints").mkdir(parents=True)
    shutil.copytree(straight / "checkpoints" / f"step-{N - 2:08d}", out / "checkpoints" / f"step-{N - 2:08d}")
    marker = tmp_path / "in-save"
    env = {"GENESIS_CKPT_TEST_STALL": "hashing files:120", "GENESIS_CKPT_TEST_MARKER": str(marker)}
    proc = start_pretrain(out, embedded_data, *ARGS, env=env)
    wait_for(marker, proc)
    kill_group(proc)
    partial = [p.name for p in (out / "checkpoints").iterdir() if p.name.startswith(".tmp-")]
    assert partial, "the save was killed before it created its temporary folder"
    assert latest_checkpoint(out / "checkpoints").name == f"step-{N - 2:08d}"

    ok(run_pretrain(out, embedded_data, *ARGS))
    a, b = read_metrics(straight), read_metrics(out)
    for step in (N - 1, N):
        assert a[step]["loss"] == b[step]["loss"] and a[step]["lr"] == b[step]["lr"]
    assert_same_tensors(checkpoint_tensors(straight / "checkpoints" / f"step-{N:08d}"),
                        checkpoint_tensors(out / "checkpoints" / f"step-{N:08d}"))


def test_sigterm_to_the_launcher_saves_then_resume_is_bit_identical(straight, embedded_data, tmp_path):  # noqa: F811
    """Row 16: the launcher forwards SIGTERM to its ranks; they finish the step they are in, agree,
    commit a checkpoint of it and exit 75; `accelerate launch` exits 143 (128 + SIGTERM) after
    them. The same command then continues exactly as the uninterrupted run."""
    import os
    import signal

    from training.lifecycle import EXIT_STOPPED

    out = tmp_path / "stopped"
    env = {"GENESIS_TEST_BATCH_LOG": str(out / "batches")}
    proc = start_pretrain(out, embedded_data, *ARGS, env=env | {"GENESIS_TEST_FAULTS": "sleep@2", "GENESIS_TEST_SLEEP_S": "4"})
    wait_for_step(out, proc, 2)  # the ranks hold after step 2
    os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=180) == 128 + signal.SIGTERM
    stopped = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
               if json.loads(line).get("event") == "stopped_on_signal"]
    assert len(stopped) == 1 and stopped[0]["signal"] == "SIGTERM" and stopped[0]["exit_code"] == EXIT_STOPPED
    k = stopped[0]["step"]
    assert k in (2, 3) and max(read_metrics(out)) == k
    assert latest_checkpoint(out / "checkpoints").name == f"step-{k:08d}"  # committed before the exit

    res = ok(run_pretrain(out, embedded_data, *ARGS, env=env))
    assert f"step-{k:08d}" in res.stdout and "optimizer: restored" in res.stdout
    a, b = read_metrics(straight), read_metrics(out)
    assert sorted(a) == sorted(b) == list(range(1, N + 1))
    for step in a:
        for key in ("loss", "grad_norm", "lr", "tokens", "tokens_by_source"):
            assert a[step][key] == b[step][key], f"step {step}: {key} {a[step][key]!r} != {b[step][key]!r}"
    assert batch_log(out) == batch_log(straight)
    assert_same_tensors(checkpoint_tensors(straight / "checkpoints" / f"step-{N:08d}"),
                        checkpoint_tensors(out / "checkpoints" / f"step-{N:08d}"))


def windows_log(out) -> list[tuple]:
    """Every window the run's ranks consumed, as (source, epoch, offset), in no particular order."""
    return [tuple(w) for f in sorted((out / "batches").glob("rank-*.jsonl"))
            for line in f.read_text().splitlines() for w in json.loads(line)["windows"]]


def test_a_gpu_dies_the_run_goes_on_with_the_rest(straight, embedded_data, tmp_path):  # noqa: F811
    """Row 17: 2 ranks, then 1 rank with doubled accumulation (same tokens per step), then 2 again.
    No window is replayed or skipped; the losses follow the straight run's within fp32 noise (the
    same windows per step, summed in another order); per-rank RNG is re-derived and logged."""
    from collections import Counter

    out = tmp_path / "moved"
    env = {"GENESIS_TEST_BATCH_LOG": str(out / "batches")}
    over = ("--overrides", "world_size,gradient_accumulation_steps")
    res = run_pretrain(out, embedded_data, *ARGS, env=env | {"GENESIS_TEST_FAULTS": "kill@2"})
    assert res.returncode != 0 and max(read_metrics(out)) == 2
    refused = run_pretrain(out, embedded_data, *ARGS, "--gradient_accumulation_steps", "4", nproc=1)
    assert refused.returncode == 2, refused.stderr[-2000:]
    assert "pass --overrides gradient_accumulation_steps,world_size" in refused.stderr, refused.stderr[-2000:]
    res = run_pretrain(out, embedded_data, *ARGS, "--gradient_accumulation_steps", "4", *over, nproc=1,
                       env=env | {"GENESIS_TEST_FAULTS": "kill@4"})
    assert res.returncode != 0 and max(read_metrics(out)) == 4
    assert "RE-DERIVED from (seed" in res.stdout and "merged from 2 saved ranks" in res.stdout, res.stdout[-3000:]
    res = ok(run_pretrain(out, embedded_data, *ARGS, *over, env=env))
    assert "merged from 1 saved ranks" in res.stdout

    consumed, expected = Counter(windows_log(out)), Counter(windows_log(straight))
    assert max(consumed.values()) == 1, "a window was consumed twice"
    assert consumed == expected, "windows skipped or added across the world-size changes"
    a, b = read_metrics(straight), read_metrics(out)
    assert sorted(a) == sorted(b) == list(range(1, N + 1))
    for step in a:
        assert b[step]["loss"] == pytest.approx(a[step]["loss"], rel=1e-5), step
        assert b[step]["lr"] == a[step]["lr"] and b[step]["tokens"] == a[step]["tokens"]
        assert b[step]["tokens_by_source"] == a[step]["tokens_by_source"], step
