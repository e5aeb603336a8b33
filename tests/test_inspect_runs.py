"""Run history from metrics.jsonl / wandb run files / checkpoints, and `genesis plot`."""

from __future__ import annotations

import json
import shutil
import time

import pytest
from _inspect_fixtures import embedded_data, inspect_run  # noqa: F401  (fixtures)
from _pretrain_run import read_metrics

from training.inspection import InspectError
from training.inspection.plots import cli_main as plot_main
from training.inspection.plots import smooth
from training.inspection.runs import load_run
from training.inspection.wandb_file import find_run_files, read_run, scan


def test_wandb_reader_matches_metrics(inspect_run):  # noqa: F811
    files = find_run_files(inspect_run)
    assert len(files) == 2, files  # one run file per launch
    first, second = (read_run(f) for f in files)
    assert first.run_id == second.run_id == "insptest01"
    assert first.truncated_at is None and second.truncated_at is None
    assert (first.config["max_steps"], second.config["max_steps"]) == (4, 6)
    metrics = read_metrics(inspect_run)
    rows = {int(r["step"]): r for r in first.history + second.history}
    assert sorted(rows) == sorted(metrics) == [1, 2, 3, 4, 5, 6]
    for step, rec in metrics.items():
        for key in ("loss", "lr", "grad_norm", "tok_s", "tokens"):
            assert rows[step][key] == pytest.approx(rec[key], rel=1e-12), (step, key)
        for src, v in (rec.get("val_loss") or {}).items():
            assert rows[step][f"val_loss/{src}"] == pytest.approx(v, rel=1e-12)


@pytest.mark.parametrize("source", ["", "metrics.jsonl", "wandb"])
def test_markers_from_every_source(inspect_run, source):  # noqa: F811
    run = load_run(inspect_run / source if source else inspect_run)
    assert sorted(run.steps) == [1, 2, 3, 4, 5, 6]
    assert run.series("val_loss", run.val_sources()[0])[0] == [2, 4, 6]
    if source == "metrics.jsonl":  # metrics alone: no launch boundaries, no checkpoints
        assert (run.resumes, run.extensions, run.checkpoints) == ([], [], [])
        return
    assert run.resumes == [4]
    assert run.extensions == [(4, 4, 6)]
    assert run.checkpoints == ([2, 4, 6] if source == "" else [])


