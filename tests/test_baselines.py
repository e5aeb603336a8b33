"""Count baselines (training/evaluation.py): the formulas on hand-made shards, the cache, the
refusal of another tokenizer's shards, and the baselines in metrics.jsonl, `genesis eval` and the report."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from _inspect_fixtures import checkpoint, embedded_data, inspect_run  # noqa: F401  (fixtures)
from _pretrain_run import read_metrics

from training.data import shards
from training.evaluation import BaselineError, baseline_losses, evaluate_model, load_baselines, metrics_record


def _data(tmp_path, train: list[int], vocab: int = 4, fingerprint: str = "f" * 64):
    """A one-source data folder with the given train tokens."""
    d = tmp_path / "data"
    (d / "s").mkdir(parents=True, exist_ok=True)
    arr = np.array(train, dtype=np.uint16)
    sha = shards.write_array_atomic(d / "s" / "train-0.bin", arr)
    shards.write_json_atomic(d / shards.MANIFEST, {
        "format_version": shards.FORMAT_VERSION, "fingerprint": fingerprint, "dtype": "uint16", "vocab_size": vocab,
        "sources": {"s": {"weight": 1.0, "shards": [{"file": "s/train-0.bin", "split": "train", "tokens": len(arr),
                                                     "sha256": sha}]}}})
    return d


def test_unigram_and_witten_bell_bigram_by_hand(tmp_path):
    train = [0, 1, 0, 1, 0, 2, 3, 1]  # pairs: 01 10 01 10 02 23 31
    d = _data(tmp_path, train)
    c = load_baselines(d)["s"]
    n, v = len(train), 4
    p_uni = [(k + 1) / (n + v) for k in (3, 3, 1, 1)]  # counts of 0,1,2,3 with add-one
    # target 1 after 0: c(0,1)=2, c(0)=3 pairs from 0, T(0)=2 distinct followers (1, 2)
    p01 = (2 + 2 * p_uni[1]) / (3 + 2)
    # target 3 after 0: unseen pair, only the interpolated unigram mass
    p03 = (0 + 2 * p_uni[3]) / (3 + 2)
    uni, bi = c.nll(np.array([0, 0]), np.array([1, 3]))
    assert uni == pytest.approx([-math.log(p_uni[1]), -math.log(p_uni[3])])
    assert bi == pytest.approx([-math.log(p01), -math.log(p03)])
    # a context never seen in train falls back to the unigram
    d2 = _data(tmp_path / "b", [0, 1, 0, 1])
    uni, bi = load_baselines(d2)["s"].nll(np.array([3]), np.array([1]))
    assert bi == pytest.approx(uni)
    # probabilities over the whole vocabulary sum to 1 for every context
    for a in range(4):
        _, nll = c.nll(np.full(4, a), np.arange(4))
        assert np.exp(-nll).sum() == pytest.approx(1.0)


def test_losses_bpb_and_the_models_record(tmp_path):
    d = _data(tmp_path, [0, 1, 0, 1, 0, 2, 3, 1] * 5)
    counts = load_baselines(d)
    batch = torch.tensor([[0, 1, 0, 2, 3]])  # targets 1 0 2 3 after 0 1 0 2
    lengths = torch.tensor([0, 1, 2, 3])  # id 0 special: no bytes
    res = baseline_losses(counts, {"s": [batch]}, lengths)["s"]
    uni, bi = counts["s"].nll(batch[:, :-1].numpy(), batch[:, 1:].numpy())
    assert res["bigram"] == pytest.approx(bi.mean()) and res["unigram"] == pytest.approx(uni.mean())
    text = np.array([[True, False, True, True]])
    assert res["bigram_bpb"] == pytest.approx(bi[text].sum() / (math.log(2) * (1 + 2 + 3)))

    class Uniform(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, input_ids):
            from types import SimpleNamespace

            return SimpleNamespace(logits=torch.zeros(*input_ids.shape, 4) + self.w)

    out = evaluate_model(Uniform(), {"s": [batch]}, lengths, counts)["s"]
    assert out["vs_bigram"] == pytest.approx(math.log(4) / res["bigram"] - 1)
    rec = metrics_record({"s": out})
    assert set(rec) == {"val_loss", "val_bpb", "val_unigram", "val_bigram", "val_bigram_bpb", "val_vs_bigram"}
    assert set(metrics_record({"s": {"loss": 1.0, "bpb": 0.5}})) == {"val_loss", "val_bpb"}  # no baselines


def test_cache_is_written_reused_and_recounted_when_the_shards_change(tmp_path):
    d = _data(tmp_path, [0, 1, 0, 1, 2])
    first = load_baselines(d)["s"]
    meta = json.loads((d / "baselines.json").read_text())
    assert meta["tokens"] == {"s": 5} and (d / "baselines.npz").is_file()
    (d / "baselines.npz").write_bytes(b"")  # a damaged cache is counted again, not trusted
    assert np.array_equal(load_baselines(d)["s"].unigram, first.unigram)
    d = _data(tmp_path, [3, 3, 3, 3, 3])  # re-prepared: new shard sha256 -> recounted
    assert load_baselines(d)["s"].unigram.tolist() == [0, 0, 0, 5]


def test_refuses_shards_of_another_tokenizer(tmp_path):
    d = _data(tmp_path, [0, 1, 0, 1], fingerprint="a" * 64)
    with pytest.raises(BaselineError, match=r"fingerprint aaaaaaaaaaaaaaaa.*the tokenizer of x/tok has fingerprint "
                                            r"bbbbbbbbbbbbbbbb"):
        load_baselines(d, expected_fingerprint="b" * 64, tokenizer_name="the tokenizer of x/tok")
    assert not (d / "baselines.json").exists()


def test_baselines_in_metrics_eval_and_report(inspect_run, tmp_path, capsys):  # noqa: F811
    from training.inspection.evaluate import cli_main as eval_main
    from training.inspection.evaluate import evaluate_path
    from training.inspection.report import _baseline_section
    from training.inspection.runs import load_run

    rec = read_metrics(inspect_run)[6]
    for key in ("val_unigram", "val_bigram", "val_bigram_bpb", "val_vs_bigram"):
        assert set(rec[key]) == set(rec["val_loss"]), key
    src = next(iter(rec["val_loss"]))
    assert rec["val_vs_bigram"][src] == pytest.approx(rec["val_loss"][src] / rec["val_bigram"][src] - 1)
    # genesis eval on the checkpoint: the same windows -> the same baseline numbers
    res = evaluate_path(checkpoint(inspect_run, 6), batch_size=2, max_batches=2)
    assert res["sources"][src]["bigram"] == pytest.approx(rec["val_bigram"][src], abs=1e-9)
    assert eval_main([str(checkpoint(inspect_run, 6)), "--batch-size", "2", "--max-batches", "2"]) == 0
    assert f"| {src} | {rec['val_loss'][src]:.4f} |" in capsys.readouterr().out
    # the wandb file carries them too (flattened "val_bigram/<source>")
    wb = load_run(next((inspect_run / "wandb").rglob("run-*.wandb")))
    assert wb.series("val_bigram", src)[1]
    # the report: a table, and a flag when the model is not below the bigram (6 steps: it is not)
    md = "\n".join(_baseline_section(load_run(inspect_run)))
    assert f"| {src} | {rec['val_loss'][src]:.4g} | {rec['val_bigram'][src]:.4g} |" in md
    assert "**FLAG: not below the bigram baseline** after step 1" in md
