"""`spike_policy: rollback` on the real pretrain.py (RELIABILITY.md rows 9 and 19).

Spikes are injected as bad data would cause them (`spike@7`: loss x 20 at step 7, only before the
run's first rollback: the rollback skips the data, so the replayed step no longer spikes). The
debug recipe with `--spike_window 4` (the median needs 4 steps of history), a checkpoint every 2
steps, and a skip margin of 2 steps.
"""

from __future__ import annotations

import json
import shutil

import pytest
from _pretrain_fixtures import embedded_data  # noqa: F401  (fixture)
from _pretrain_run import assert_same_tensors, checkpoint_tensors, ok, read_metrics, run_pretrain

from genesis_cli import main as genesis
from training.checkpoint import latest_checkpoint

pytestmark = pytest.mark.distributed

N = 12
ARGS = ("--max_steps", str(N), "--save_steps", "2", "--logging_steps", "1", "--resume", "auto",
        "--spike_policy", "rollback", "--spike_window", "4", "--rollback_window", "10", "--rollback_skip_margin", "2")
SPIKES = {"GENESIS_TEST_FAULTS": "spike@7,spike@8"}


def events(out, kind: str) -> list[dict]:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r.get("event") == kind]


@pytest.fixture(scope="module")
def recovered(tmp_path_factory, embedded_data):  # noqa: F811
    """2 ranks; spikes at steps 7 and 8 trigger a rollback to step 6; the run finishes."""
    out = tmp_path_factory.mktemp("recovered")
    res = ok(run_pretrain(out, embedded_data, *ARGS, env=SPIKES))
    return out, res


def test_two_spikes_roll_back_and_the_run_finishes(recovered):
    out, res = recovered
    assert "ROLLBACK at step 8: spikes at steps [7, 8]" in res.stderr
    (rb,) = events(out, "rollback")
    assert rb["restored_step"] == 6 and rb["spikes"] == [7, 8]
    # skipped from step 6's position: what steps 7-8 read plus 2 steps' worth past them (8 windows a
    # step: 2 ranks x 2 micro-batches x 2 rows, half from each source)
    assert rb["skip"] == {"python-code": [24, 40], "python-docs": [24, 40]}, rb["skip"]
    assert [s["step"] for s in events(out, "spike")] == [7, 8]
    assert all(len(s["windows"]) == 8 for s in events(out, "spike"))  # 2 ranks x 2 micro x 2 rows
    steps = read_metrics(out)
    assert sorted(steps) == list(range(1, N + 1)) and steps[N]["skipped_tokens_by_source"] == rb["skipped_tokens"]
    final = json.loads((latest_checkpoint(out / "checkpoints") / "train_state.json").read_text())
    assert [r["id"] for r in final["rollbacks"]] == [rb["id"]]  # recorded in the train state
    # No save after the first spike until the rollback: the state to return to was never pruned.
    saves = [e["step"] for e in events(out, "checkpoint")]
    assert saves[:3] == [2, 4, 6] and 8 in saves[3:]


def test_the_skip_is_exactly_what_the_record_says(recovered, embedded_data, tmp_path):  # noqa: F811
    """A fresh run to step 6, resumed with the recorded windows excluded by hand (--skip_data),
    repeats the recovered run's losses bit for bit from the rollback point on."""
    out, _ = recovered
    skip = tmp_path / "skip.json"
    assert genesis(["spikes", str(out), "--skip-data"]) == 0
    (rb,) = events(out, "rollback")
    skip.write_text(json.dumps({k: [v] for k, v in rb["skip"].items()}))
    fresh = tmp_path / "fresh"
    res = run_pretrain(fresh, embedded_data, *ARGS, env={"GENESIS_TEST_FAULTS": "kill@6"})
    assert res.returncode != 0 and max(read_metrics(fresh)) == 6
    ok(run_pretrain(fresh, embedded_data, *ARGS, "--skip_data", str(skip)))
    a, b = read_metrics(out), read_metrics(fresh)
    for step in range(7, N + 1):
        for key in ("loss", "grad_norm", "lr", "tokens_by_source"):
            assert a[step][key] == b[step][key], f"step {step}: {key} {a[step][key]!r} != {b[step][key]!r}"


