"""`genesis data prepare`: counts, exact text in the shards, bad input, resume after a crash."""

from __future__ import annotations

import hashlib
import json
import logging
import time

import numpy as np
import pytest
from _data_fixtures import FIXTURES, embedded, synthetic_docs, write_jsonl, write_mixture  # noqa: F401

from training.data import shards
from training.data.mixture import load_mixture
from training.data.prepare import cli_main, ensure_embedded_data, prepare
from training.data.renderers import get_renderer


def _docs(data_dir, entry, tok, split="train"):
    """Decoded documents of one source: split the token stream at <|endoftext|>."""
    ids = np.concatenate([np.fromfile(data_dir / s["file"], dtype=np.uint16) for s in entry["shards"]
                          if s["split"] == split])  # fmt: skip
    assert ids[-1] == 0, "every document ends with <|endoftext|>"
    cuts = np.flatnonzero(ids == 0)
    starts = np.concatenate([[0], cuts[:-1] + 1])
    return [tok.decode(ids[a:b].tolist()) for a, b in zip(starts, cuts)]


def _docs_lengths(data_dir, entry, split="train"):
    ids = np.concatenate([np.fromfile(data_dir / s["file"], dtype=np.uint16) for s in entry["shards"]
                          if s["split"] == split])  # fmt: skip
    return np.diff(np.concatenate([[-1], np.flatnonzero(ids == 0)])).tolist()


def test_fixture_mixture_counts_and_exact_text(embedded, tmp_path):  # noqa: F811
    from transformers import AutoTokenizer

    tok_dir = embedded[0]
    manifest = prepare(FIXTURES / "mixture.yaml", tok_dir, tmp_path / "data", show_progress=False)
    tok = AutoTokenizer.from_pretrained(tok_dir)
    assert manifest["dtype"] == "uint16" and manifest["fingerprint"] == json.loads(
        (tok_dir / "genesis_tokenizer.json").read_text())["fingerprint"]  # fmt: skip
    fw = manifest["sources"]["fineweb-edu"]
    assert (fw["documents"], fw["dropped_empty"], fw["dropped_duplicate"], fw["dropped_non_utf8"]) == (2, 1, 1, 0)
    assert manifest["sources"]["culturax-ja"]["dropped_empty"] == 1
    mix = load_mixture(FIXTURES / "mixture.yaml")
    for spec in mix.sources:
        entry = manifest["sources"][spec.name]
        if spec.format == "json":
            rows = [json.loads(line) for line in open(spec.data_files[0], encoding="utf-8")]
            rendered = [get_renderer(spec.schema)(r, spec.fields) for r in rows]
            expected = list(dict.fromkeys(t for t in rendered if t and t.strip()))  # dedup, keep order
            assert _docs(tmp_path / "data", entry, tok) == expected, spec.name
        for s in entry["shards"]:
            assert hashlib.sha256((tmp_path / "data" / s["file"]).read_bytes()).hexdigest() == s["sha256"]
    # A literal "<|endoftext|>" in web text is text, not a document boundary ...
    assert "A literal <|endoftext|> in web text" in _docs(tmp_path / "data", fw, tok)[1]
    # ... while chat sources carry the real control tokens.
    ids = np.fromfile(tmp_path / "data" / manifest["sources"]["openhermes"]["shards"][0]["file"], dtype=np.uint16)
    assert {2, 3} <= set(ids.tolist())


def test_parquet_and_jsonl_give_the_same_tokens(embedded, tmp_path):  # noqa: F811
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = synthetic_docs("pq", 30)
    write_jsonl(tmp_path / "a.jsonl", rows)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "a.parquet")
    mix = write_mixture(tmp_path / "m.yaml", [
        {"name": "j", "data_files": "a.jsonl", "weight": 1}, {"name": "p", "data_files": "a.parquet", "weight": 1}])  # fmt: skip
    m = prepare(mix, embedded[0], tmp_path / "data", show_progress=False)
    sha = {n: [s["sha256"] for s in e["shards"]] for n, e in m["sources"].items()}
    assert sha["j"] == sha["p"] and m["sources"]["j"]["documents"] == 30


