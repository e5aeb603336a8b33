"""`genesis eval`: held-out loss and bits per byte, the eval hook, lm-eval task files, `genesis report`."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml
from _inspect_fixtures import checkpoint, embedded_data, inspect_export, inspect_run  # noqa: F401  (fixtures)
from _pretrain_run import read_metrics

from training.inspection import InspectError
from training.inspection.evaluate import EvalHook, evaluate_model, evaluate_path, token_byte_lengths
from training.inspection.evaluate import cli_main as eval_main
from training.inspection.report import cli_main as report_main


def _tokenizer(run):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(json.loads((checkpoint(run, 6) / "meta.json").read_text())["tokenizer_dir"])


def test_checkpoint_eval_equals_the_loops_val_loss(inspect_run):  # noqa: F811
    # Same windows as the loop (debug recipe: micro-batch 2, eval_batches 2): same number.
    logged = read_metrics(inspect_run)[6]["val_loss"]
    res = evaluate_path(checkpoint(inspect_run, 6), batch_size=2, max_batches=2)
    assert res["step"] == 6 and res["seq_len"] == 64
    assert set(res["sources"]) == set(logged)
    for src, v in logged.items():
        assert res["sources"][src]["loss"] == pytest.approx(v, abs=1e-5)
        assert res["sources"][src]["tokens"] == 4 * 64
        assert 0 < res["sources"][src]["bpb"] < 10


def test_byte_lengths_count_utf8_bytes(inspect_run):  # noqa: F811
    tok = _tokenizer(inspect_run)
    lengths = token_byte_lengths(tok)
    for text in ["def f(x):\n    return x  # é ü 日本 🙂", "plain ascii words"]:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert sum(lengths[i].item() for i in ids) == len(text.encode("utf-8"))
    assert lengths[tok.eos_token_id] == 0
    # The emoji is spelled with single-byte tokens (pieces of one character): each counts 1 byte,
    # where decoding the token alone would give U+FFFD (3 bytes).
    ids = tok("🙂", add_special_tokens=False)["input_ids"]
    assert len(ids) > 1 and [lengths[i].item() for i in ids] == [1] * len(ids)


class _Uniform(torch.nn.Module):
    """Zero logits: every token costs ln V nats."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab, self.w = vocab, torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids):
        from types import SimpleNamespace

        return SimpleNamespace(logits=torch.zeros(*input_ids.shape, self.vocab) + self.w)


def test_bits_per_byte_formula():
    lengths = torch.tensor([0, 1, 2, 3])  # id 0 is special (no bytes)
    batch = torch.tensor([[1, 2, 3, 0, 2, 1]])  # input 1,2,3,0,2 -> targets 2,3,0,2,1
    res = evaluate_model(_Uniform(4), {"s": [batch]}, lengths)["s"]
    assert res["loss"] == pytest.approx(math.log(4)) and res["tokens"] == 5
    assert res["bytes"] == 2 + 3 + 0 + 2 + 1
    assert res["bpb"] == pytest.approx(4 * math.log(4) / (math.log(2) * 8))  # special target left out


def test_eval_hook(inspect_run):  # noqa: F811
    meta = json.loads((checkpoint(inspect_run, 6) / "meta.json").read_text())
    hook = EvalHook(meta["data_dir"], _tokenizer(inspect_run), seq_len=64, micro_batch_size=2, max_batches=2,
                    every=3)
    assert [s for s in range(1, 10) if hook.due(s)] == [3, 6, 9]
    from training.inspection.models import load_model

    model, _, _ = load_model(checkpoint(inspect_run, 6))
    model.train()
    out = hook(model)
    assert model.training  # the hook puts the model back as it found it
    assert out["val_loss"] == pytest.approx(read_metrics(inspect_run)[6]["val_loss"], abs=1e-5)
    assert set(out["val_bpb"]) == set(out["val_loss"])


def test_eval_cli_export_and_run(inspect_run, inspect_export, tmp_path, capsys):  # noqa: F811
    data = json.loads((checkpoint(inspect_run, 6) / "meta.json").read_text())["data_dir"]
    out = tmp_path / "eval.json"
    assert eval_main([str(inspect_run), str(inspect_export), "--data", data, "--seq-len", "64", "--json", str(out),
                      "--device", "cpu"]) == 0
    table = capsys.readouterr().out
    assert "| tiny-run@2 | 2 |" in table and "| tiny-6 | - |" in table
    results = json.loads(out.read_text())
    assert [r["step"] for r in results] == [2, 4, 6, None]
    # the export holds step 6 in bf16: close to the fp32 checkpoint, not identical
    src = next(iter(results[2]["sources"]))
    assert results[3]["sources"][src]["loss"] == pytest.approx(results[2]["sources"][src]["loss"], abs=0.05)


