"""benchmarks/gpu_check.py, the one-command GPU check, runs end to end on CPU with --dry-run
(reduced shapes; pretrain.py through the FSDP file on 2 gloo ranks), so it is ready when a GPU is."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _pretrain_fixtures import embedded_data  # noqa: E402,F401  (fixture)

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return tmp_path_factory.mktemp("gpu_check") / "data"  # built by the first dry run, verified by the next


def test_dry_run_measures_everything_and_resumes_exactly(tmp_path, capsys, monkeypatch, data_root):
    from benchmarks import gpu_check

    work = tmp_path / "work"
    present = []  # the checkpoints on disk as each pretrain.py run starts
    real_run = gpu_check.run_pretrain

    def run_pretrain(*args, **kwargs):
        present.append(sorted(p.name for p in work.rglob("step-*")))
        return real_run(*args, **kwargs)

    monkeypatch.setattr(gpu_check, "run_pretrain", run_pretrain)
    report = tmp_path / "benchmarks.md"
    assert gpu_check.main(["--dry-run", "--steps", "1", "--data-root", str(data_root), "--work-dir", str(work),
                           "--report", str(report)]) == 0
    text = report.read_text()
    for row in ("| Genesis | eager |", "| Genesis | compiled |", "| Llama (transformers) | eager |",
                "| Llama (transformers) | compiled |", "| Genesis | eager, deterministic |"):
        assert row in text, text
    assert "Genesis compiled / eager:" in text
    assert "Deterministic algorithms (bit-exact resumes) / default, Genesis eager: **" in text
    assert "GenesisDecoderLayer x2" in text and "activation checkpointing on 2 layers" in text
    assert "- deterministic: False (torch.are_deterministic_algorithms_enabled()=False" in text
    # CPU is deterministic: the dry run passes the GPU rule and is bit-exact as well.
    assert ("resume check, steps 11-20 against the straight run: **pass** (rule: step 11's loss bit-equal; then "
            "loss within 0.001 and grad norm within 0.01 relative") in text
    assert "bit-exact: **True**" in text
    assert "saves (sharded DCP + sha256 manifest + commit), training stall / until commit: async step 10: " in text
    assert "; sync step 20: " in text
    # Room: the straight run's step 20 is gone before the resumed run writes its own; nothing is left after.
    assert present == [[], ["step-00000010"]]
    assert list(work.iterdir()) == []
    assert "room: disk at " in capsys.readouterr().out


def test_dry_run_on_two_ranks_prints_one_table(tmp_path, monkeypatch, embedded_data):  # noqa: F811
    from benchmarks import gpu_check

    monkeypatch.setattr(gpu_check, "prepare_data", lambda root, vocab: embedded_data)  # the tiny mixture: seconds
    report = tmp_path / "benchmarks.md"
    assert gpu_check.main(["--dry-run", "--ranks", "2", "--data-root", str(tmp_path / "unused"), "--work-dir",
                           str(tmp_path / "work"), "--report", str(report)]) == 0
    text = report.read_text()
    assert "<!-- gpu_check_ranks2:start -->" in text and "<!-- gpu_check:start -->" not in text
    table = [line for line in text.splitlines() if line.startswith("| ")]
    assert table[0] == "| what | measured |" and len(table) >= 8, text
    assert "| run | 2 ranks, 6 steps, async saves at step 4 and 6;" in text
    assert re.search(r"\| workers \| rank 0: pid \d+ \(GPU 0\), rank 1: pid \d+ \(GPU 1\) \|", text), text
    assert "| each rank's context on its own GPU only | not checked: dry run: no GPU to watch |" in text
    assert re.search(r"\| saves: training stall / until commit \(size\) \| step 4: [0-9.]+ s / [0-9.]+ s \([0-9.]+ GiB\), "
                     r"step 6: ", text), text
    assert "| async staging planned for this host (checkpoint_plan) |" in text


def test_too_little_room_is_one_message_before_anything_is_built(tmp_path, monkeypatch):
    from benchmarks import _gpu_rules, gpu_check

    usage = _gpu_rules.shutil.disk_usage(tmp_path)
    monkeypatch.setattr(_gpu_rules.shutil, "disk_usage", lambda path: usage._replace(free=2**20))
    monkeypatch.setattr(_gpu_rules, "host_available", lambda: 2**20)
    with pytest.raises(SystemExit) as stop:
        gpu_check.main(["--dry-run", "--data-root", str(tmp_path / "data"), "--work-dir", str(tmp_path)])
    msg = str(stop.value.code)
    assert msg.startswith(f"gpu_check: not enough room: disk at {tmp_path}: 0.0 GiB free, needs 0.")
    assert "host memory: 0.0 GiB available, needs 0.5 GiB" in msg
    assert "or pass --work-dir on a larger disk" in msg and "of host memory" in msg
    assert not (tmp_path / "data").exists()


def test_the_1b_needs_two_checkpoints_of_disk_and_the_rounded_pinned_bytes():
    from benchmarks._gpu_rules import pinned_bytes
    from genesis_hf import GenesisConfig

    ckpt, per_rank = pinned_bytes(GenesisConfig(), ranks=2)
    assert ckpt == 12 * 1_000_441_344  # fp32 weights + AdamW's two moments
    assert round(per_rank / 2**30, 2) == 7.50  # 5.59 GiB of shards, each block rounded up to a power of two
    assert round(pinned_bytes(GenesisConfig(), ranks=1)[1] / 2**30, 2) == 15.00


def test_refuses_without_a_gpu_unless_dry_run(tmp_path):
    from benchmarks import gpu_check

    if gpu_check.torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(SystemExit):
        gpu_check.main(["--data-root", str(tmp_path / "data"), "--skip-model"])