def test_non_utf8_documents_dropped_and_counted(embedded, tmp_path):  # noqa: F811
    (tmp_path / "mixed.jsonl").write_bytes(b'{"text": "good one"}\n{"text": "bad \xff\xfe bytes"}\n{"text": "good two"}\n')
    mix = write_mixture(tmp_path / "m.yaml", [{"name": "mixed", "data_files": "mixed.jsonl", "weight": 1}])
    entry = prepare(mix, embedded[0], tmp_path / "data", show_progress=False)["sources"]["mixed"]
    assert (entry["documents"], entry["dropped_non_utf8"]) == (2, 1)


def test_source_that_yields_nothing_is_named(embedded, tmp_path):  # noqa: F811
    mix = write_mixture(tmp_path / "m.yaml", [
        {"name": "ok", "data_files": "ok.jsonl", "weight": 1},
        {"name": "broken", "data_files": str(FIXTURES / "non_utf8.txt"), "weight": 1}])  # fmt: skip
    write_jsonl(tmp_path / "ok.jsonl", synthetic_docs("ok", 5))
    with pytest.raises(ValueError, match=r"non_utf8\.txt: source 'broken' yielded no usable documents.*1 non-UTF-8"):
        prepare(mix, embedded[0], tmp_path / "data", show_progress=False, num_proc=1)
    assert not (tmp_path / "data" / "manifest.json").exists()
    assert json.loads((tmp_path / "data" / "ok" / "progress.json").read_text())["complete"]  # kept for the re-run


def test_missing_field_names_file_and_field(embedded, tmp_path):  # noqa: F811
    write_jsonl(tmp_path / "a.jsonl", [{"content": "x"}])
    mix = write_mixture(tmp_path / "m.yaml", [{"name": "a", "data_files": "a.jsonl", "weight": 1}])
    with pytest.raises(ValueError, match=r"a\.jsonl: source 'a', record 1: missing field 'text'"):
        prepare(mix, embedded[0], tmp_path / "data", show_progress=False)


@pytest.mark.parametrize("source, message", [
    ({"name": "a", "data_files": "a.jsonl", "weight": -0.5}, r"sources\[0\] \(a\)\.weight: must be >= 0"),
    ({"name": "a", "data_files": "nope.jsonl", "weight": 1}, r"data_files: file not found: .*nope\.jsonl"),
    ({"name": "a", "data_files": "a.jsonl", "weight": 1, "schema": "html"}, r"\.schema: unknown schema 'html'"),
    ({"name": "a", "data_files": "a.jsonl", "weight": 1, "colour": 1}, r"sources\[0\]\.colour: unknown key"),
    ({"name": "a", "weight": 1}, "needs exactly one of hub_id, data_files, embedded"),
    ({"name": "a", "data_files": "a.jsonl", "weight": "heavy"}, r"\.weight: expected a number"),
])  # fmt: skip
def test_bad_recipe_names_file_and_field(tmp_path, source, message):
    write_jsonl(tmp_path / "a.jsonl", [{"text": "x"}])
    mix = write_mixture(tmp_path / "m.yaml", [source])
    with pytest.raises(ValueError, match=message) as info:
        load_mixture(mix)
    assert "m.yaml" in str(info.value)


def test_weights_normalised_and_logged(tmp_path, caplog):
    write_jsonl(tmp_path / "a.jsonl", [{"text": "x"}])
    mix = write_mixture(tmp_path / "m.yaml", [{"name": "a", "data_files": "a.jsonl", "weight": 3},
                                              {"name": "b", "data_files": "a.jsonl", "weight": 1}])  # fmt: skip
    with caplog.at_level(logging.WARNING):
        weights = load_mixture(mix).weights
    assert weights == {"a": 0.75, "b": 0.25} and "normalising" in caplog.text
    (tmp_path / "bad.yaml").write_text("sources: [\n  {name: a\n")
    with pytest.raises(ValueError, match="bad.yaml: malformed YAML"):
        load_mixture(tmp_path / "bad.yaml")


