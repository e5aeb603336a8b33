"""Accelerate's FSDP2 path, driven by accelerate_configs/fsdp_2gpu_pcie.yaml itself, on 2 gloo CPU ranks.

The REAL `accelerate launch --config_file accelerate_configs/fsdp_2gpu_pcie.yaml training/pretrain.py`
runs; tests/fsdp_on_cpu/sitecustomize.py only stops Accelerate from falling back to MULTI_CPU
(see tests/_fsdp_cpu.py). Everything else (auto-wrap on GenesisDecoderLayer, activation
checkpointing, cpu_ram_efficient_loading, bf16, sharded DCP state) comes from the file.
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch
from _fsdp_cpu import FSDP_CONFIG, fsdp_env, fsdp_file
from _pretrain_fixtures import embedded_data  # noqa: F401  (fixture)
from _pretrain_run import REPO, ok, read_metrics, run_pretrain

pytestmark = pytest.mark.distributed

N = 6
ARGS = ("--max_steps", str(N), "--save_steps", "2", "--logging_steps", "1", "--resume", "auto")


@pytest.fixture(scope="module")
def straight(tmp_path_factory, embedded_data):  # noqa: F811
    out = tmp_path_factory.mktemp("fsdp-straight")
    res = ok(run_pretrain(out, embedded_data, *ARGS, config=FSDP_CONFIG,
                          env=fsdp_env({"GENESIS_TEST_PROBE": str(out / "probe.pt")})))
    return out, res


def test_the_file_is_what_ran(straight):
    """Auto-wrap by class, activation checkpointing, bf16 and the loading/state-dict settings of
    the accelerate config are what `prepare` did (the start-up line), on every unit."""
    out, res = straight
    cfg = fsdp_file()
    fsdp = cfg["fsdp_config"]
    assert cfg["distributed_type"] == "FSDP" and cfg["mixed_precision"] == "bf16" and fsdp["fsdp_version"] == 2
    line = next(ln for ln in res.stderr.splitlines() if "FSDP2: " in ln)
    layers = 2  # debug.yaml
    assert f"{fsdp['fsdp_transformer_layer_cls_to_wrap']} x{layers}" in line, line
    assert f"activation checkpointing on {layers} layers" in line and fsdp["fsdp_activation_checkpointing"]
    assert "every unit: compute bfloat16, gradient reduce/accumulate float32, outputs as computed" in line
    assert f"cpu_ram_efficient_loading={fsdp['fsdp_cpu_ram_efficient_loading']}" in line
    assert f"state_dict_type={fsdp['fsdp_state_dict_type']}" in line
    assert "DistributedType.FSDP" in res.stderr
    # Sharded state: every rank wrote its own model and optimizer shards.
    ckpt = out / "checkpoints" / f"step-{N:08d}"
    for part in ("model", "optimizer"):
        assert sorted(p.name for p in (ckpt / part).glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]


def test_logged_loss_has_fp32_precision_under_bf16(straight):
    """Accelerate's default FSDP2 bf16 policy casts the model's outputs, the loss too, to bf16
    (3 significant digits). Ours leaves the fp32 loss alone: no logged loss is a bf16 value."""
    out, _ = straight
    losses = [r["loss"] for r in read_metrics(out).values()]
    assert len(losses) == N
    rounded = [x for x in losses if torch.tensor(x).bfloat16().item() == x]
    assert not rounded, f"bf16-rounded losses logged: {rounded}"


def test_kill_and_resume_under_fsdp_is_identical(straight, embedded_data, tmp_path):  # noqa: F811
    """SIGKILL every rank after step 3 (the last commit is step 2), `--resume auto`: the same
    per-step losses, grad norms and LRs as the straight run, bit for bit."""
    out = tmp_path / "killed"
    res = run_pretrain(out, embedded_data, *ARGS, config=FSDP_CONFIG, env=fsdp_env({"GENESIS_TEST_FAULTS": "kill@3"}))
    assert res.returncode != 0 and max(read_metrics(out)) == 3
    res = ok(run_pretrain(out, embedded_data, *ARGS, config=FSDP_CONFIG, env=fsdp_env()))
    assert "resume audit:" in res.stdout and "optimizer: restored" in res.stdout
    a, b = read_metrics(straight[0]), read_metrics(out)
    assert sorted(a) == sorted(b) == list(range(1, N + 1))
    for step in a:
        for key in ("loss", "grad_norm", "lr", "tokens"):
            assert a[step][key] == b[step][key], f"step {step}: {key} {a[step][key]!r} != {b[step][key]!r}"


def test_export_of_the_fsdp_checkpoint_gives_the_live_models_logits(straight, tmp_path):
    """`genesis export` of the last sharded checkpoint, loaded with from_pretrained, gives the
    logits the live FSDP model (bf16 compute from fp32 shards) gave at the end of training."""
    out, _ = straight
    dst = tmp_path / "export"
    subprocess.run([sys.executable, "-m", "genesis_cli", "export", str(out / "checkpoints" / f"step-{N:08d}"),
                    str(dst)], cwd=REPO, check=True, capture_output=True, text=True)
    from transformers import AutoModelForCausalLM

    probe = torch.load(out / "probe.pt", weights_only=True)
    model = AutoModelForCausalLM.from_pretrained(dst, dtype=torch.bfloat16).eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # as Accelerate ran the live model
        logits = model(input_ids=probe["input_ids"]).logits.float()
    live = probe["logits"]
    assert logits.shape == live.shape
    torch.testing.assert_close(logits, live, atol=2e-2, rtol=2e-2)
    assert torch.equal(logits.argmax(-1), live.argmax(-1))


def test_fsdp_config_without_fsdp_is_refused(embedded_data, tmp_path):  # noqa: F811
    """Without the test shim, Accelerate turns the FSDP config into MULTI_CPU here: the run is
    refused in one line naming the file and the field, before any step or checkpoint."""
    out = tmp_path / "refused"
    res = run_pretrain(out, embedded_data, *ARGS, config=FSDP_CONFIG, timeout=180)
    assert res.returncode != 0
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("pretrain: ")]
    assert lines, res.stderr[-3000:]
    assert re.search(r"fsdp_2gpu_pcie\.yaml: distributed_type: FSDP, but Accelerate set up "
                     r"DistributedType\.MULTI_CPU \(this machine has no CUDA GPU\)", lines[0]), lines[0]
    assert not (out / "metrics.jsonl").exists() and not (out / "checkpoints").exists()
