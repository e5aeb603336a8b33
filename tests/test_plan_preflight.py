"""The preflight's decision (training/plan/preflight.py), driven directly: no GPU needed."""

from __future__ import annotations

import json
import types

import pytest

from training.plan.preflight import decide, preflight, profile_name

GIB = 2**30


def _plan_json(total_gib: float, vram_gib: float = 24.0) -> dict:
    return {"gpu": "RTX 4090", "world_size": 2, "fits": total_gib <= vram_gib,
            "memory": {"peak_allocated": int((total_gib - 2) * GIB), "predicted_device_total": int(total_gib * GIB),
                       "vram": int(vram_gib * GIB)},
            "time": {"tokens_per_s": 15000.0, "tokens_per_s_range": [12000.0, 18000.0], "mfu": 0.33}}


def test_a_fitting_plan_goes_ahead_with_its_line():
    go, line = decide(_plan_json(13.2), ignore=False)
    assert go and "13.20 of 24.00 GiB" in line and "15,000 tokens/s" in line


def test_a_plan_that_does_not_fit_is_refused_with_the_numbers_and_the_fit_command():
    go, line = decide(_plan_json(26.5), ignore=False)
    assert not go
    assert "26.50 of 24.00 GiB" in line and "2.50 GiB over" in line
    assert "genesis plan --fit" in line and "--ignore_plan" in line


def test_ignore_plan_goes_ahead_and_says_so():
    go, line = decide(_plan_json(26.5), ignore=True)
    assert go and "NOT to fit" in line and "going ahead" in line


def test_no_preflight_off_cuda():
    acc = types.SimpleNamespace(device=types.SimpleNamespace(type="cpu"))
    assert preflight(types.SimpleNamespace(), acc) is None


@pytest.mark.parametrize("device,memory,want", [
    ("NVIDIA GeForce RTX 4090", 24 * GIB, "RTX 4090"),
    ("NVIDIA H100 80GB HBM3", 80 * GIB, "H100 SXM"),
    ("NVIDIA H100 PCIe", 80 * GIB, "H100 PCIe"),
    ("NVIDIA A100-SXM4-40GB", 40 * GIB, "A100 40GB"),
    ("NVIDIA A100-SXM4-80GB", 80 * GIB, "A100 80GB"),
    ("Tesla T4", 16 * GIB, None),
])
def test_device_names_map_to_profiles(device, memory, want):
    assert profile_name(device, memory) == want


def test_the_step_10_record_puts_the_plan_beside_the_measurement(caplog):
    from training.metrics import is_side_record
    from training.plan.preflight import compare_line

    plan = _plan_json(13.2)
    with caplog.at_level("INFO", logger="training.pretrain"):
        rec = compare_line(plan, {"step": 10, "tok_s": 17000.0}, types.SimpleNamespace(type="cpu"))
    assert rec["event"] == "plan_vs_measured" and is_side_record(rec)  # off the step curves
    assert rec["predicted_device_total"] == plan["memory"]["predicted_device_total"]
    assert rec["measured_tokens_per_s"] == 17000.0 and rec["predicted_tokens_per_s_range"] == [12000.0, 18000.0]
    assert "17,000 measured" in caplog.text


def test_the_planner_child_gets_no_launcher_variables(monkeypatch):
    from training.plan.preflight import planner_env

    for key, value in {"LOCAL_RANK": "1", "MASTER_PORT": "29500", "ACCELERATE_USE_FSDP": "true",
                       "TORCHELASTIC_RUN_ID": "x", "WORLD_SIZE": "2", "RANK": "1", "HF_HUB_OFFLINE": "1"}.items():
        monkeypatch.setenv(key, value)
    env = planner_env()
    assert env["WORLD_SIZE"] == "1" and env["RANK"] == "0" and env["CUDA_VISIBLE_DEVICES"] == ""
    assert not {"LOCAL_RANK", "MASTER_PORT", "ACCELERATE_USE_FSDP", "TORCHELASTIC_RUN_ID"} & env.keys()
    assert env["HF_HUB_OFFLINE"] == "1"


def test_the_alignment_scripts_put_the_plan_beside_the_measurement_after_10_steps(tmp_path):
    """alignment/sft.py `plan_check`: a callback that times steps 1..11 and writes plan_vs_measured.json."""
    import time

    from alignment.sft import plan_check

    plan = _plan_json(13.2) | {"setting": {"workload": "sft"}}
    plan["time"]["step_s"] = 2.0
    callbacks = []
    trainer = types.SimpleNamespace(genesis_plan=plan, _total_train_tokens=0, add_callback=callbacks.append,
                                    accelerator=types.SimpleNamespace(device=types.SimpleNamespace(type="cpu"),
                                                                      is_main_process=True))
    plan_check(trainer, str(tmp_path / "out"))
    (cb,) = callbacks
    for step in range(1, 13):
        trainer._total_train_tokens += 4096
        cb.on_step_end(None, types.SimpleNamespace(global_step=step), None)
        time.sleep(0.01)
    rec = json.loads((tmp_path / "out" / "plan_vs_measured.json").read_text())
    assert rec["event"] == "plan_vs_measured" and rec["step"] == 11 and rec["stage"] == "sft"
    assert rec["predicted_tokens_per_s"] == 15000.0 and rec["predicted_step_s"] == 2.0
    assert 0 < rec["measured_step_s"] < 1 and rec["measured_tokens_per_s"] > 4096  # 10 steps of 4,096 tokens
    assert "measured_max_memory_allocated" not in rec  # CPU: no CUDA numbers


def test_no_alignment_plan_check_without_a_plan():
    from alignment.sft import plan_check

    callbacks = []
    plan_check(types.SimpleNamespace(genesis_plan=None, add_callback=callbacks.append), "unused")
    assert callbacks == []