def test_sigkill_during_recovery_then_resume_gives_the_same_weights(recovered, embedded_data, tmp_path):  # noqa: F811
    out, _ = recovered
    killed = tmp_path / "killed"
    res = run_pretrain(killed, embedded_data, *ARGS, env={"GENESIS_TEST_FAULTS": "spike@7,spike@8,killrecovered@7"})
    assert res.returncode != 0 and latest_checkpoint(killed / "checkpoints").name == "step-00000006"
    assert json.loads((killed / "recovery.json").read_text())["rollbacks"][0]["spikes"] == [7, 8]
    res = ok(run_pretrain(killed, embedded_data, *ARGS, env=SPIKES))
    assert "replaying its decision" in res.stderr
    assert_same_tensors(checkpoint_tensors(out / "checkpoints" / f"step-{N:08d}"),
                        checkpoint_tensors(killed / "checkpoints" / f"step-{N:08d}"))


def test_max_rollbacks_stops_with_exit_3(embedded_data, tmp_path):  # noqa: F811
    out = tmp_path / "exhausted"
    res = run_pretrain(out, embedded_data, *ARGS, "--max_rollbacks", "1", nproc=1,
                       env={"GENESIS_TEST_FAULTS": "spike@7,spike@8,respike@9,respike@10"})
    assert res.returncode == 3, res.stderr[-3000:]
    assert "max_rollbacks reached" in res.stderr and len(events(out, "rollback")) == 1
    assert events(out, "stopped")[-1]["step"] == 10


def test_no_checkpoint_before_the_spike_falls_back_to_stop(embedded_data, tmp_path):  # noqa: F811
    out = tmp_path / "nothing"
    res = run_pretrain(out, embedded_data, *ARGS, "--save_steps", "0", "--save_minutes", "0", nproc=1, env=SPIKES)
    assert res.returncode == 3
    (why,) = events(out, "rollback_impossible")
    assert "no committed checkpoint from before step 7" in why["reason"] and "falling back to stop" in res.stderr


def test_async_save_in_flight_never_commits_a_state_after_the_spike(embedded_data, tmp_path):  # noqa: F811
    out = tmp_path / "async"
    ok(run_pretrain(out, embedded_data, *ARGS, "--save_steps", "1", "--save_mode", "async", nproc=1, env=SPIKES))
    log = list(map(json.loads, (out / "metrics.jsonl").read_text().splitlines()))
    first_rollback = next(i for i, r in enumerate(log) if r.get("event") == "rollback")
    before = [r["step"] for r in log[:first_rollback] if r.get("event") == "checkpoint"]
    assert before and max(before) <= 6, before  # nothing saved from the first spike (7) to the rollback
    assert log[first_rollback]["restored_step"] == 6  # step 6, in flight at the spike, committed first


def test_genesis_spikes_shows_the_windows_text(recovered, capsys):
    out, _ = recovered
    assert genesis(["spikes", str(out)]) == 0
    table = capsys.readouterr().out
    assert "| 7 |" in table and "| 8 |" in table and "restored step 6" in table
    assert genesis(["spikes", str(out), "--show", "7", "--chars", "60"]) == 0
    text = capsys.readouterr().out
    assert text.count("--- rank ") == 8 and "micro-batch loss" in text and "document" in text
    w = events(out, "spike")[0]["windows"][0]
    assert f"{w['source']} epoch {w['epoch']} offset {w['offset']}" in text
    assert genesis(["spikes", str(out), "--show", "3"]) == 2


def test_rollback_settings_are_checked(embedded_data, tmp_path):  # noqa: F811
    res = run_pretrain(tmp_path / "bad", embedded_data, *ARGS, "--rollback_window", "0", nproc=1)
    assert res.returncode == 2 and "rollback_window must be > 0, got 0" in res.stderr
    bad = tmp_path / "skip.json"
    bad.write_text('{"python-code": [[5, 2]]}')
    res = run_pretrain(tmp_path / "bad2", embedded_data, *ARGS, "--skip_data", str(bad), nproc=1)
    assert res.returncode == 2 and f"skip_data: {bad}" in res.stderr
    shutil.rmtree(tmp_path / "bad2", ignore_errors=True)
