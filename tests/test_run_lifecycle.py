"""A run lives and dies with its launcher, and owns its folder (RELIABILITY.md rows 14 and 15).

Real `accelerate launch` with 2 gloo ranks on the debug recipe. A test-only hook (`sleep@2`,
training/fault_injection.py) holds every rank after step 2 so the test can act while the run is alive.
The polite stop on SIGTERM (row 16) is in test_pretrain_resume.py, beside the straight run it is
compared with.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from _pretrain_fixtures import embedded_data  # noqa: F401  (fixture)
from _pretrain_run import REPO, _env, command, kill_tree, ok, read_metrics, run_pretrain, wait_for_step

pytestmark = pytest.mark.distributed

ARGS = ("--max_steps", "6", "--save_steps", "2", "--logging_steps", "1", "--resume", "auto")


def launch(out: Path, data, *args: str, env: dict) -> subprocess.Popen:
    """The launcher in a session of its own, so the test can kill its process group alone."""
    return subprocess.Popen(command(out, data, *args), cwd=REPO, env=_env(env), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)


def wait_until_held(out: Path, proc: subprocess.Popen, step: int = 2) -> None:
    """Until the ranks sit in the `sleep@step` hook: the step's checkpoint is committed and logged."""
    wait_for_step(out, proc, step)
    deadline = time.monotonic() + 240
    while not any(json.loads(line).get("event") == "checkpoint" and json.loads(line).get("step") == step
                  for line in (out / "metrics.jsonl").read_text().splitlines()):
        assert proc.poll() is None and time.monotonic() < deadline, "the run did not reach its hold"
        time.sleep(0.1)
    time.sleep(1.0)


def workers_of(proc: subprocess.Popen) -> list[psutil.Process]:
    """The rank processes: torchrun starts each in a session of its own."""
    kids = [p for p in psutil.Process(proc.pid).children(recursive=True) if "pretrain.py" in " ".join(p.cmdline())]
    assert len(kids) == 2, kids
    assert all(os.getsid(k.pid) != os.getsid(proc.pid) for k in kids), "ranks share the launcher's session"
    return kids


def test_workers_die_with_their_launcher(embedded_data, tmp_path):  # noqa: F811
    out = tmp_path / "orphans"
    proc = launch(out, embedded_data, "--max_steps", "400", "--save_steps", "0", "--save_minutes", "0",
                  "--logging_steps", "1", env={"GENESIS_TEST_FAULTS": "sleep@2", "GENESIS_TEST_SLEEP_S": "4"})
    try:
        wait_for_step(out, proc, 2)
        workers = workers_of(proc)
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher's process group only: what `kill -9 -PGID` does
        proc.wait(timeout=30)
        t0 = time.monotonic()
        _, alive = psutil.wait_procs(workers, timeout=10)
        assert not alive, f"ranks outlived their launcher by 10 s: {[p.pid for p in alive]}"
        print(f"ranks gone {time.monotonic() - t0:.2f} s after the launcher")
        # Nothing was committed by the orphans: the run had no save due.
        assert not list((out / "checkpoints").glob("step-*"))
    finally:
        kill_tree(proc.pid)


def test_a_second_launch_into_a_live_run_is_refused(embedded_data, tmp_path):  # noqa: F811
    out, release = tmp_path / "live", tmp_path / "release"
    first = launch(out, embedded_data, *ARGS, env={"GENESIS_TEST_FAULTS": "sleep@2", "GENESIS_TEST_SLEEP_S": "600",
                                                   "GENESIS_TEST_RELEASE": str(release)})
    try:
        wait_until_held(out, first)
        holder = json.loads((out / "run.lock").read_text())
        assert holder["pid"] in [w.pid for w in workers_of(first)]
        before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
        second = run_pretrain(out, embedded_data, *ARGS, timeout=240)
        assert second.returncode != 0
        assert f"pid {holder['pid']}" in second.stderr and holder["host"] in second.stderr, second.stderr[-3000:]
        assert "in use by a live run" in second.stderr
        after = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
        assert after == before, "the refused launch touched the live run's folder"
        release.touch()
        assert first.wait(timeout=240) == 0
    finally:
        kill_tree(first.pid)
    assert sorted(read_metrics(out)) == list(range(1, 7))  # the live run finished unharmed