def test_eval_refusals(inspect_run, inspect_export, tmp_path, capsys):  # noqa: F811
    (tmp_path / "empty").mkdir()
    assert eval_main([str(tmp_path / "empty")]) == 2
    assert f"{tmp_path / 'empty'}: neither an exported model (no config.json) nor a training checkpoint" in \
        capsys.readouterr().err
    assert eval_main([str(inspect_export)]) == 2  # an export does not know its data
    assert "pass --data DIR" in capsys.readouterr().err
    with pytest.raises(InspectError, match="not a prepared data folder"):
        evaluate_path(inspect_export, data_dir=tmp_path)
    # a damaged checkpoint: named, with the part
    bad = tmp_path / "ckpt"
    import shutil

    shutil.copytree(checkpoint(inspect_run, 4), bad / "checkpoints" / "step-00000004")
    shard = next((bad / "checkpoints" / "step-00000004" / "model").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(InspectError, match="model weights in .* is damaged"):
        evaluate_path(bad / "checkpoints" / "step-00000004")


def test_lm_eval_task_files(inspect_run, inspect_export, tmp_path, capsys):  # noqa: F811
    from training.inspection.lm_eval_tasks import write_multiple_choice_task

    data = json.loads((checkpoint(inspect_run, 6) / "meta.json").read_text())["data_dir"]
    tasks = tmp_path / "tasks"
    assert eval_main([str(inspect_export), "--data", data, "--write-lm-eval-tasks", str(tasks)]) == 0
    cmd = capsys.readouterr().out
    assert "lm_eval --model hf" in cmd and f"--include_path {tasks}" in cmd
    for spec in tasks.glob("*.yaml"):
        task = yaml.safe_load(spec.read_text())
        assert task["output_type"] == "loglikelihood_rolling" and task["dataset_path"] == "json"
        rows = [json.loads(x) for x in open(task["dataset_kwargs"]["data_files"]["test"])]
        assert rows and all(r["text"].strip() for r in rows)
    mc = tmp_path / "mc.jsonl"
    mc.write_text('{"query": "2+2=", "choices": ["3", "4"], "gold": 1}\n{"query": "x", "choices": ["a"], "gold": 3}\n')
    with pytest.raises(InspectError, match=rf"{mc}:2: expected"):
        write_multiple_choice_task(mc, tasks, "mine")


def test_report(inspect_run, tmp_path):  # noqa: F811
    out = tmp_path / "rep" / "README.md"
    assert report_main([str(inspect_run), "--output", str(out), "--eval-last", "1"]) == 0
    md = out.read_text()
    for section in ("## Config", "## Throughput and MFU", "## Loss curve", "## Checkpoints", "## Evaluation"):
        assert section in md
    assert "- resumes at steps: 4" in md and "at 4: max_steps 4 -> 6" in md
    assert "| 2 | 512 |" in md and "| 6 | 1536 |" in md  # checkpoint rows: step, tokens
    logged = read_metrics(inspect_run)[6]["val_loss"]
    src, v = sorted(logged.items())[0]
    assert f"{src} {v:.4f}" in md  # the loop's number ...
    assert f"| tiny-run@6 | 6 | {src} | {v:.4f} |" in md  # ... and ours on the same windows agree
    assert "## Model vs counting" in md and "| source | model | bigram |" in md
    assert (out.parent / "readme_curves.png").stat().st_size > 10_000
    assert report_main([str(tmp_path / "nothing")]) == 2


def test_report_throughput_mfu_and_a_stopped_run(tmp_path):
    run = tmp_path / "gpu-run"
    run.mkdir()
    rows = [{"step": s, "loss": 5.0 - 0.1 * s, "lr": 3e-4, "grad_norm": 0.5, "tokens": s * 1024,
             "tok_s": 18000.0 + 100 * s, "tok_s_per_device": 9000.0 + 50 * s, "mfu": 0.40 + 0.002 * s,
             "peak_mem_gb": 20.5} for s in range(1, 11)]
    rows.append({"step": 11, "loss": float("nan"), "event": "stopped", "problem": "non-finite loss or gradients"})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert report_main([str(run), "--no-eval"]) == 0
    md = (run / "report" / "README.md").read_text()
    # medians over the second half of the steps that logged them (6..10): step 8's values
    assert "| 18,800 | 9,400 | 41.6% | 20.5 |" in md
    assert "tokens seen: 10,240" in md  # from the last record that has tokens
    assert "- stopped: step 11: non-finite loss or gradients" in md
    assert "No committed checkpoint" in md and "--no-eval" in md


def test_report_shows_the_plan_beside_the_measurement(tmp_path):
    """pretrain.py's plan_vs_measured record (written after step 10 on CUDA) becomes a table."""
    run = tmp_path / "gpu-run"
    run.mkdir()
    rows = [{"step": s, "loss": 5.0 - 0.1 * s, "lr": 3e-4, "tokens": s * 1024, "tok_s": 15000.0} for s in range(1, 13)]
    gib = 2**30
    rows.insert(10, {"step": 10, "event": "plan_vs_measured", "predicted_peak_allocated": 11 * gib,
                     "predicted_device_total": 13 * gib, "predicted_tokens_per_s": 15000.0,
                     "predicted_tokens_per_s_range": [12000.0, 17000.0], "measured_tokens_per_s": 16500.0,
                     "measured_max_memory_allocated": int(11.55 * gib), "measured_max_memory_reserved": 12 * gib})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert report_main([str(run), "--no-eval"]) == 0
    md = (run / "report" / "README.md").read_text()
    assert "## Plan against measured" in md
    assert "| 10 | peak allocated | 11.00 GiB | 11.55 GiB | 1.05 |" in md
    assert "| 10 | tokens/s, all GPUs | 15,000 | 16,500 | 1.10 | range 12,000-17,000: inside" in md
