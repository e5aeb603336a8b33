"""RELIABILITY.md rows 2, 7, 8 (extension) and 9 on the REAL script (2 gloo ranks unless noted)."""

from __future__ import annotations

import shutil

import pytest
import torch
from _pretrain_fixtures import embedded_data  # noqa: F401  (fixture)
from _pretrain_run import checkpoint_tensors, ok, read_metrics, run_pretrain

from training.schedule import LRSchedule

pytestmark = pytest.mark.distributed

N = 4
ARGS = ("--save_steps", "2", "--logging_steps", "1", "--resume", "auto")


@pytest.fixture(scope="module")
def base(tmp_path_factory, embedded_data):  # noqa: F811
    out = tmp_path_factory.mktemp("base")
    ok(run_pretrain(out, embedded_data, "--max_steps", str(N), *ARGS))
    return out


def copy_run(base, dst):
    """The base run's checkpoints only (no metrics), so anything new in dst was written by the resume."""
    shutil.copytree(base / "checkpoints", dst / "checkpoints")
    return dst


def test_missing_optimizer_state_is_refused(base, embedded_data, tmp_path):  # noqa: F811
    out = copy_run(base, tmp_path / "run")
    shutil.rmtree(out / "checkpoints" / f"step-{N:08d}" / "optimizer")
    res = run_pretrain(out, embedded_data, "--max_steps", str(N + 2), *ARGS)
    assert res.returncode != 0
    assert "optimizer" in res.stderr and f"step-{N:08d}" in res.stderr
    assert not read_metrics(out), "nothing may train after a refused resume"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [f"step-{N - 2:08d}", f"step-{N:08d}"]


@pytest.mark.parametrize("change, field", [
    (("--seq_len", "32"), "seq_len"),
    pytest.param(("--gradient_accumulation_steps", "1"), "gradient_accumulation_steps", marks=pytest.mark.slow),
])
def test_other_geometry_is_refused(base, embedded_data, tmp_path, change, field):  # noqa: F811
    out = copy_run(base, tmp_path / "run")
    res = run_pretrain(out, embedded_data, "--max_steps", str(N + 2), *ARGS, *change)
    assert res.returncode != 0 and field in res.stderr and "overrides" in res.stderr
    assert not read_metrics(out)


def test_other_world_size_is_refused(base, embedded_data, tmp_path):  # noqa: F811
    out = copy_run(base, tmp_path / "run")
    res = run_pretrain(out, embedded_data, "--max_steps", str(N + 1), *ARGS, nproc=1)
    assert res.returncode != 0 and "world_size" in res.stderr and not read_metrics(out)
    assert "pass --overrides tokens_per_step,world_size" in res.stderr  # a flag that exists, with real names
    # With the override (here the tokens per step halve too, deliberately): resharded, merged, logged.
    res = ok(run_pretrain(out, embedded_data, "--max_steps", str(N + 1), *ARGS,
                          "--overrides", "world_size,tokens_per_step", nproc=1))
    assert "resume override: world_size" in res.stderr and "RE-DERIVED from (seed" in res.stdout
    assert list(read_metrics(out)) == [N + 1]


def test_override_is_accepted_and_logged(base, embedded_data, tmp_path):  # noqa: F811
    # Same tokens per step, other split: micro-batch 1 x accumulation 4 instead of 2 x 2.
    out = copy_run(base, tmp_path / "run")
    change = ("--per_device_train_batch_size", "1", "--gradient_accumulation_steps", "4")
    res = run_pretrain(out, embedded_data, "--max_steps", str(N + 1), *ARGS, *change)
    assert res.returncode != 0 and "per_device_train_batch_size" in res.stderr and not read_metrics(out)
    res = ok(run_pretrain(out, embedded_data, "--max_steps", str(N + 1), *ARGS, *change, "--overrides",
                          "per_device_train_batch_size,gradient_accumulation_steps"))
    assert "resume override: per_device_train_batch_size" in res.stderr
    assert "overrides_used: ['per_device_train_batch_size', 'gradient_accumulation_steps']" in res.stdout
    assert list(read_metrics(out)) == [N + 1]


