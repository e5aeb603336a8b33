"""`genesis plan calibrate` (training/plan/calibrate.py): recovers known constants from rows the planner
itself made with them, writes them into a copy of gpus.yaml that the loader reads back (comments kept),
and refuses bad input by name. Traces run in child processes (the fake process group is process-wide)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _pretrain_fixtures import embedded_data  # noqa: E402,F401  (fixture)

ROOT = Path(__file__).resolve().parents[1]
TABLE = ROOT / "training" / "plan" / "gpus.yaml"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
# A card slow enough that the debug model's matmuls, not the launch floor, set the step time.
TEST_CARD = """  Test Card:
    vram_gib: 8.0
    bf16_tflops: 0.05
    mem_gbps: 1000.0
    link: pcie_no_p2p
    source: a test card whose matmuls set the step time of training/recipes/debug.yaml
"""
# The "measurements": the planner's own prediction under known constants, per row.
TRUE = {"matmul": (0.45, 0.55), "reserve": (0.12, 0.10), "context_gib": 0.5, "nccl_gib": 0.25}
MAKE_ROWS = """
import json, sys
from dataclasses import replace
from training.plan.cli import plan, read_hardware, read_recipe, setting_for
from training.plan.profiles import GIB, load_table, lookup
prof = lookup("Test Card", load_table(sys.argv[1]))
true = json.loads(sys.argv[2])
rows = []
for i, (world, mb) in enumerate(((1, 2), (2, 4))):
    overrides = ["--per_device_train_batch_size", str(mb), "--gradient_accumulation_steps", "1", "--max_steps", "14"]
    hw = read_hardware("accelerate_configs/fsdp_2gpu_pcie.yaml", world)
    args, cfg = read_recipe("training/recipes/debug.yaml", overrides)
    p = plan(cfg, setting_for(args, hw), replace(prof, matmul_efficiency=(true["matmul"][i],) * 2))
    alloc = p.memory["peak_allocated"]
    reserved = int(alloc * (1 + true["reserve"][i]))
    card = reserved + int((true["context_gib"] + (true["nccl_gib"] if world > 1 else 0.0)) * GIB)
    rows.append({"gpu_name": "Test Card 8GB", "profile": "Test Card", "recipe": "training/recipes/debug.yaml",
                 "overrides": overrides, "world_size": world, "accelerate_config": "accelerate_configs/fsdp_2gpu_pcie.yaml",
                 "plan": p.as_json(), "measured": {"tokens_per_s": p.time["tokens_per_s"], "max_memory_allocated": alloc,
                                                   "max_memory_reserved": reserved, "nvml_process_used": card}})
