"""Session fixtures for the inspection tests: one REAL tiny pretraining run with everything the
tools read, made by the real script (tests/_pretrain_run.py) on the tiny mixture.

    inspect_run:    launch 1 trains steps 1-4 (checkpoints at 2 and 4), launch 2 resumes from 4 with
                    max_steps 6 (an extension; checkpoint at 6). metrics.jsonl with val_loss every 2
                    steps, wandb offline (one run-*.wandb per launch), 3 committed checkpoints.
    inspect_export: step 6 exported with `genesis export` (bf16 safetensors + tokenizer).
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from _pretrain_fixtures import embedded_data  # noqa: F401  (fixture)
from _pretrain_run import ok, run_pretrain

RUN_ARGS = ("--save_steps", "2", "--keep_last", "5", "--eval_steps", "2", "--report_to", "wandb")
# Each test module imports these fixtures, and pytest then keeps one "session" instance per
# module; this cache makes the run (about 30 s) happen once per test session.
_MADE: dict[str, Path] = {}


@pytest.fixture(scope="session")
def inspect_run(request, tmp_path_factory) -> Path:
    if "run" not in _MADE:
        _MADE["run"] = _make_run(request.getfixturevalue("embedded_data"), tmp_path_factory)
    return _MADE["run"]


def _make_run(embedded_data, tmp_path_factory) -> Path:  # noqa: F811
    out = tmp_path_factory.mktemp("inspect") / "tiny-run"
    out.mkdir()
    # A known wandb run id (training/metrics.py reads it back, as every resumed launch does).
    (out / "wandb_run_id").write_text("insptest01")
    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    ok(run_pretrain(out, embedded_data, "--max_steps", "4", *RUN_ARGS, nproc=1, env=env))
    ok(run_pretrain(out, embedded_data, "--max_steps", "6", "--resume", "auto", *RUN_ARGS, nproc=1, env=env))
    _wait_for_wandb(out, steps=6)
    return out


def _wait_for_wandb(out: Path, steps: int, timeout: float = 30) -> None:
    """wandb-core (its own process) writes a file's last partial 32 KiB block when it closes the
    run, which can come after the training process has exited: wait until every launch's file is
    whole and together they hold every step."""
    from training.inspection.wandb_file import find_run_files, read_run

    deadline = time.monotonic() + timeout
    while True:
        runs = [read_run(f) for f in find_run_files(out)]
        n = sum(len(r.history) for r in runs)
        if all(r.truncated_at is None for r in runs) and n >= steps:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"wandb files under {out} still incomplete after {timeout}s ({n} rows)")
        time.sleep(0.2)


@pytest.fixture(scope="session")
def inspect_export(inspect_run, tmp_path_factory) -> Path:
    from training.export import export

    if "export" not in _MADE:
        dst = tmp_path_factory.mktemp("inspect-export") / "tiny-6"
        _MADE["export"] = export(inspect_run / "checkpoints" / "step-00000006", dst)
    return _MADE["export"]


def checkpoint(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"step-{step:08d}"