def test_extension_follows_the_documented_rule(base, embedded_data, tmp_path):  # noqa: F811
    # Row 8: 4 -> 8 steps. debug.yaml: warmup 5, so step 4 is still in warmup and the rule says
    # "same schedule, new max_steps"; LR(k+1) equals what a straight 8-step run would use.
    out = copy_run(base, tmp_path / "run")
    res = ok(run_pretrain(out, embedded_data, "--max_steps", "8", *ARGS))
    assert "EXTENDED: max_steps 4 -> 8 at step 4" in res.stdout
    expected = LRSchedule(1.0e-3, 1.0e-4, 5, 4).extended(4, 8)
    got = read_metrics(out)
    for step in range(5, 9):
        assert got[step]["lr"] == pytest.approx(expected.lr(step - 1), rel=1e-12)
    # A second extension after the decay began re-lays the cosine from the LR the run had.
    res = ok(run_pretrain(out, embedded_data, "--max_steps", "10", *ARGS))
    assert "decay re-laid from LR" in res.stdout
    again = expected.extended(8, 10)
    assert again.anchor_step == 8 and again.anchor_lr == expected.lr(8)
    got = read_metrics(out)
    assert got[9]["lr"] == pytest.approx(again.lr(8), rel=1e-12)
    assert got[10]["lr"] == pytest.approx(again.lr(9), rel=1e-12)


def test_nan_on_one_rank_stops_without_a_poisoned_checkpoint(embedded_data, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    res = run_pretrain(out, embedded_data, "--max_steps", "6", *ARGS, env={"GENESIS_TEST_FAULTS": "nan@3:1"})
    assert res.returncode != 0
    assert "step 3: non-finite loss or gradients" in res.stderr and "policy stop" in res.stderr
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000002"]
    assert read_metrics(out)[3]["event"] == "stopped"


def test_skip_policy_skips_nan_and_spike_steps(embedded_data, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    # Saves by wall time only (a tiny save_minutes: every step), decided on rank 0 for both ranks.
    res = ok(run_pretrain(out, embedded_data, "--max_steps", "7", "--save_steps", "0", "--save_minutes", "0.0001",
                          "--logging_steps", "1",
                          "--spike_policy", "skip", "--spike_window", "4",
                          env={"GENESIS_TEST_FAULTS": "nan@3:1,spike@6"}))
    assert "policy skip" in res.stderr
    m = read_metrics(out)
    assert m[3]["skipped"] and "non-finite" in m[3]["problem"]
    assert m[6]["skipped"] and "spike" in m[6]["problem"]
    assert not any(m[s].get("skipped") for s in (1, 2, 4, 5, 7))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000006", "step-00000007"]
    tensors = checkpoint_tensors(out / "checkpoints" / "step-00000007")
    steps = {v.item() for k, v in tensors.items() if k.endswith(".step")}
    assert steps == {5.0}, f"AdamW took {steps} steps; 7 minus the 2 skipped expected"
    assert all(torch.isfinite(v).all() for v in tensors.values() if isinstance(v, torch.Tensor))


def test_secrets_never_reach_logs_wandb_or_checkpoints(embedded_data, tmp_path):  # noqa: F811
    # Row 13, one process with wandb (offline: WANDB_MODE=offline is set by conftest).
    sentinel = {"HF_TOKEN": "hf_SENTINELsentinel0123456789", "WANDB_API_KEY": "SENTINEL" + "0" * 32}
    out = tmp_path / "run"
    res = ok(run_pretrain(out, embedded_data, "--max_steps", "2", *ARGS, "--report_to", "wandb", nproc=1,
                          env=sentinel | {"WANDB_MODE": "offline"}))
    assert (out / "wandb").is_dir()
    for value in sentinel.values():
        assert value not in res.stdout + res.stderr
        for f in out.rglob("*"):
            if f.is_file():
                assert value.encode() not in f.read_bytes(), f"{value[:12]}... found in {f}"
