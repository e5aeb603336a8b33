"""pretrain.py --deterministic reaches torch, and the GPU check's resume rule: step 11's loss
bit-equal, later steps within a tolerance (flash-attention's backward is not deterministic on CUDA
by default, so a correct resume repeats the later steps only to rounding there)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _pretrain_fixtures import embedded_data  # noqa: E402,F401  (fixture)
from _pretrain_run import ok, read_metrics, run_pretrain  # noqa: E402


def test_the_flag_reaches_torch_inside_a_pretrain_run(tmp_path, embedded_data):  # noqa: F811
    res = ok(run_pretrain(tmp_path / "run", embedded_data, "--max_steps", "2", "--save_steps", "0",
                          "--deterministic", nproc=1, env={"CUBLAS_WORKSPACE_CONFIG": ""}))
    # Logged after the switch, from torch itself, before the first step.
    assert ("deterministic: True (torch.are_deterministic_algorithms_enabled()=True, "
            "CUBLAS_WORKSPACE_CONFIG=:4096:8, cudnn.deterministic=True)") in res.stderr, res.stderr[-3000:]
    assert sorted(read_metrics(tmp_path / "run")) == [1, 2]


def test_off_by_default_and_said_so():
    from training.args import parse_args
    from training.run_setup import apply_determinism

    args = parse_args(["--config", "training/recipes/debug.yaml"])
    assert args.deterministic is False
    assert apply_determinism(args).startswith("deterministic: False (torch.are_deterministic_algorithms_enabled()=False")
    assert not torch.are_deterministic_algorithms_enabled()


def _run(losses, grads, first=11):
    return {first + i: {"loss": loss, "grad_norm": g} for i, (loss, g) in enumerate(zip(losses, grads))}


STRAIGHT = _run([5.0 + 0.1 * i for i in range(10)], [2.0 - 0.05 * i for i in range(10)])


def _resumed(changes: dict | None = None):
    out = {s: dict(r) for s, r in STRAIGHT.items()}
    for (step, key), value in (changes or {}).items():
        out[step][key] = value
    return out


def _compare(resumed, **kw):
    from benchmarks._gpu_rules import compare_resume

    return compare_resume(STRAIGHT, resumed, range(11, 21), **kw)


def test_identical_runs_pass_and_are_bit_exact():
    check = _compare(_resumed())
    assert check.ok and check.exact and check.worst_loss == 0.0 and check.problems == []


def test_a_late_tiny_difference_passes_but_is_not_bit_exact():
    # What flash-attention's backward does: the first step's loss equal, the rest off by rounding.
    check = _compare(_resumed({(11, "grad_norm"): 2.0 * (1 + 3e-5), (15, "loss"): 5.4 * (1 + 2e-6),
                                 (20, "grad_norm"): 1.55 * (1 + 1e-3)}))
    assert check.ok and not check.exact, check.problems
    assert 0 < check.worst_loss < 1e-5 and check.worst_grad > 5e-4


def test_any_first_step_loss_difference_fails():
    check = _compare(_resumed({(11, "loss"): math.nextafter(5.0, 6.0)}))
    assert not check.ok and check.problems[0].startswith("step 11: loss 5.0 != 5.000000000000001")


def test_a_big_late_difference_fails():
    check = _compare(_resumed({(16, "loss"): 5.5 * 1.01}))
    assert not check.ok and check.problems == ["step 16: loss differs by 0.01 relative (> 0.001)"]
    assert not _compare(_resumed({(18, "grad_norm"): 1.65 * 1.05})).ok


def test_non_finite_or_missing_steps_never_pass():
    assert not _compare(_resumed({(13, "loss"): float("nan")})).ok
    assert not _compare(_resumed({(13, "grad_norm"): float("inf")})).ok
    short = _resumed()
    del short[20]
    assert _compare(short).problems == ["steps [20] not logged by both runs"]


def test_deterministic_asks_every_step_bit_equal():
    check = _compare(_resumed({(15, "loss"): 5.4 * (1 + 2e-6)}), exact=True)
    assert not check.ok and check.problems[0].startswith("step 15: loss ")