def test_other_tokenizer_refused(embedded, tmp_path):  # noqa: F811
    from genesis_hf.tokenizer import train_tokenizer

    write_jsonl(tmp_path / "a.jsonl", synthetic_docs("a", 40))
    mix = write_mixture(tmp_path / "m.yaml", [{"name": "a", "data_files": "a.jsonl", "weight": 1}])
    prepare(mix, embedded[0], tmp_path / "data", show_progress=False)
    other = tmp_path / "other-tok"
    train_tokenizer([tmp_path / "a.jsonl"], 300, other, min_frequency=1, show_progress=False)
    before = (tmp_path / "data" / "manifest.json").read_bytes()
    with pytest.raises(ValueError, match="refusing to mix tokenizers"):
        prepare(mix, other, tmp_path / "data", show_progress=False)
    assert (tmp_path / "data" / "manifest.json").read_bytes() == before  # nothing written is lost
    (tmp_path / "data" / "manifest.json").unlink()  # even without the manifest, progress.json refuses
    with pytest.raises(ValueError, match=r"source 'a' was tokenized with tokenizer"):
        prepare(mix, other, tmp_path / "data", show_progress=False)


def test_vocab_dtype():
    assert shards.dtype_for_vocab(49152) == np.uint16 and shards.dtype_for_vocab(65536) == np.uint16
    assert shards.dtype_for_vocab(65537) == np.uint32


def test_truncated_shard_is_named(embedded, tmp_path):  # noqa: F811
    write_jsonl(tmp_path / "a.jsonl", synthetic_docs("a", 40))
    mix = write_mixture(tmp_path / "m.yaml", [{"name": "a", "data_files": "a.jsonl", "weight": 1}])
    m = prepare(mix, embedded[0], tmp_path / "data", show_progress=False)
    shard = tmp_path / "data" / m["sources"]["a"]["shards"][0]["file"]
    shard.write_bytes(shard.read_bytes()[:-3])
    with pytest.raises(ValueError, match=f"{shard}: truncated or corrupt shard"):
        shards.verify(tmp_path / "data")


