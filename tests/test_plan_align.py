"""`genesis plan --align sft|dpo`: TRL's loss paths traced, the DPO reference model, the alignment
preflight (refusal, --ignore_plan) and bad input.

Traces run in child processes (the fake process group is process-wide state)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "alignment" / "recipes"
FSDP2 = ROOT / "accelerate_configs" / "fsdp_2gpu_pcie.yaml"
SINGLE = ROOT / "accelerate_configs" / "single_gpu.yaml"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
GIB = 2**30
# A small Genesis (every dimension even: FSDP2 shards dim 0 over 2 ranks without padding)
SHAPE = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2, vocab_size=1024,
             num_hidden_layers=4, max_position_embeddings=256)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from genesis_hf import GenesisConfig

    out = tmp_path_factory.mktemp("plan-align") / "model"
    GenesisConfig(**SHAPE).save_pretrained(out)
    return out


def _plan(*argv: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "genesis_cli", "plan", *argv], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=timeout)


def _json(out: subprocess.CompletedProcess) -> dict:
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout)


def test_sft_and_dpo_plans_on_two_gpus(model_dir):
    """Both stages plan from their recipe as the scripts parse it; the policy's model states are
    Accelerate's fp32 upcast (4N/2 per rank), the DPO reference is bf16 shards (2N/2), exactly; the DPO
    micro-batch counts chosen and rejected rows; the peak falls in TRL's fused head or a layer."""
    from genesis_hf import GenesisConfig, GenesisForCausalLM

    with __import__("torch").device("meta"):
        n = sum(p.numel() for p in GenesisForCausalLM(GenesisConfig(**SHAPE)).parameters())
    common = ["--hardware", str(FSDP2), "--gpu", "RTX 4090", "--json", "--model_name_or_path", str(model_dir)]
    sft = _json(_plan("--align", "sft", "--config", str(RECIPES / "sft-tiny.yaml"), *common))
    dpo = _json(_plan("--align", "dpo", "--config", str(RECIPES / "dpo-tiny.yaml"), *common))
    assert sft["setting"]["workload"] == "sft" and dpo["setting"]["workload"] == "dpo"
    assert sft["setting"]["seq_len"] == 256 and sft["setting"]["gradient_accumulation_steps"] == 2
    assert sft["memory"]["reference"] == 0
    assert dpo["memory"]["reference"] == n * 2 // 2
    # 4 pairs x 2 rows x 256 tokens x 1 step x 2 ranks
    assert dpo["time"]["tokens_per_s"] * dpo["time"]["step_s"] == pytest.approx(4 * 2 * 256 * 2, rel=1e-6)
    assert sft["memory"]["params"] >= n * 4 // 2  # fp32 shards (+ gathered bf16 at the peak)
    for plan in (sft, dpo):
        assert plan["fits"] and plan["memory"]["peak_allocated"] < plan["memory"]["predicted_device_total"]
        assert plan["memory"]["host_staging_per_rank"] == 0  # the Trainer saves synchronously


