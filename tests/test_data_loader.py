"""PackedLoader: exact resume (ledger), disjoint and complete rank splits, mixture proportions."""

from __future__ import annotations

import json
import random
from collections import Counter

import numpy as np
import pytest
from _data_fixtures import embedded, make_data  # noqa: F401  (fixture)

from training.data.loader import PackedLoader, validation_batches

SEQ = 31  # windows of 32 tokens: many epochs and shard crossings from small data


@pytest.fixture(scope="module")
def data_dir(embedded, tmp_path_factory):  # noqa: F811
    # shard_tokens=500: several shards per source (cuts no longer depend on a batch size)
    return make_data(tmp_path_factory.mktemp("loader"), embedded[0], {"a": 300, "b": 150, "c": 60},
                     shard_tokens=500, validation_fraction=0.1)  # fmt: skip


def _loader(data_dir, **kw):
    kw.setdefault("seq_len", SEQ)
    kw.setdefault("micro_batch_size", 4)
    return PackedLoader(data_dir, **kw)


def _run(loader, n):
    refs = []
    for _ in range(n):
        loader.next_batch()
        refs += loader.last_refs
    return refs


def test_batches_are_windows_of_the_shards(data_dir):
    loader = _loader(data_dir)
    assert len(loader.manifest["sources"]["a"]["shards"]) > 3
    for _ in range(20):
        b = loader.next_batch()
        assert b.shape == (4, SEQ + 1) and str(b.dtype) == "torch.int64"
        for row, (name, _, start) in zip(b, loader.last_refs):
            src = loader.sources[name]
            whole = np.concatenate([np.asarray(a) for a in src.arrays])
            assert np.array_equal(row.numpy(), whole[start : start + SEQ + 1])
            assert start % (SEQ + 1) == 0


def test_deterministic_for_a_seed(data_dir):
    assert _run(_loader(data_dir, seed=3), 30) == _run(_loader(data_dir, seed=3), 30)
    assert _run(_loader(data_dir, seed=3), 30) != _run(_loader(data_dir, seed=4), 30)


@pytest.mark.parametrize("world_size, rank", [(1, 0), (2, 1)])
def test_multi_resume_ledger(data_dir, world_size, rank):
    """Stop three times (at random points and right at an epoch edge), resume each time from JSON
    state in a fresh loader: the consumed windows equal the straight run's, in order, none twice."""
    total = 150
    straight = _run(_loader(data_dir, world_size=world_size, rank=rank), total)
    epochs = [ep for name, ep, _ in straight if name == "c"]
    assert max(epochs) >= 2, "the run must cross several epoch edges"
    first_new_epoch = next(i for i, (n, ep, _) in enumerate(straight) if n == "c" and ep == 1)
    edge = first_new_epoch // 4  # the batch holding the first window of epoch 1: stop right before it
    rng = random.Random(world_size)
    stops = sorted({rng.randrange(3, edge - 1), edge, rng.randrange(edge + 2, total - 3)})
    assert len(stops) == 3
    resumed, done, loader = [], 0, _loader(data_dir, world_size=world_size, rank=rank)
    for stop in [*stops, total]:
        resumed += _run(loader, stop - done)
        done = stop
        state = json.loads(json.dumps(loader.state_dict()))  # what a checkpoint stores
        loader = _loader(data_dir, world_size=world_size, rank=rank)
        loader.load_state_dict(state)
    assert resumed == straight
    assert max(Counter(straight).values()) == 1, "a window was served twice"
    assert loader.tokens_by_source == {n: c * (SEQ + 1) for n, c in Counter(n for n, _, _ in straight).items()}


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_rank_splits_disjoint_and_complete(data_dir, world_size):
    loaders = [_loader(data_dir, rank=r, world_size=world_size) for r in range(world_size)]
    # Enough batches for every source to pass its first epoch (1/3 of draws each, 4 rows a batch).
    steps = 3 * max(loaders[0].n_windows.values()) // (4 * world_size) + 3
    refs = [ref for ld in loaders for ref in _run(ld, steps)]
    assert len(refs) == len(set(refs)), "two ranks (or two steps) got the same window"
    n_windows = loaders[0].n_windows
    for name, n in n_windows.items():
        epoch0 = {start for src, ep, start in refs if src == name and ep == 0}
        assert epoch0 == {i * (SEQ + 1) for i in range(n)}, f"epoch 0 of {name} incomplete"
    assert all(ld.state_dict()["sources"] == loaders[0].state_dict()["sources"] for ld in loaders)