print(json.dumps({"date": "2026-12-07", "commit": "0000000", "dry_run": False, "rows": rows}))
"""


def _run(*argv: str, timeout: int = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *argv], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)


def _calibrate(*argv: str) -> subprocess.CompletedProcess:
    return _run("-m", "genesis_cli", "plan", "calibrate", *argv)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """(results file, a copy of gpus.yaml with the test card) for rows made with TRUE."""
    tmp = tmp_path_factory.mktemp("calibrate")
    table = tmp / "gpus.yaml"
    table.write_text(TABLE.read_text(encoding="utf-8").rstrip("\n") + "\n" + TEST_CARD, encoding="utf-8")
    out = _run("-c", MAKE_ROWS, str(table), json.dumps(TRUE))
    assert out.returncode == 0, out.stderr[-3000:]
    results = tmp / "plan_calibration-test.json"
    results.write_text(out.stdout.strip().splitlines()[-1], encoding="utf-8")
    return results, table


def test_recovers_known_constants_and_writes_them_back_with_the_comments_kept(synthetic):
    from training.plan.profiles import GIB, load_table, lookup

    results, table = synthetic
    from training.plan.calibrate import write_profile

    before = table.read_text(encoding="utf-8")
    wrote = _calibrate("--from", str(results), "--table", str(table), "--write")
    assert wrote.returncode == 0, wrote.stderr[-3000:]
    assert "memory_efficiency: not fitted" in wrote.stdout
    assert "calibrate Test Card from" in wrote.stdout and "micro-batch 2, 4 on 1/2 rank(s) (debug.yaml)" in wrote.stdout
    assert "wrote matmul_efficiency, allocator_reserve_fraction, cuda_context_gib, nccl_buffers_gib" in wrote.stdout
    first = table.read_text(encoding="utf-8")
    # Writing again replaces the earlier calibration block of the card.
    write_profile(table, "Test Card", {"cuda_context_gib": 9.0}, {"from": "elsewhere"})
    assert lookup("Test Card", load_table(table)).cuda_context_gib == 9.0
    assert lookup("Test Card", load_table(table)).allocator_reserve_fraction == 0.08  # the default again
    table.write_text(first, encoding="utf-8")
    text = table.read_text(encoding="utf-8")
    assert text.count("\n    # >>> calibrated by") == 1 and text.count("\n    # <<< calibrated\n") == 1
    # Every line of the original file is still there, in order (comments included).
    lines = iter(text.splitlines())
    assert all(any(old == new for new in lines) for old in before.splitlines())
    card = lookup("Test Card", load_table(table))
    lo, hi = card.matmul_efficiency
    assert lo == pytest.approx(min(TRUE["matmul"]), rel=0.01) and hi == pytest.approx(max(TRUE["matmul"]), rel=0.01)
    assert card.allocator_reserve_fraction == pytest.approx(max(TRUE["reserve"]), rel=0.01)
    assert card.cuda_context_gib == pytest.approx(TRUE["context_gib"], rel=0.01)
    assert card.nccl_buffers_gib == pytest.approx(TRUE["nccl_gib"], rel=0.01)
    assert card.memory_efficiency == lookup("RTX 4090", load_table(TABLE)).memory_efficiency  # not fitted
    assert card.extra["calibrated"]["from"] == str(results) and card.extra["calibrated"]["commit"] == "0000000"
    # The other cards are read as before.
    for name in ("RTX 4090", "H100 SXM", "RTX 4060 Ti 16 GB"):
        assert lookup(name, load_table(table)) == lookup(name, load_table(TABLE))
    assert card.overhead_bytes(2) == pytest.approx(0.75 * GIB, rel=0.01)


def _broken(results: Path, tmp_path: Path, edit) -> Path:
    data = json.loads(results.read_text())
    edit(data)
    out = tmp_path / "broken.json"
    out.write_text(json.dumps(data))
    return out


@pytest.mark.parametrize("edit,needle", [
    (lambda d: d["rows"][1]["measured"].pop("max_memory_reserved"), "rows[1]: missing field 'measured.max_memory_reserved'"),
    (lambda d: d["rows"][0].pop("overrides"), "rows[0]: missing field 'overrides'"),
    (lambda d: d.pop("commit"), "missing field 'commit'"),
])
def test_a_row_missing_a_field_is_refused_naming_file_and_field(synthetic, tmp_path, edit, needle):
    results, table = synthetic
    bad = _broken(results, tmp_path, edit)
    out = _calibrate("--from", str(bad), "--table", str(table))
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.strip().splitlines() == [f"genesis plan calibrate: {bad}: {needle}"]


def test_missing_or_malformed_file_and_unknown_gpu_are_refused(synthetic, tmp_path):
    results, table = synthetic
    out = _calibrate("--from", str(tmp_path / "nope.json"))
    assert out.returncode == 2 and "nope.json: file not found" in out.stderr
    (tmp_path / "bad.json").write_text("{not json")
    out = _calibrate("--from", str(tmp_path / "bad.json"))
    assert out.returncode == 2 and "bad.json: not JSON" in out.stderr
    out = _calibrate("--from", str(results), "--table", str(table), "--gpu", "GTX 9999")
    assert out.returncode == 2 and "GTX 9999" in out.stderr and "RTX 4090" in out.stderr and "Test Card" in out.stderr


def test_dry_run_rows_are_never_written(synthetic, tmp_path):
    results, table = synthetic
    dry = _broken(results, tmp_path, lambda d: d.update(dry_run=True))
    before = table.read_text()
    out = _calibrate("--from", str(dry), "--table", str(table), "--write")
    assert out.returncode == 2 and "dry-run rows (CPU): --write refused" in out.stderr
    assert table.read_text() == before


@pytest.mark.distributed
def test_gpu_check_calibrate_dry_run_writes_the_results_file_and_the_table(tmp_path, monkeypatch, embedded_data):  # noqa: F811
    """benchmarks/gpu_check.py --calibrate --dry-run: pretrain.py on 2 CPU ranks beside `genesis plan --json`
    of the same flags; a results file that calibrate reads, and its own section of the report."""
    from benchmarks import gpu_check
    from training.plan.calibrate import read_results

    monkeypatch.setattr(gpu_check, "prepare_data", lambda root, vocab: embedded_data)  # the tiny mixture: seconds
    monkeypatch.setattr(gpu_check, "CALIBRATION_BATCHES", (2, 4))  # the GPU run's third launch adds only time here
    report, results = tmp_path / "benchmarks.md", tmp_path / "plan_calibration-dry.json"
    assert gpu_check.main(["--dry-run", "--calibrate", "--data-root", str(tmp_path / "unused"), "--work-dir",
                           str(tmp_path / "work"), "--report", str(report), "--results", str(results)]) == 0
    data = read_results(results)  # every field `genesis plan calibrate` reads is there
    assert data["dry_run"] is True and data["failed"] == [] and len(data["rows"]) == 2
    for row, mb in zip(data["rows"], (2, 4)):
        assert row["recipe"] == "training/recipes/debug.yaml" and row["world_size"] == 2
        assert row["accelerate_config"] == "accelerate_configs/fsdp_2gpu_pcie.yaml"
        over = row["overrides"]
        assert over[over.index("--per_device_train_batch_size") + 1] == str(mb) and "--max_steps" in over
        assert row["plan"]["setting"]["per_device_train_batch_size"] == mb and row["plan"]["world_size"] == 2
        assert row["plan"]["memory"]["peak_allocated"] > 0 and row["plan"]["time"]["tokens_per_s"] > 0
        m = row["measured"]
        assert m["tokens_per_s"] > 0 and m["tokens_per_step"] == mb * 64 * 2 and m["steps_timed"] == [3, 4]
        assert m["max_memory_allocated"] is None and m["nvml_process_used"] is None  # CPU: absent, not zero
    text = report.read_text()
    assert "<!-- plan_calibration:start -->" in text and "<!-- gpu_check:start -->" not in text
    table = [line for line in text.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| micro-batch | peak allocated, GiB: plan / measured (ratio) |") and len(table) == 4
    assert table[2].startswith("| 2 x 64 | ") and table[3].startswith("| 4 x 64 | ") and "/ n/a (n/a)" in table[2]
    assert f"`genesis plan calibrate --from {results}`" in text


def test_gpu_rows_take_memory_from_plan_vs_measured_and_the_card_from_nvml(monkeypatch):
    """The CUDA-only part of a row, on CPU: the preflight's record gives allocated and reserved, NVML's
    per-process figure (the check's own process left out) the card total, else the device less idle."""
    from benchmarks import _plan_calibration as cal
    from benchmarks._gpu_watch import GpuSnapshot

    gib = 2**30
    recs = [{"step": s, "loss": 5.0, "tok_s": t, "peak_mem_gb": 30.0} for s, t in ((1, 100.0), (2, 900.0), (3, 1000.0),
                                                                                      (4, 1200.0), (5, 1100.0))]
    recs.append({"step": 5, "event": "plan_vs_measured", "measured_max_memory_allocated": 31 * gib,
                 "measured_max_memory_reserved": 33 * gib})
    samples = iter([{0: {4242: 20 * gib, os.getpid(): gib}}, {0: {4242: 34 * gib, os.getpid(): gib}}])
    monkeypatch.setattr(cal, "_process_memory", lambda: next(samples))
    watch = cal.CardWatch((0,))
    watch.start(GpuSnapshot({0: 2 * gib}, {0: set()}, "pynvml"))
    for used in (23, 37):
        watch.add(GpuSnapshot({0: used * gib}, {0: {4242}}, "pynvml"))
    m = cal.measured(recs, 8192, watch, 12.0)
    assert m["tokens_per_s"] == 1100.0 and m["steps_timed"] == [3, 4, 5] and m["step_s"] == pytest.approx(8192 / 1100)
    assert m["max_memory_allocated"] == 31 * gib and m["max_memory_reserved"] == 33 * gib
    assert m["nvml_process_used"] == 34 * gib and m["nvml_how"].startswith("the run's processes")
    # No per-process figures (a container's NVML): the device's memory less what it held idle.
    monkeypatch.setattr(cal, "_process_memory", lambda: {0: {4242: None}})
    watch = cal.CardWatch((0,))
    watch.start(GpuSnapshot({0: 2 * gib}, {0: set()}, "nvidia-smi"))
    watch.add(GpuSnapshot({0: 37 * gib}, {0: {4242}}, "nvidia-smi"))
    m = cal.measured(recs, 8192, watch, 12.0)
    assert m["nvml_process_used"] == 35 * gib and m["nvml_how"].startswith("device memory in use less the idle")
    plan = {"setting": {"per_device_train_batch_size": 4, "seq_len": 2048},
            "memory": {"peak_allocated": 31 * gib, "predicted_device_total": 36 * gib},
            "time": {"tokens_per_s": 1320.0, "tokens_per_s_range": [1000.0, 1500.0]}}
    row = cal.table([{"plan": plan, "measured": m}], reserve_fraction=0.08)[2]
    assert row == ("| 4 x 2048 | 31.00 / 31.00 (1.00) | 33.48 / 33.00 (1.01) | 36.00 / 35.00 (1.03) "
                   "| 1,320 [1,000-1,500] / 1,100 (1.20) | 7.447 |")


def test_gpu_list_marks_a_calibrated_card(tmp_path, monkeypatch):
    from training.plan import profiles
    from training.plan.calibrate import write_profile

    table = tmp_path / "gpus.yaml"
    table.write_text(TABLE.read_text(encoding="utf-8"), encoding="utf-8")
    write_profile(table, "RTX 4090", {"matmul_efficiency": [0.4, 0.5], "cuda_context_gib": 0.45},
                  {"from": "benchmarks/results/plan_calibration-nvidia-geforce-rtx-4090.json", "date": "2026-12-07"})
    monkeypatch.setattr(profiles, "TABLE", table)
    profiles._table.cache_clear()
    try:
        text = profiles.table_text()
    finally:
        monkeypatch.undo()
        profiles._table.cache_clear()
    assert "\nRTX 4090 *" in text and "\nRTX 3090 " in text and "RTX 3090 *" not in text
    assert ("* RTX 4090: calibrated (genesis plan calibrate) from benchmarks/results/plan_calibration-nvidia-geforce-"
            "rtx-4090.json on 2026-12-07: matmul [0.4, 0.5], allocator reserve 8.0%, CUDA context 0.45 GiB") in text
    assert "(every card not marked *): matmul [0.55, 0.78]" in text
