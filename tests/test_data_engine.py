"""Beyond one machine: prepare as tasks of datatrove's local executor gives the same manifest and
shards as --num-proc 2; a failed task reruns alone."""

from __future__ import annotations

import pytest
from _data_fixtures import embedded, synthetic_docs, write_jsonl, write_mixture  # noqa: F401

pytest.importorskip("datatrove")

from training.data import engine  # noqa: E402
from training.data.prepare import prepare  # noqa: E402


def _mixture(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", synthetic_docs("a", 200) + synthetic_docs("a", 20))  # duplicates
    write_jsonl(tmp_path / "b.jsonl", synthetic_docs("b", 120))
    return write_mixture(tmp_path / "m.yaml", [
        {"name": "a", "data_files": "a.jsonl", "weight": 1},
        {"name": "b", "data_files": "b.jsonl", "weight": 1, "max_tokens": 900},
    ], shard_tokens=600, validation_fraction=0.2)  # fmt: skip


def _files(d):
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*.bin"))}


def test_two_local_tasks_equal_num_proc_two(embedded, tmp_path):  # noqa: F811
    mix = _mixture(tmp_path)
    procs = prepare(mix, embedded[0], tmp_path / "procs", num_proc=2, show_progress=False, piece_bytes=1500)
    tasks = engine.prepare_on_engine(mix, embedded[0], tmp_path / "tasks", tasks=2, workers=2, piece_bytes=1500)
    assert tasks["sources"] == procs["sources"]
    assert _files(tmp_path / "tasks") == _files(tmp_path / "procs")
    ledgers = engine.task_ledgers(tmp_path / "tasks")
    assert [t["rank"] for t in ledgers] == [0, 1] and all(t["pieces"] for t in ledgers)


def test_a_failed_task_reruns_alone(embedded, tmp_path, monkeypatch):  # noqa: F811
    mix = _mixture(tmp_path)
    real = engine.tokenize_piece
    calls: list[tuple[str, int]] = []

    def dies_in_rank_one(job, index):
        calls.append((job["spec"]["name"], index))
        if index == 1 and job["spec"]["name"] == "a" and len(calls) < 50:
            raise RuntimeError("simulated kill")
        return real(job, index)

    monkeypatch.setattr(engine, "tokenize_piece", dies_in_rank_one)
    kw = {"tasks": 2, "workers": 1, "piece_bytes": 1500}  # workers=1: the ranks run in this process
    with pytest.raises(RuntimeError, match="simulated kill"):
        engine.prepare_on_engine(mix, embedded[0], tmp_path / "d", **kw)
    assert not (tmp_path / "d" / "manifest.json").exists()
    first = list(calls)
    calls.clear()
    calls.extend([("pad", 0)] * 50)  # the rerun does not fail
    m = engine.prepare_on_engine(mix, embedded[0], tmp_path / "d", **kw)
    rerun = calls[50:]
    from training.data.prepare import setup_run

    run = setup_run(mix, embedded[0], tmp_path / "plan", merge=False, piece_bytes=1500)
    rank = {(run.jobs[s]["spec"]["name"], i): k % 2 for k, (s, i) in enumerate(run.order())}
    assert {rank[c] for c in first} == {0, 1} and rerun and {rank[c] for c in rerun} == {1}  # rank 1 alone
    straight = prepare(mix, embedded[0], tmp_path / "s", num_proc=1, show_progress=False, piece_bytes=1500)
    assert m["sources"] == straight["sources"]


def test_tasks_skip_pieces_past_the_budget(embedded, tmp_path, monkeypatch):  # noqa: F811
    write_jsonl(tmp_path / "b.jsonl", synthetic_docs("b", 400))
    mix = write_mixture(tmp_path / "m.yaml", [{"name": "b", "data_files": "b.jsonl", "weight": 1, "max_tokens": 900}],
                        validation_fraction=0.0, validation_max_tokens=0)  # fmt: skip
    real, calls = engine.tokenize_piece, []
    monkeypatch.setattr(engine, "tokenize_piece", lambda job, i: calls.append(i) or real(job, i))
    m = engine.prepare_on_engine(mix, embedded[0], tmp_path / "d", tasks=2, workers=1, piece_bytes=1000)
    from training.data.prepare import setup_run

    n_pieces = len(setup_run(mix, embedded[0], tmp_path / "p", merge=False, piece_bytes=1000).jobs[0]["pieces"])
    # workers=1 runs rank 0 (every even piece) first; rank 1 then finds the budget in the prefix
    assert n_pieces > 20 and len(calls) <= (n_pieces + 1) // 2 + 2
    straight = prepare(mix, embedded[0], tmp_path / "s", num_proc=1, show_progress=False, piece_bytes=1000)
    assert m["sources"] == straight["sources"]