def _resumable_setup(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", synthetic_docs("a", 300))
    write_jsonl(tmp_path / "b.jsonl", synthetic_docs("b", 200))
    return write_mixture(tmp_path / "m.yaml", [{"name": "a", "data_files": "a.jsonl", "weight": 1},
                                               {"name": "b", "data_files": "b.jsonl", "weight": 1}],
                         shard_tokens=500, validation_fraction=0.1)  # fmt: skip


def test_interrupted_prepare_resumes_to_the_same_result(embedded, tmp_path, monkeypatch):  # noqa: F811
    mix = _resumable_setup(tmp_path)  # 2 KB pieces: the merge commits after each, so often
    straight = prepare(mix, embedded[0], tmp_path / "straight", show_progress=False, num_proc=1, piece_bytes=2000)
    assert len(straight["sources"]["a"]["shards"]) > 4

    real_write = shards.write_json_atomic
    calls = {"n": 0}

    def crash_on_third_progress(path, obj):  # dies after the 3rd commit's shards were renamed
        if path.name == "progress.json":
            calls["n"] += 1
            if calls["n"] == 3:
                raise KeyboardInterrupt("simulated kill")
        real_write(path, obj)

    monkeypatch.setattr(shards, "write_json_atomic", crash_on_third_progress)
    with pytest.raises(KeyboardInterrupt):
        prepare(mix, embedded[0], tmp_path / "resumed", show_progress=False, num_proc=1, piece_bytes=2000)
    monkeypatch.setattr(shards, "write_json_atomic", real_write)
    src = tmp_path / "resumed" / "a"
    assert not (tmp_path / "resumed" / "manifest.json").exists()
    (src / "train-00099.bin.tmp-1").write_bytes(b"half")  # a half-written file of an earlier kill
    committed = json.loads((src / "progress.json").read_text())
    listed = {s["file"].split("/")[1] for s in committed["shards"]}
    listed |= {c["file"] for cs in committed["carry"].values() for c in cs}
    orphans = {f.name for f in src.glob("*.bin")} - listed
    assert orphans, "the crash left renamed shards that progress.json does not list"
    resumed = prepare(mix, embedded[0], tmp_path / "resumed", show_progress=False, num_proc=1, piece_bytes=2000)
    for name in ("a", "b"):
        assert resumed["sources"][name] == straight["sources"][name]
    assert not list(src.glob("*.tmp-*"))


def test_cli_and_embedded_noop(embedded, tmp_path, capsys):  # noqa: F811
    tok_dir, data_dir = embedded
    before = (data_dir / "manifest.json").stat().st_mtime_ns
    t0 = time.perf_counter()
    assert ensure_embedded_data(data_dir.parent) == (tok_dir, data_dir)
    assert time.perf_counter() - t0 < 10 and (data_dir / "manifest.json").stat().st_mtime_ns == before
    write_jsonl(tmp_path / "a.jsonl", synthetic_docs("a", 20))
    mix = write_mixture(tmp_path / "m.yaml", [{"name": "a", "data_files": "a.jsonl", "weight": 1}])
    argv = ["prepare", "--mixture", str(mix), "--tokenizer", str(tok_dir), "--output", str(tmp_path / "d"), "--no-progress"]
    assert cli_main(argv) == 0 and "train tok" in capsys.readouterr().out
    assert cli_main(["verify", str(tmp_path / "d")]) == 0
    assert cli_main(["prepare", "--mixture", str(tmp_path / "none.yaml"), "--tokenizer", str(tok_dir),
                     "--output", str(tmp_path / "e")]) == 2  # fmt: skip
    assert "none.yaml" in capsys.readouterr().err


def test_token_budget_caps_and_extends(embedded, tmp_path):  # noqa: F811
    write_jsonl(tmp_path / "a.jsonl", synthetic_docs("a", 120))
    mix = write_mixture(tmp_path / "m.yaml", [{"name": "a", "data_files": "a.jsonl", "weight": 1}],
                        validation_fraction=0.0)  # fmt: skip
    kw = {"show_progress": False, "piece_bytes": 1500}
    capped = prepare(mix, embedded[0], tmp_path / "d", max_tokens_per_source=400, **kw)["sources"]["a"]
    last = _docs_lengths(tmp_path / "d", capped)[-1]
    assert 400 <= capped["train_tokens"] < 400 + last and capped["documents"] < 120  # whole documents, exact
    full = prepare(mix, embedded[0], tmp_path / "d", **kw)["sources"]["a"]  # budget lifted: continues
    straight = prepare(mix, embedded[0], tmp_path / "s", **kw)["sources"]["a"]
    assert full["documents"] == straight["documents"] == 120
    assert full["train_tokens"] == straight["train_tokens"]


def test_failing_source_in_parallel_reports_its_own_error(embedded, tmp_path):  # noqa: F811
    write_jsonl(tmp_path / "ok.jsonl", synthetic_docs("ok", 50))
    write_jsonl(tmp_path / "bad.jsonl", [{"body": "x"}])
    mix = write_mixture(tmp_path / "m.yaml", [{"name": "ok", "data_files": "ok.jsonl", "weight": 1},
                                              {"name": "bad", "data_files": "bad.jsonl", "weight": 1}])  # fmt: skip
    with pytest.raises(ValueError, match=r"bad\.jsonl: source 'bad', record 1: missing field 'text'"):
        prepare(mix, embedded[0], tmp_path / "data", show_progress=False, num_proc=2)
    write_jsonl(tmp_path / "bad.jsonl", [{"text": "fixed"}])  # fix the input; the re-run completes
    m = prepare(mix, embedded[0], tmp_path / "data", show_progress=False, num_proc=2)
    assert (m["sources"]["ok"]["documents"], m["sources"]["bad"]["documents"]) == (50, 1)


def test_rewritten_input_is_refused_on_resume(embedded, tmp_path):  # noqa: F811
    write_jsonl(tmp_path / "a.jsonl", synthetic_docs("a", 30))
    mix = write_mixture(tmp_path / "m.yaml", [{"name": "a", "data_files": "a.jsonl", "weight": 1}])
    prepare(mix, embedded[0], tmp_path / "data", show_progress=False)
    write_jsonl(tmp_path / "a.jsonl", synthetic_docs("a", 31))
    with pytest.raises(ValueError, match=r"source 'a' changed \(origin, schema, fields or file contents\)"):
        prepare(mix, embedded[0], tmp_path / "data", show_progress=False)
