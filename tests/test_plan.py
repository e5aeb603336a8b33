"""`genesis plan` (training/plan/): fake-tensor traces, the closed form, extrapolation, bad input.

Every trace here runs in a child process: the fake process group is process-wide state.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "training" / "recipes" / "genesis-1b.yaml"
FSDP2 = ROOT / "accelerate_configs" / "fsdp_2gpu_pcie.yaml"
SINGLE = ROOT / "accelerate_configs" / "single_gpu.yaml"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}


def _py(code: str, timeout: int = 240) -> dict:
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _plan(*argv: str, timeout: int = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "genesis_cli", "plan", *argv], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=timeout)


CLOSED_FORM = """
import json
from genesis_hf import GenesisConfig, GenesisForCausalLM
import torch
from training.plan.trace import Setting, trace_model, extrapolate
cfg = GenesisConfig()  # the 1B
with torch.device("meta"):
    m = GenesisForCausalLM(cfg)
n = sum(p.numel() for p in m.parameters())
n_tensors = len(list(m.parameters()))
s = Setting(micro_batch=1, grad_accum=2, seq_len=64, world_size=2)  # model states do not depend on the batch
ex = extrapolate(trace_model(cfg, s, 2, private_mode=PRIVATE), trace_model(cfg, s, 3, private_mode=PRIVATE), 32)
opt = ex["optimizer_step"]["peak"]
norms = sum(p.numel() for p in m.parameters() if p.dim() < 2)
print(json.dumps({"n": n, "n_tensors": n_tensors, "norms": norms, "steady": ex["_steady"], "opt_grads": opt["grads"],
                  "opt_optimizer": opt["optimizer"]}))
"""


def test_model_states_of_the_1b_on_2_gpus_equal_the_closed_form():
    """Sharded fp32 params = 4N/2, fp32 gradients = 4N/2, AdamW = two moments of 4N/2 plus one fp32
    `step` per parameter tensor, exactly: DTensor's propagation runs in its own fake mode."""
    r = _py(CLOSED_FORM.replace("PRIVATE", "True"))
    n, shard = r["n"], r["n"] * 4 // 2
    assert n == 1_000_441_344
    assert r["steady"]["params_sharded"] == shard
    assert r["opt_grads"] == shard
    assert r["steady"]["optimizer"] == 2 * shard + 4 * r["n_tensors"]
    # During the step: the moments, the steps, and foreach's one intermediate of the decayed group's
    # size; no global-shape scratch (DTensor propagation charged there read 21 GiB for about 10).
    assert r["opt_optimizer"] == 2 * shard + 4 * r["n_tensors"] + (r["n"] - r["norms"]) * 4 // 2


def test_extrapolation_from_two_shallow_traces_is_exact():
    """Each segment's peak (and its categories) at 5 layers, from traces at 2 and 3 layers, equals a
    trace at 5 layers, for a model whose peak moves from the forward to the backward with depth."""
    code = """
import json
from genesis_hf import GenesisConfig
from training.plan.trace import Setting, trace_model, extrapolate
cfg = GenesisConfig(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2,
                    vocab_size=1024, num_hidden_layers=5)
out = {}
for ac in ("full", "none"):
    s = Setting(micro_batch=2, grad_accum=2, seq_len=64, world_size=2, activation_checkpointing=ac)
    ex = extrapolate(trace_model(cfg, s, 2), trace_model(cfg, s, 3), 5)
    full = trace_model(cfg, s, 5)
    out[ac] = {k: [ex[k]["peak_total"], full.segments[k].peak_total, ex[k]["allgather_bytes"],
                   full.segments[k].allgather_bytes] for k in full.segments}
print(json.dumps(out))
"""
    r = _py(code)
    for ac, segs in r.items():
        for name, (pred, real, ag_pred, ag_real) in segs.items():
            assert pred == real, (ac, name, pred, real)
            assert ag_pred == ag_real, (ac, name)