def test_after_the_holder_is_killed_the_next_launch_resumes(embedded_data, tmp_path):  # noqa: F811
    out = tmp_path / "killed"
    first = launch(out, embedded_data, *ARGS, env={"GENESIS_TEST_FAULTS": "sleep@2", "GENESIS_TEST_SLEEP_S": "600"})
    try:
        wait_until_held(out, first)
    finally:
        kill_tree(first.pid)  # every process, SIGKILL: the lock file stays, the lock does not
    assert (out / "run.lock").exists()
    res = ok(run_pretrain(out, embedded_data, *ARGS))
    assert "resume audit:" in res.stdout and "step-00000002" in res.stdout
    assert sorted(read_metrics(out)) == list(range(1, 7))


# ------------------------------------------------------------------ the pieces, in this process


def test_stop_request_turns_the_early_warning_into_a_flag():
    from training.lifecycle import StopRequest

    stop = StopRequest("SIGUSR1")
    try:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.05)  # delivered to the main thread at the next bytecode
        assert stop.requested and stop.signal_name == "SIGUSR1"
    finally:
        stop.restore()
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL
    with pytest.raises(ValueError, match="stop_signal: unknown signal 'SIGNOPE'"):
        StopRequest("SIGNOPE")


@contextlib.contextmanager
def lock_held_by_another_process(folder: Path):
    """A child process that holds `folder`'s run lock until the block ends (then it is killed)."""
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; sys.path.insert(0, sys.argv[1]);"
                               "from training.lifecycle import RunLock; RunLock(sys.argv[2]).acquire();"
                               "print('held', flush=True); time.sleep(60)", str(REPO), str(folder)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        yield holder
    finally:
        holder.kill()
        holder.wait()


def test_run_lock_is_exclusive_and_dies_with_its_holder(tmp_path):
    from training.lifecycle import RunFolderBusy, RunLock

    with lock_held_by_another_process(tmp_path) as holder:
        with pytest.raises(RunFolderBusy, match=rf"in use by a live run \(host .*, pid {holder.pid}, since"):
            RunLock(tmp_path).acquire()
    lock = RunLock(tmp_path).acquire()  # the kernel dropped the dead holder's lock
    assert json.loads((tmp_path / "run.lock").read_text())["pid"] == os.getpid()
    lock.release()


def test_an_alignment_launch_into_a_live_runs_folder_is_refused_and_a_finished_one_frees_it(tmp_path, monkeypatch,
                                                                                           capsys):
    """alignment/sft.py (and dpo.py, through the same trainer class) lock their output_dir as pretrain.py
    does: a second launch is refused with one line naming the holder, exit 2, before anything is written;
    a finished stage releases the folder (a cycle runs its stages in one process)."""
    from _alignment_fixtures import DATA_DIR, make_model_folder

    from alignment import sft
    from training.lifecycle import RunLock

    out_dir = tmp_path / "sft"
    argv = ["--config", str(REPO / "alignment" / "recipes" / "sft-tiny.yaml"), "--model_name_or_path",
            str(make_model_folder(tmp_path)), "--dataset_name", str(DATA_DIR / "sft_conversations.jsonl"),
            "--output_dir", str(out_dir), "--max_steps", "2"]
    monkeypatch.setenv("WORLD_SIZE", "1")
    with lock_held_by_another_process(out_dir) as holder:
        with pytest.raises(SystemExit) as e:
            sft.run_script(sft.main, lambda: sft.parse(argv))
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert "in use by a live run" in err and f"pid {holder.pid}" in err
        assert sorted(p.name for p in out_dir.iterdir()) == ["run.lock"]
    sft.run_script(sft.main, lambda: sft.parse(argv))  # the holder is gone: it runs
    assert (out_dir / "model.safetensors").is_file()
    RunLock(out_dir).acquire().release()  # and released the folder when it ended
