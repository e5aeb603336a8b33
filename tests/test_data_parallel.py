"""Processes, not threads: a source split into pieces across workers gives the same shards, byte
for byte, at any --num-proc; the budget, hold-out and duplicate filter are exact across pieces."""

from __future__ import annotations

import json

import pytest
from _data_fixtures import embedded, synthetic_docs, write_jsonl, write_mixture  # noqa: F401

from training.data.mixture import load_mixture
from training.data.pieces import plan_pieces
from training.data.prepare import prepare


def _mixture(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    a = synthetic_docs("a", 400)
    write_jsonl(tmp_path / "a.jsonl", a + a[:50] + [{"text": "  "}])  # duplicates in later pieces
    pq.write_table(pa.Table.from_pylist(synthetic_docs("b", 60)), tmp_path / "b.parquet")
    write_jsonl(tmp_path / "c.jsonl", synthetic_docs("c", 300))
    return write_mixture(tmp_path / "m.yaml", [
        {"name": "a", "data_files": "a.jsonl", "weight": 1},
        {"name": "b", "data_files": "b.parquet", "weight": 1},
        {"name": "c", "data_files": "c.jsonl", "weight": 1, "max_tokens": 2000},
    ], shard_tokens=700, validation_fraction=0.2, validation_max_tokens=900)  # fmt: skip


def _files(data_dir):
    return {p.relative_to(data_dir).as_posix(): p.read_bytes() for p in sorted(data_dir.rglob("*.bin"))}


def test_same_shards_at_any_num_proc(embedded, tmp_path):  # noqa: F811
    mix, procs = _mixture(tmp_path), 3
    pieces = plan_pieces(load_mixture(mix).sources[0], tmp_path, 2000)
    assert len(pieces) > 2 * procs and all(p["kind"] == "range" for p in pieces)
    one = prepare(mix, embedded[0], tmp_path / "one", num_proc=1, show_progress=False, piece_bytes=2000)
    many = prepare(mix, embedded[0], tmp_path / "many", num_proc=procs, show_progress=False, piece_bytes=2000)
    assert one["sources"] == many["sources"]
    assert _files(tmp_path / "one") == _files(tmp_path / "many")
    a, c = one["sources"]["a"], one["sources"]["c"]
    assert (a["documents"], a["dropped_duplicate"], a["dropped_empty"]) == (400, 50, 1)  # across pieces
    assert 0 < a["val_tokens"] <= 900 and a["val_documents"] > 0
    assert 2000 <= c["train_tokens"] < 2100 and c["documents"] < 300  # budget: whole documents, exact
    assert not (tmp_path / "many" / ".pieces").exists()


def test_pieces_do_not_depend_on_one_piece_or_many(embedded, tmp_path):  # noqa: F811
    """The piece size changes the work split, not the documents: same counts and tokens."""
    mix = _mixture(tmp_path)
    small = prepare(mix, embedded[0], tmp_path / "s", num_proc=1, show_progress=False, piece_bytes=2000)
    whole = prepare(mix, embedded[0], tmp_path / "w", num_proc=1, show_progress=False, piece_bytes=1 << 30)
    for name in ("a", "b", "c"):
        # records_read counts every record of each piece the merge started: for the budgeted
        # source that depends on where the last piece ends
        drop = {"records_read"} if name == "c" else set()
        assert ({k: v for k, v in small["sources"][name].items() if k not in drop}
                == {k: v for k, v in whole["sources"][name].items() if k not in drop}), name  # fmt: skip


def test_changed_pieces_refused_unless_overridden(embedded, tmp_path):  # noqa: F811
    mix = _mixture(tmp_path)
    kw = {"num_proc": 1, "show_progress": False, "piece_bytes": 2000}
    prepare(mix, embedded[0], tmp_path / "d", **kw)
    with open(tmp_path / "a.jsonl", "a", encoding="utf-8") as fh:  # a file grows: its pieces change
        fh.write(json.dumps({"text": "one more document"}) + "\n")
    with pytest.raises(ValueError, match=r"source 'a' changed .*--overrides a"):
        prepare(mix, embedded[0], tmp_path / "d", **kw)
    m = prepare(mix, embedded[0], tmp_path / "d", overrides=("a",), **kw)
    assert m["sources"]["a"]["documents"] == 401


def test_unreachable_hub_source_refused_before_any_worker(embedded, tmp_path, monkeypatch):  # noqa: F811
    import training.data.pieces as pieces_module

    write_jsonl(tmp_path / "ok.jsonl", synthetic_docs("ok", 5))
    mix = write_mixture(tmp_path / "m.yaml", [{"name": "ok", "data_files": "ok.jsonl", "weight": 1},
                                              {"name": "web", "hub_id": "nobody/nothing-here", "weight": 1}])  # fmt: skip
    started = []
    monkeypatch.setattr(pieces_module, "tokenize_piece", lambda *a: started.append(a))
    with pytest.raises(ValueError, match=r"nobody/nothing-here\[train\]: source 'web' cannot be opened"):
        prepare(mix, embedded[0], tmp_path / "d", num_proc=1, show_progress=False)
    assert not started and not (tmp_path / "d" / "ok").exists()


def test_progress_display_and_dry_run(embedded, tmp_path, capsys):  # noqa: F811
    from training.data.prepare import cli_main

    mix = _mixture(tmp_path)
    prepare(mix, embedded[0], tmp_path / "d", num_proc=1, show_progress=True, piece_bytes=2000)
    err = capsys.readouterr().err
    assert "M tok/s" in err and "sources 3/3 done" in err and "piece" in err
    argv = ["prepare", "--mixture", str(mix), "--tokenizer", str(embedded[0]), "--output", str(tmp_path / "dry"),
            "--dry-run", "--num-proc", "2"]  # fmt: skip
    assert cli_main(argv) == 0
    out = capsys.readouterr().out
    assert "predicted total on this machine" in out and "bytes/tok" in out
    assert not (tmp_path / "dry" / "manifest.json").exists()


def test_a_dead_worker_leaves_no_half_shard_and_the_rerun_completes(embedded, tmp_path, monkeypatch):  # noqa: F811
    import _data_fixtures

    import training.data.prepare as prepare_module

    mix = _mixture(tmp_path)
    kw = {"show_progress": False, "piece_bytes": 2000}
    monkeypatch.setattr(prepare_module, "tokenize_piece", _data_fixtures.dying_tokenize_piece)
    with pytest.raises(RuntimeError, match="a worker process died.*run the same command again"):
        prepare(mix, embedded[0], tmp_path / "d", num_proc=2, **kw)
    assert not (tmp_path / "d" / "manifest.json").exists()
    for progress in (tmp_path / "d").glob("*/progress.json"):  # what a ledger lists is whole
        state = json.loads(progress.read_text())
        for s in state["shards"]:
            assert (tmp_path / "d" / s["file"]).stat().st_size == 2 * s["tokens"]
    monkeypatch.undo()
    resumed = prepare(mix, embedded[0], tmp_path / "d", num_proc=2, **kw)
    straight = prepare(mix, embedded[0], tmp_path / "s", num_proc=1, **kw)
    assert resumed["sources"] == straight["sources"]