def test_dpo_extrapolation_from_two_shallow_traces_is_exact():
    """Policy + reference + TRL's fused head: each segment's peak at 5 layers from 2 and 3 layers equals
    a 5-layer trace, and the candidates reach it (the head's backward is seen, not a fallback)."""
    code = """
import json
from genesis_hf import GenesisConfig
from training.plan.trace import Setting, trace_model, extrapolate
cfg = GenesisConfig(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2,
                    vocab_size=1024, num_hidden_layers=5)
s = Setting(micro_batch=2, grad_accum=2, seq_len=64, world_size=2, workload="dpo", reference=True)
ex = extrapolate(trace_model(cfg, s, 2), trace_model(cfg, s, 3), 5)
full = trace_model(cfg, s, 5)
print(json.dumps({k: [ex[k]["peak_total"], full.segments[k].peak_total, ex[k]["phase"], ex[k]["peak"]["reference"]]
                  for k in ("accumulate", "last_micro_batch", "optimizer_step")} | {"ref": full.reference_bytes}))
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    for seg in ("accumulate", "last_micro_batch", "optimizer_step"):
        predicted, traced, phase, ref = r[seg]
        assert predicted == traced, (seg, r)
        assert "segment peak" not in phase, phase
        assert ref == r["ref"] > 0


def test_alignment_plan_refuses_bad_input(model_dir, tmp_path, capsys):
    """In process: every refusal comes before any trace."""
    from training.plan.cli import cli_main

    bad = tmp_path / "sft-bad.yaml"
    bad.write_text((RECIPES / "sft-tiny.yaml").read_text() + "\nmax_lenght: 512\n")
    assert cli_main(["--align", "sft", "--config", str(bad), "--hardware", str(FSDP2), "--gpu", "RTX 4090",
                     "--model_name_or_path", str(model_dir)]) == 2
    assert "max_lenght" in capsys.readouterr().err
    assert cli_main(["--align", "dpo", "--config", str(RECIPES / "dpo-genesis-1b.yaml"), "--hardware", str(FSDP2),
                     "--gpu", "RTX 4090"]) == 2
    err = capsys.readouterr().err
    assert "runs/align/genesis-1b-sft" in err and "--model_config" in err
    assert cli_main(["--config", str(ROOT / "training" / "recipes" / "genesis-1b.yaml"), "--hardware", str(FSDP2),
                     "--gpu", "RTX 4090", "--model_config", str(model_dir)]) == 2
    assert "--model_config is for --align" in capsys.readouterr().err


def _cuda_accelerator(monkeypatch, total_gib: float):
    """A single-process accelerator on a pretend RTX 4090 with `total_gib` of memory: the preflight's
    own code runs (the planner in a child process, its JSON, the decision)."""
    import torch
    from accelerate.utils import DistributedType

    props = types.SimpleNamespace(name="NVIDIA GeForce RTX 4090", total_memory=int(total_gib * GIB))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: props)
    return types.SimpleNamespace(device=types.SimpleNamespace(type="cuda"), is_main_process=True, num_processes=1,
                                 distributed_type=DistributedType.NO, mixed_precision="no",
                                 state=types.SimpleNamespace(fsdp_plugin=None))


def test_alignment_preflight_plans_this_launch_and_refuses_what_does_not_fit(model_dir, monkeypatch, caplog):
    """Each call runs the planner in a child process on the launch's own arguments (no launcher variables)."""
    from training.plan.preflight import PlanRefused, preflight

    def argv(stage):
        return ["--config", str(RECIPES / f"{stage}-tiny.yaml"), "--model_name_or_path", str(model_dir)]

    tiny = _cuda_accelerator(monkeypatch, 0.05)  # (a plan that fits goes ahead: test_plan_preflight.py)
    with pytest.raises(PlanRefused, match="predicted NOT to fit.*genesis plan --fit"):
        preflight(types.SimpleNamespace(ignore_plan=False), tiny, argv("sft"), align="sft")
    with caplog.at_level("INFO", logger="training.pretrain"):
        plan = preflight(types.SimpleNamespace(ignore_plan=True), tiny, argv("dpo"), align="dpo")
    assert plan is not None and not plan["fits"] and plan["setting"]["workload"] == "dpo"
    assert plan["memory"]["reference"] > 0 and "going ahead: --ignore_plan" in caplog.text


def test_a_refused_alignment_launch_exits_2_with_one_line_before_training(tmp_path, monkeypatch, capsys):
    """The SFT script's trainer runs the preflight as soon as its Accelerator exists; a refusal ends the
    launch with exit 2 and one line, before any step (nothing is written to the output folder)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from _alignment_fixtures import DATA_DIR, make_model_folder

    import training.plan.preflight as pf
    from alignment import sft

    seen = {}

    def refuse(args, accelerator, argv=None, align=None):
        seen.update(argv=argv, align=align, ignore=args.ignore_plan)
        raise pf.PlanRefused("plan: 1 x RTX 4090: ... predicted NOT to fit (3.00 GiB over)")

    monkeypatch.setattr(pf, "preflight", refuse)
    base = make_model_folder(tmp_path)
    out_dir = tmp_path / "sft"
    argv = ["--config", str(RECIPES / "sft-tiny.yaml"), "--model_name_or_path", str(base),
            "--dataset_name", str(DATA_DIR / "sft_conversations.jsonl"), "--output_dir", str(out_dir)]
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(SystemExit) as e:
        sft.run_script(sft.main, lambda: sft.parse(argv))
    assert e.value.code == 2
    assert seen == {"argv": argv, "align": "sft", "ignore": False}
    assert "genesis: plan: 1 x RTX 4090" in capsys.readouterr().err
    assert not (out_dir / "model.safetensors").exists() and not list(out_dir.glob("checkpoint-*"))