def test_plan_json_has_the_issue_keys_and_a_sane_1b_answer():
    out = _plan("--config", str(RECIPE), "--hardware", str(FSDP2), "--gpu", "RTX 4090", "--json", "--seq_len", "256")
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout)
    assert r["gpu"] == "RTX 4090" and r["world_size"] == 2
    for k in ("params", "grads", "optimizer", "activations", "temporary", "peak_allocated", "predicted_device_total", "vram"):
        assert isinstance(r["memory"][k], int), k
    assert isinstance(r["fits"], bool)
    for k in ("step_s", "tokens_per_s", "mfu", "exposed_comm_s"):
        assert r["time"][k] > 0 or k == "exposed_comm_s"
    lo, hi = r["time"]["tokens_per_s_range"]
    assert lo <= r["time"]["tokens_per_s"] <= hi
    assert r["memory"]["peak_allocated"] < r["memory"]["predicted_device_total"] <= r["memory"]["vram"]


def test_gpu_list_and_unknown_gpu_lists_the_known_ones():
    out = _plan("--gpu", "list", timeout=60)
    assert out.returncode == 0
    for name in ("RTX 3090", "RTX 4090", "RTX 4080", "RTX 4060 Ti 16 GB", "RTX 5090", "A100 40GB", "A100 80GB", "L4",
                 "L40S", "H100 SXM", "H100 PCIe", "H100 NVL", "H200"):
        assert name in out.stdout, name
    bad = _plan("--config", str(RECIPE), "--hardware", str(FSDP2), "--gpu", "GTX 9999", timeout=60)
    assert bad.returncode == 2
    assert "GTX 9999" in bad.stderr and "RTX 4090" in bad.stderr and "H100 SXM" in bad.stderr


@pytest.mark.parametrize("argv,needle", [
    (["--no_such_key", "3"], "--no_such_key"),
    (["--num_processes", "2"], "num_processes"),
])
def test_bad_recipe_key_and_world_size_are_refused_by_name(argv, needle, tmp_path):
    hw = SINGLE if argv[0] == "--num_processes" else FSDP2
    out = _plan("--config", str(RECIPE), "--hardware", str(hw), "--gpu", "RTX 4090", *argv, timeout=60)
    assert out.returncode == 2
    assert needle in out.stderr


def test_unknown_key_inside_a_recipe_is_refused(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE.read_text() + "\nmicro_batch: 4\n")
    out = _plan("--config", str(recipe), "--hardware", str(FSDP2), "--gpu", "RTX 4090", timeout=60)
    assert out.returncode == 2 and "micro_batch" in out.stderr


def test_unlisted_card_from_vram_and_tflops():
    from training.plan.cli import resolve_gpu

    prof = resolve_gpu("my card", 20.0, 120.0, None)
    assert prof.vram_gib == 20.0 and prof.bf16_tflops == 120.0
    assert resolve_gpu("4090", None, None, None).name == "RTX 4090"


def test_fit_with_no_setting_that_fits_says_so_with_the_smallest_peak():
    out = _plan("--config", str(ROOT / "training" / "recipes" / "debug.yaml"), "--hardware", str(FSDP2), "--gpu", "RTX 4090",
                "--vram-gb", "0.001", "--fit", timeout=400)
    assert out.returncode == 1, out.stderr[-2000:]
    assert "NO setting fits" in out.stdout and "smallest predicted card total" in out.stdout
    assert "would need a card of" in out.stdout


def test_fit_picks_the_fastest_setting_that_fits_and_keeps_the_tokens_per_step():
    """One GPU, 2 sequences per step: micro-batch 1 x 2 or 2 x 1, under each checkpointing policy. The
    best is the fastest of those that fit, printed as flags whose product keeps the recipe's sequences;
    the next three follow in falling order with why they lost."""
    out = _plan("--config", str(ROOT / "training" / "recipes" / "debug.yaml"), "--hardware", str(SINGLE), "--gpu",
                "RTX 4090", "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1", "--fit", "--json",
                timeout=400)
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout)
    best, rest = r["best"], r["next"]
    assert best["fits"] and best["memory"]["predicted_device_total"] <= best["memory"]["vram"] * (1 - r["margin"])
    s = best["setting"]
    assert s["per_device_train_batch_size"] * s["gradient_accumulation_steps"] == 2
    assert f"--per_device_train_batch_size {s['per_device_train_batch_size']}" in best["flags"]
    assert len(rest) == 3 and all("of the best's tokens/s" in n["lost_because"] for n in rest)
    speeds = [best["time"]["tokens_per_s"]] + [n["time"]["tokens_per_s"] for n in rest]
    assert speeds == sorted(speeds, reverse=True)
