"""benchmarks/gpu_check.py, the one-command GPU check, runs end to end on CPU with --dry-run
(reduced shapes; pretrain.py through the FSDP file on 2 gloo ranks), so it is ready when a GPU is."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

pytestmark = pytest.mark.distributed


def test_dry_run_measures_everything_and_resumes_exactly(tmp_path, capsys):
    from benchmarks import gpu_check

    report = tmp_path / "benchmarks.md"
    assert gpu_check.main(["--dry-run", "--steps", "1", "--data-root", str(tmp_path / "data"),
                           "--report", str(report)]) == 0
    text = report.read_text()
    for row in ("| Genesis | eager |", "| Genesis | compiled |", "| Llama (transformers) | eager |",
                "| Llama (transformers) | compiled |"):
        assert row in text, text
    assert "Genesis compiled / eager:" in text
    assert "GenesisDecoderLayer x2" in text and "activation checkpointing on 2 layers" in text
    assert "steps 11-20 after the resume equal the straight run's (loss and grad norm): **True**" in text
    assert "saves (sharded DCP + sha256 manifest + commit), training stall / until commit: async step 10: " in text
    assert "; sync step 20: " in text


def test_refuses_without_a_gpu_unless_dry_run(tmp_path):
    from benchmarks import gpu_check

    if gpu_check.torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(SystemExit):
        gpu_check.main(["--data-root", str(tmp_path / "data"), "--skip-model"])