def test_replayed_steps_mark_a_resume(tmp_path):
    # A run killed after step 5 with its last checkpoint at 3 replays steps 4-5: the replay wins.
    lines = [{"step": s, "loss": 10.0 - s, "lr": 1e-3} for s in (1, 2, 3, 4, 5)]
    lines += [{"step": s, "loss": 20.0 - s, "lr": 1e-3} for s in (4, 5, 6)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    run = load_run(tmp_path / "metrics.jsonl")
    assert run.resumes == [3]
    assert run.series("loss") == ([1, 2, 3, 4, 5, 6], [9.0, 8.0, 7.0, 16.0, 15.0, 14.0])


def test_broken_metrics_lines(tmp_path, capsys):
    good = [json.dumps({"step": s, "loss": 1.0}) for s in (1, 2, 3)]
    path = tmp_path / "metrics.jsonl"
    path.write_text(good[0] + "\n" + '{"step": 2, "lo\n' + good[2] + "\n")
    with pytest.raises(InspectError, match=rf"{path}:2: broken metrics line"):
        load_run(path)
    assert sorted(load_run(path, allow_partial=True).steps) == [1, 3]
    assert plot_main([str(path), "-o", str(tmp_path / "x.png")]) == 2
    assert f"{path}:2: broken metrics line" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()
    # An unterminated last line is what a SIGKILL mid-write leaves: skipped, with a note.
    path.write_text("\n".join(good) + "\n" + '{"step": 4, "lo')
    run = load_run(path)
    assert sorted(run.steps) == [1, 2, 3] and "skipped" in run.notes[0]


def test_truncated_and_corrupt_wandb_files(inspect_run, tmp_path, capsys):  # noqa: F811
    src = find_run_files(inspect_run)[0]
    data = src.read_bytes()
    n_records = len(scan(src)[0])

    truncated = tmp_path / "t" / "run-trunc.wandb"
    truncated.parent.mkdir()
    truncated.write_bytes(data[: len(data) - 100])
    records, at = scan(truncated)
    assert at is not None and 0 < len(records) < n_records
    with pytest.raises(InspectError, match=rf"{truncated}: truncated at byte {at}"):
        load_run(truncated)
    assert load_run(truncated, allow_partial=True).steps  # what is there is readable

    corrupt = tmp_path / "c" / "run-corrupt.wandb"
    corrupt.parent.mkdir()
    corrupt.write_bytes(data[:200] + bytes([data[200] ^ 0xFF]) + data[201:])
    with pytest.raises(InspectError, match=rf"{corrupt}: corrupt wandb run file: bad chunk at byte \d+"):
        read_run(corrupt)
    assert plot_main([str(corrupt), "-o", str(tmp_path / "c.png")]) == 2
    assert f"{corrupt}: corrupt wandb run file" in capsys.readouterr().err

    not_wandb = tmp_path / "run-x.wandb"
    not_wandb.write_bytes(b"hello world, not a run file")
    with pytest.raises(InspectError, match="not a wandb run file"):
        read_run(not_wandb)


def test_plot_cli_overlays_runs(inspect_run, tmp_path, capsys):  # noqa: F811
    from PIL import Image

    other = tmp_path / "other"
    shutil.copytree(inspect_run / "wandb", other / "wandb")
    out = tmp_path / "plots" / "cmp.png"
    rc = plot_main([str(inspect_run), str(other), str(inspect_run / "metrics.jsonl"), "-o", str(out),
                    "--names", "run,wandb-only,metrics", "--smooth", "2"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "run: 6 steps (1..6), resumes at [4], extensions [(4, '4->6')], checkpoints [2, 4, 6]" in printed
    with Image.open(out) as im:
        assert im.size[0] > 1000 and im.size[1] > 600
    assert plot_main([str(tmp_path / "nope"), "-o", str(out)]) == 2
    assert f"{tmp_path / 'nope'}: no such file or folder" in capsys.readouterr().err
    assert plot_main([str(inspect_run), "-o", str(out), "--panels", "loss,bogus"]) == 2


def test_not_a_run_folder(tmp_path):
    with pytest.raises(InspectError, match=rf"{tmp_path}: not a run folder"):
        load_run(tmp_path)


def test_smooth():
    assert smooth([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
    assert smooth([1.0, 2.0], 1) == [1.0, 2.0]


def test_wandb_records_spanning_blocks(tmp_path):
    """A real wandb file with records over the 32 KiB block size (FIRST/MIDDLE/LAST chunks), cut anywhere."""
    import wandb

    run = wandb.init(mode="offline", dir=str(tmp_path), project="genesis-test", id="bigrun01",
                     config={"blob": "x" * 70000, "max_steps": 300},
                     settings=wandb.Settings(silent=True, console="off", x_disable_stats=True))
    for s in range(1, 301):
        run.log({"step": s, "loss": 1.0 / s, **{f"k{i}": s * i for i in range(40)}}, step=s)
    run.finish()
    (path,) = find_run_files(tmp_path)
    # wandb-core writes whole 32 KiB blocks as they fill and the last partial block on close, which
    # can land after finish() returns (seen under load): until then the file ends mid-record.
    deadline = time.monotonic() + 30
    while ((got := read_run(path)).truncated_at is not None or len(got.history) < 300) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert got.truncated_at is None and len(got.config["blob"]) == 70000
    assert [r["step"] for r in got.history] == list(range(1, 301))
    assert got.history[-1]["loss"] == 1.0 / 300 and got.history[-1]["k39"] == 300 * 39
    data = path.read_bytes()
    assert len(data) > 4 * 32768
    cut = tmp_path / "run-cut.wandb"
    full = len(scan(path)[0])
    # A live run's file: whole blocks only, the last record cut where the block ends -> read, noted.
    live = tmp_path / "live" / "run-live.wandb"
    live.parent.mkdir()
    # Where records fall depends on the run (timestamps, ids): take the first block boundary that a
    # record spans (almost always the third; a record can end exactly at one, or a block be padded).
    for blocks in range(3, len(data) // 32768):
        live.write_bytes(data[: blocks * 32768])
        if read_run(live).pending_block:
            break
    assert read_run(live).pending_block, "no block boundary inside a record"
    run_live = load_run(live)
    assert 0 < len(run_live.steps) < 300 and "a run still writing, or killed" in run_live.notes[0]
    for end in range(8, len(data), 7919):  # a copy can stop anywhere
        cut.write_bytes(data[:end])
        records, at = scan(cut)
        assert len(records) <= full and (at is None or at < end)
