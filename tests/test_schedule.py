"""The LR schedule: shape, the scheduler wrapper, and the documented extension rule (row 8)."""

from __future__ import annotations

import math

import pytest
import torch

from training.schedule import LRSchedule, cli_main, lr_at, make_scheduler, set_schedule

SEED = LRSchedule(max_lr=1.0e-4, min_lr=1.0e-5, warmup_steps=1000, max_steps=40000)


def test_cosine_shape_matches_the_seed():
    assert SEED.lr(0) == pytest.approx(1e-7)  # first update: 1/1000 of the peak
    assert SEED.lr(999) == pytest.approx(1e-4)
    assert SEED.lr(1000) == pytest.approx(1e-4)
    assert SEED.lr(20500) == pytest.approx(5.5e-5)  # cosine midpoint = (max + min) / 2
    assert SEED.lr(40000) == pytest.approx(1e-5) and SEED.lr(90000) == pytest.approx(1e-5)
    lrs = [SEED.lr(s) for s in range(1000, 40001, 97)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:])), "decay must be monotone"
    assert lr_at(123, max_lr=1e-4, min_lr=1e-5, warmup_steps=1000, max_steps=40000) == SEED.lr(123)


def test_wsd_is_warmup_stable_decay():
    s = LRSchedule(1e-3, 1e-4, 10, 100, kind="wsd", decay_ratio=0.2)
    assert s.decay_start == 80
    assert s.lr(50) == s.lr(79) == 1e-3
    assert s.lr(90) == pytest.approx(1e-3 + (1e-4 - 1e-3) * 0.5)
    assert s.lr(100) == pytest.approx(1e-4)
    with pytest.raises(ValueError, match="lr_scheduler_type"):
        LRSchedule(1e-3, 1e-4, 10, 100, kind="linear")


def test_scheduler_follows_the_pure_function_and_restores():
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([p], lr=1.0)
    s = LRSchedule(1e-3, 1e-4, 5, 20)
    sched = make_scheduler(opt, s)
    seen = []
    for _ in range(12):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([s.lr(k) for k in range(12)], rel=1e-12)
    state = sched.state_dict()
    assert "holder" not in str(state), "the schedule object must not leak into the scheduler state"
    # A fresh optimizer + scheduler restored from the state gives the same next LR.
    opt2 = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=1.0)
    sched2 = make_scheduler(opt2, s)
    sched2.load_state_dict(state)
    opt2.param_groups[0]["lr"] = sched2.get_last_lr()[0]
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"] == pytest.approx(s.lr(12))
    opt2.step()
    sched2.step()
    assert opt2.param_groups[0]["lr"] == pytest.approx(s.lr(13), rel=1e-12)


def test_extension_rule_seed_20k_to_40k():
    run = LRSchedule(1.0e-4, 1.0e-5, 1000, 20000)
    # During the decay: re-laid from the LR the run would have used, continuous, ends at the floor.
    ext = run.extended(15000, 40000)
    assert ext.anchor_step == 15000 and ext.lr(15000) == pytest.approx(run.lr(15000))
    assert ext.lr(40000) == pytest.approx(1e-5)
    lrs = [ext.lr(s) for s in range(15000, 40001, 50)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    # Never a jump: a naively stretched cosine would go back UP at the resume step.
    stretched = LRSchedule(1.0e-4, 1.0e-5, 1000, 40000)
    assert stretched.lr(15000) > 1.5 * run.lr(15000)
    # A finished run continues at its floor, unless a re-warm LR is given deliberately.
    assert run.extended(20000, 40000).lr(30000) == pytest.approx(1e-5)
    rewarm = run.extended(20000, 40000, start_lr=5e-5)
    assert rewarm.lr(20000) == pytest.approx(5e-5) and rewarm.lr(40000) == pytest.approx(1e-5)
    # Still in warmup: nothing depends on max_steps yet, the same schedule with the new end.
    early = run.extended(500, 40000)
    assert early.anchor_step is None and early == stretched
    with pytest.raises(ValueError, match="max_steps > 20000"):
        run.extended(20000, 20000)
    # The schedule round-trips through the JSON train state.
    assert LRSchedule.from_dict(ext.to_dict()) == ext


def test_set_schedule_swaps_and_sets_the_lr():
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=1.0)
    run = LRSchedule(1e-3, 1e-4, 5, 20)
    sched = make_scheduler(opt, run)
    for _ in range(15):
        opt.step()
        sched.step()
    ext = run.extended(15, 40)
    set_schedule(sched, ext, 15)
    assert opt.param_groups[0]["lr"] == pytest.approx(run.lr(15))
    opt.step()
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(ext.lr(16), rel=1e-12)
    assert not math.isclose(ext.lr(16), run.lr(16))


def test_cli_prints_and_plots(tmp_path, capsys):
    png = tmp_path / "lr.png"
    assert cli_main(["--config", "training/recipes/genesis-1b.yaml", "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "warmup 1000, max_steps 40000" in out and "1.0000e-05" in out and png.stat().st_size > 1000
    assert cli_main(["--config", "training/recipes/genesis-1b.yaml", "--max-steps", "20000",
                     "--extend-at", "15000", "--extend-to", "40000"]) == 0
    assert "re-laid from step 15000" in capsys.readouterr().out
