"""FLOPs per token, peak FLOPs table, MFU, secret scrubbing, metrics.jsonl."""

from __future__ import annotations

import json

import pytest
import torch

from training.metrics import (
    PEAK_BF16_TFLOPS,
    MetricsLogger,
    flops_per_token,
    matmul_params,
    mfu,
    peak_flops,
    scrub,
)


def test_flops_per_token_of_the_1b_model_matches_performance_md():
    from genesis_hf import GenesisConfig, GenesisForCausalLM

    config = GenesisConfig()
    with torch.device("meta"):  # no memory: only shapes are needed
        model = GenesisForCausalLM(config)
    assert sum(p.numel() for p in model.parameters()) == 1_000_441_344
    n = matmul_params(model)
    assert n == 1_000_341_504  # tied head counted once, norms excluded
    assert flops_per_token(config, 2048, n) == pytest.approx(7.21e9, rel=1e-3)


def test_peak_table_and_mfu():
    names = dict(PEAK_BF16_TFLOPS)
    assert names["RTX 4090"] == 165.2 and names["RTX 3090"] == 71.0 and names["A100"] == 312.0
    assert names["H100"] == 989.0 and names["H100 PCIe"] == 756.0 and names["H200"] == 989.0
    assert names["H100 NVL"] == 835.0 and names["H200 NVL"] == 835.0
    assert peak_flops("cpu") == (None, "CPU: no MFU")
    assert mfu(9450, 7.21e9, None) is None
    # The seed: 9,450 tok/s per RTX 4090 -> ~41% MFU.
    assert mfu(9450, 7.21e9, 165.2e12) == pytest.approx(0.412, abs=0.002)


# torch.cuda.get_device_name() strings -> peak dense bf16 TFLOP/s (PERFORMANCE.md; NVL parts: NVIDIA's
# sheets, 1,671 TFLOP/s with sparsity = 835 dense). None: not in the table, so no MFU is reported
# rather than a guessed one.
KNOWN_NAMES = [
    ("NVIDIA H100 80GB HBM3", 989.0),
    ("NVIDIA H100 PCIe", 756.0),
    ("NVIDIA H100 NVL", 835.0),  # was 989: the substring "H100" captured it
    ("NVIDIA H200", 989.0),
    ("NVIDIA H200 NVL", 835.0),  # was 989: the substring "H200" captured it
    ("NVIDIA GeForce RTX 4090", 165.2),
    ("NVIDIA GeForce RTX 3090", 71.0),
    ("NVIDIA A100-SXM4-80GB", 312.0),
    ("NVIDIA Mystery 9000", None),
]


@pytest.mark.parametrize("name,tflops", KNOWN_NAMES)
def test_peak_flops_of_known_device_names(monkeypatch, name, tflops):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: name)
    peak, note = peak_flops(torch.device("cuda", 0))
    if tflops is None:
        assert peak is None and note == f"{name}: unknown GPU, peak FLOPs not in training/metrics.py, MFU not reported"
    else:
        assert peak == pytest.approx(tflops * 1e12) and note == f"{name}: peak {tflops} TFLOP/s bf16"


def test_the_longest_key_wins_whatever_the_table_order(monkeypatch):
    from training import metrics

    monkeypatch.setattr(metrics, "PEAK_BF16_TFLOPS", list(reversed(metrics.PEAK_BF16_TFLOPS)))
    assert metrics.peak_tflops_for("NVIDIA H100 NVL") == 835.0
    assert metrics.peak_tflops_for("NVIDIA H100 PCIe") == 756.0
    assert metrics.peak_tflops_for("NVIDIA H200 NVL") == 835.0


def test_unknown_gpu_is_said_not_guessed(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "NVIDIA Mystery 9000")
    peak, note = peak_flops(torch.device("cuda", 0))
    assert peak is None and "unknown GPU" in note
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "NVIDIA H100 PCIe")
    assert peak_flops(torch.device("cuda", 0))[0] == 756e12
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "NVIDIA H100 80GB HBM3")
    assert peak_flops(torch.device("cuda", 0))[0] == 989e12


def test_scrub_drops_secrets(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_SENTINELsentinelSENTINEL")
    cfg = {"learning_rate": 1e-4, "hub_token": "x", "wandb_api_key": "y", "tokenizer_dir": "runs/tok",
           "note": "hf_SENTINELsentinelSENTINEL", "nested": {"password": "p", "tokens_per_step": 5}}
    out = scrub(cfg)
    assert out == {"learning_rate": 1e-4, "tokenizer_dir": "runs/tok", "nested": {"tokens_per_step": 5}}


def test_metrics_jsonl_one_object_per_step(tmp_path):
    log = MetricsLogger(tmp_path, enabled=True)
    log.log({"step": 1, "loss": 2.5, "tokens_by_source": {"a": 3}})
    log.log({"step": 2, "loss": 2.25})
    log.close()
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2] and lines[0]["tokens_by_source"] == {"a": 3}
    MetricsLogger(tmp_path / "other", enabled=False).log({"step": 1})  # other ranks: no-op
    assert not (tmp_path / "other").exists()