def test_mixture_proportions(data_dir):
    weights = {"a": 0.7, "b": 0.2, "c": 0.1}
    loader = _loader(data_dir, weights=weights)
    draws = Counter(name for name, _, _ in _run(loader, 500))
    for name, w in weights.items():
        assert abs(draws[name] / 2000 - w) < 0.02
        assert abs(draws[name] - 2000 * w) <= 1  # the deficit schedule is exact to one draw
    assert loader.tokens_by_source == {n: draws[n] * (SEQ + 1) for n in weights}


def test_mixture_change_at_cycle_boundary_replays_nothing(data_dir, caplog):
    first = _loader(data_dir, weights={"a": 0.5, "b": 0.5, "c": 0.0})
    refs = _run(first, 20)
    state = first.state_dict()
    second = _loader(data_dir, weights={"a": 0.2, "b": 0.2, "c": 0.6})
    with caplog.at_level("INFO"):
        second.load_state_dict(state)
    assert "mixture changed" in caplog.text
    later = _run(second, 25)
    assert not set(refs) & set(later), "consumed data was replayed after the mixture change"
    draws = Counter(name for name, _, _ in later)
    assert (draws["a"], draws["b"], draws["c"]) == (20, 20, 60)
    assert second.tokens_by_source["a"] == (40 + 20) * (SEQ + 1)


def test_resharding_is_refused_unless_allowed_and_then_exact(data_dir):
    pair = [_loader(data_dir, rank=r, world_size=2) for r in range(2)]
    refs = [ref for ld in pair for ref in _run(ld, 10)]
    single = _loader(data_dir)
    with pytest.raises(ValueError, match="'world_size' is 2, this run has 1"):
        single.load_state_dict(pair[0].state_dict())
    single.load_state_dict(pair[0].state_dict(), allow_resharding=True)
    later = _run(single, 10)
    assert not set(refs) & set(later)


@pytest.mark.parametrize("field, value", [("seq_len", 63), ("seed", 9), ("fingerprint", "0" * 64), ("split", "val")])
def test_mismatched_state_is_refused(data_dir, field, value):
    state = _loader(data_dir).state_dict()
    state[field] = value
    with pytest.raises(ValueError, match=f"'{field}'"):
        _loader(data_dir).load_state_dict(state)
    state = _loader(data_dir).state_dict()
    state["sources"]["a"]["tokens"] += 1
    with pytest.raises(ValueError, match=r"sources\.a\.tokens .* the source changed"):
        _loader(data_dir).load_state_dict(state)


def test_fingerprint_and_truncation_refused(data_dir, tmp_path):
    with pytest.raises(ValueError, match="refusing shards made by another tokenizer"):
        _loader(data_dir, expected_fingerprint="f" * 64)
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(data_dir, copy)
    shard = copy / json.loads((copy / "manifest.json").read_text())["sources"]["b"]["shards"][0]["file"]
    shard.write_bytes(shard.read_bytes()[:10])
    with pytest.raises(ValueError, match=f"{shard}: truncated or corrupt shard"):
        _loader(copy)


def test_validation_batches(data_dir):
    val = validation_batches(data_dir, seq_len=SEQ, micro_batch_size=2, max_batches=3)
    again = validation_batches(data_dir, seq_len=SEQ, micro_batch_size=2, max_batches=3)
    assert set(val) <= {"a", "b", "c"} and val
    for name, batches in val.items():
        assert 1 <= len(batches) <= 3 and all(b.shape[1] == SEQ + 1 and b.shape[0] <= 2 for b in batches)
        assert all((x == y).all() for x, y in zip(batches, again[name]))


def test_wide_vocabulary_uses_uint32_shards(tmp_path):
    """A vocabulary past 65,536 ids is written as uint32 (prepare) and read back exactly (loader)."""
    from training.data import shards

    dtype = shards.dtype_for_vocab(100_000)
    ids = (np.arange(1000, dtype=np.int64) * 97 + 65_000) % 100_000  # many ids >= 65,536
    (tmp_path / "s").mkdir()
    sha = shards.write_array_atomic(tmp_path / "s" / "train-00000.bin", ids.astype(dtype))
    shards.write_json_atomic(tmp_path / "manifest.json", {
        "format_version": shards.FORMAT_VERSION, "fingerprint": "f" * 64, "dtype": dtype.name,
        "sources": {"s": {"weight": 1.0, "shards": [
            {"file": "s/train-00000.bin", "split": "train", "tokens": 1000, "sha256": sha}]}}})  # fmt: skip
    loader = PackedLoader(tmp_path, seq_len=9, micro_batch_size=100, verify_checksums=True)
    rows = loader.next_batch()
    assert dtype == np.uint32 and rows.max() >= 65_536
    got = {tuple(r.tolist()) for r in rows}
    assert got == {tuple(ids[i : i + 10].tolist()) for i in range(0, 1000, 10)}
