"""SFT then DPO on 2 gloo ranks through Accelerate's FSDP2 path, with accelerate_configs/fsdp_2gpu_pcie.yaml
itself (tests/_fsdp_cpu.py: the launcher reads the real file; a shim turns Accelerate's CPU fallback back
into FSDP). What is checked is what a 2-GPU run depends on:

- every rank ran FSDP with Genesis's precision policy on every module `fully_shard` wrapped, DPO's
  reference model (wrapped inside DPOTrainer's __init__) included;
- the logged losses are fp32 values, not bf16-rounded ones;
- the final folder, written by one FULL_STATE_DICT gather, loads with `from_pretrained` (both ways) and
  holds exactly the weights every rank's DCP shards hold at the last step;
- `torch_compile` compiles the decoder layers, never the whole model;
- DPO's reference model is sharded per decoder layer (not as TRL's one unit), frozen, resharded after
  forward;
- every rank of both scripts ran with the launch environment pretraining sets (the ranks are told they
  run on two RTX 4090s: training/reliability.py GPU_NAMES_ENV).

About 35 s on a shared 2-core machine (two launches of ~15 s)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil
import pytest
import torch
from _alignment_fixtures import DATA_DIR, make_model_folder
from _fsdp_cpu import FSDP_CONFIG, fsdp_env, fsdp_file
from _pretrain_run import free_port, kill_tree

from training.fsdp import describe_policy, genesis_policy
from training.reliability import GPU_NAMES_ENV, LAUNCH_ENV_KEYS

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "alignment" / "recipes"
STEPS = 3


def launch(stage: str, parent: Path, out: Path, *extra: str, timeout: float = 300) -> str:
    """`accelerate launch --config_file fsdp_2gpu_pcie.yaml alignment/<stage>.py` on 2 CPU ranks; stderr.

    `--use_cpu true` lets TrainingArguments set up gloo ranks on a machine without GPUs (the shim then
    grants FSDP). Output goes through a file: a stray rank holding a pipe cannot block the test. A hung
    launch gets SIGABRT first (faulthandler prints every rank's stack), then is killed."""
    data = DATA_DIR / ("sft_conversations.jsonl" if stage == "sft" else "preference_seeds.jsonl")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(FSDP_CONFIG),
           "--main_process_port", str(free_port()), str(REPO / "alignment" / f"{stage}.py"),
           "--config", str(RECIPES / f"{stage}-tiny.yaml"), "--model_name_or_path", str(parent),
           "--dataset_name", str(data), "--output_dir", str(out), "--use_cpu", "true", "--max_steps", str(STEPS),
           "--save_strategy", "steps", "--save_steps", str(STEPS), "--report_to", "none", *extra]
    env = {**{k: v for k, v in os.environ.items() if k not in LAUNCH_ENV_KEYS}, **fsdp_env(),
           "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline",
           "TOKENIZERS_PARALLELISM": "false", GPU_NAMES_ENV: "NVIDIA GeForce RTX 4090,NVIDIA GeForce RTX 4090"}
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=err, text=True)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            for p in psutil.Process(proc.pid).children(recursive=True):
                p.send_signal(signal.SIGABRT)
            kill_tree(proc.pid)
            err.seek(0)
            pytest.fail(f"{stage} under FSDP did not finish in {timeout}s\n{err.read()[-6000:]}")
        err.seek(0)
        text = err.read()
    assert proc.returncode == 0, f"{stage}: rc {proc.returncode}\n{text[-6000:]}"
    return text


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """base -> SFT -> DPO (its decoder layers compiled with the `eager` dynamo backend: the per-layer path
    without inductor's minutes of C++ builds), both under the FSDP plugin, 3 steps each."""
    root = tmp_path_factory.mktemp("fsdp_align")
    base = make_model_folder(root)
    logs = {"sft": launch("sft", base, root / "sft", "--gradient_accumulation_steps", "1")}
    logs["dpo"] = launch("dpo", root / "sft", root / "dpo", "--torch_compile_backend", "eager")
    return root, base, logs


def reports(log: str) -> dict[int, dict]:
    """Every rank's `distributed report` line (alignment/sft.py:fsdp_report), by rank."""
    out = {}
    for line in log.splitlines():
        if "distributed report: " in line:
            r = json.loads(line.split("distributed report: ", 1)[1])
            out[r["rank"]] = r
    return out


def on_bf16_grid(x: float, averaged: int) -> bool:
    """Whether `x` could be a mean of `averaged` bf16 values of its magnitude: a multiple of bf16's
    spacing (8 significant bits) divided by `averaged`, with one more bit of slack for a mean that
    crossed a power of two. An fp32 loss lands on it by chance about once in 2**10."""
    if x == 0:
        return True
    spacing = 2.0 ** (math.floor(math.log2(abs(x))) - 7) / averaged / 2
    q = x / spacing
    return abs(q - round(q)) < 1e-6 * max(1.0, abs(q))


def test_the_grid_check_catches_bf16_losses():
    """The check below can fail: means of bf16 losses over 2 ranks are on the grid, fp32 ones are not."""
    g = torch.Generator().manual_seed(0)
    for lo, hi in ((6.0, 7.0), (0.2, 0.7)):
        a = (torch.rand(50, 2, generator=g) * (hi - lo) + lo).bfloat16().float()
        assert all(on_bf16_grid(v, 2) for v in a.mean(dim=1).tolist())
        f = torch.rand(50, generator=g) * (hi - lo) + lo
        assert sum(on_bf16_grid(v, 2) for v in f.tolist()) <= 1


def logged_losses(folder: Path) -> list[float]:
    state = json.loads((folder / f"checkpoint-{STEPS}" / "trainer_state.json").read_text())
    return [h["loss"] for h in state["log_history"] if "loss" in h]


@pytest.mark.distributed
def test_every_rank_ran_fsdp_with_the_genesis_policy_on_every_wrapped_module(runs):
    root, _, logs = runs
    expected = describe_policy(genesis_policy(fsdp_file()["mixed_precision"]))
    assert "float32" in expected and "bfloat16" in expected  # bf16 compute, fp32 gradient reduction
    for stage in ("sft", "dpo"):
        by_rank = reports(logs[stage])
        assert set(by_rank) == {0, 1}, logs[stage][-3000:]
        for r in by_rank.values():
            assert (r["distributed_type"], r["processes"], r["mixed_precision"]) == ("FSDP", 2, "bf16")
            policies = r["fsdp_policies"]
            layers = [n for n in policies if n.startswith("model.model.layers.")]
            assert len(layers) == 2, policies  # TRANSFORMER_BASED_WRAP on GenesisDecoderLayer
            assert {"model.lm_head", "model.model.embed_tokens", "model.model.norm"} <= set(policies)
            assert all(p == expected for p in policies.values()), policies
            assert r["whole_model_compile"] == "NO"
        card = json.loads((root / stage / "alignment.json").read_text())["distributed"]
        assert card["fsdp_precision"] == [expected] and card["distributed_type"] == "FSDP"
    # DPO: the reference model is wrapped in DPOTrainer.__init__, before train(); it got the policy too,
    # one unit per decoder layer plus the root (TRL's prepare_fsdp alone makes the whole model one unit).
    for r in reports(logs["dpo"]).values():
        ref_units = sorted(n.removeprefix("ref_model.") for n in r["fsdp_policies"] if n.startswith("ref_model."))
        assert ref_units == ["<root>", "model.layers.0", "model.layers.1"], r["fsdp_policies"]
        assert r["ref_model"] == {"fsdp_units": ref_units, "resharded_after_forward": ref_units,
                                  "trainable_parameters": 0, "training": False}
    assert all(r["compiled_layers"] == 0 for r in reports(logs["sft"]).values())
    assert all(r["compiled_layers"] == 2 for r in reports(logs["dpo"]).values())


@pytest.mark.distributed
def test_every_rank_of_both_scripts_got_the_launch_environment(runs):
    """set_launch_env() ran inside each launched script, before CUDA could start: the launcher did not
    set these (its own RTX 40xx check reads nvidia-smi, absent here, and the test strips them)."""
    _, _, logs = runs
    for stage in ("sft", "dpo"):
        for r in reports(logs[stage]).values():
            assert r["launch_env"] == {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True",
                                       "NCCL_P2P_DISABLE": "1", "NCCL_IB_DISABLE": "1"}, (stage, r)
        assert "launch environment: NCCL_IB_DISABLE=1 (set for NVIDIA GeForce RTX 4090)" in logs[stage]


@pytest.mark.distributed
def test_logged_losses_are_fp32_not_bf16_rounded(runs):
    root, _, _ = runs
    for stage in ("sft", "dpo"):
        losses = logged_losses(root / stage)
        assert len(losses) == STEPS
        # One micro-batch per rank per step (SFT with gradient_accumulation_steps 1; DPO's recipe), 2 ranks.
        assert not any(on_bf16_grid(x, 2) for x in losses), (stage, losses)
    # Step 1: policy == reference, so the DPO rewards are 0 (whatever SFT term the recipe adds to the loss).
    state = json.loads((root / "dpo" / f"checkpoint-{STEPS}" / "trainer_state.json").read_text())
    first = next(h for h in state["log_history"] if "rewards/margins" in h)
    assert first["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    assert first["rewards/chosen"] == pytest.approx(0.0, abs=1e-6)


@pytest.mark.distributed
def test_final_folder_holds_the_gathered_trained_weights(runs):
    """The FULL_STATE_DICT gather (save_final) against every rank's DCP shards of the same step."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    from transformers import AutoModelForCausalLM

    from genesis_hf import GenesisForCausalLM

    root, base, _ = runs
    start = AutoModelForCausalLM.from_pretrained(base).state_dict()
    for stage in ("sft", "dpo"):
        folder = root / stage
        shards = folder / f"checkpoint-{STEPS}" / "pytorch_model_fsdp_0"
        assert sorted(p.name for p in shards.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
        dcp_to_torch_save(shards, root / f"{stage}_shards.pt")
        trained = torch.load(root / f"{stage}_shards.pt", weights_only=True)["model"]

        model = AutoModelForCausalLM.from_pretrained(folder)
        assert type(model) is GenesisForCausalLM
        loaded = model.state_dict()
        assert set(trained) <= set(loaded)
        for k, v in trained.items():
            assert v.dtype == torch.float32 and torch.equal(loaded[k], v), k
        assert any(not torch.equal(start[k], loaded[k]) for k in start)  # it trained
        assert torch.equal(loaded["lm_head.weight"], loaded["model.embed_tokens.weight"])  # still tied

        # The auto_map path: the folder carries modeling_genesis.py, not torch's FSDP sources.
        config = json.loads((folder / "config.json").read_text())
        assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_genesis.GenesisForCausalLM"
        assert not list(folder.glob("_fsdp*.py"))
        remote = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
        ids = torch.tensor([[1, 2, 3, 4]])
        with torch.no_grad():
            torch.testing.assert_close(remote(input_ids=ids).logits, model(input_ids=ids).logits)


def test_a_config_that_asks_for_fsdp_is_refused_where_accelerate_does_not_grant_it(tmp_path, monkeypatch):
    """`accelerate launch --config_file fsdp_2gpu_pcie.yaml` sets ACCELERATE_USE_FSDP; a plain start (or a
    machine without GPUs) gets no FSDP from Accelerate, and the scripts refuse before training."""
    from alignment import dpo, sft
    from training.fsdp import FSDPNotGranted

    base = make_model_folder(tmp_path)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    for module, stage, data in ((sft, "sft", "sft_conversations.jsonl"), (dpo, "dpo", "preference_seeds.jsonl")):
        with pytest.raises(FSDPNotGranted, match="distributed_type: FSDP, but Accelerate set up"):
            module.main(*module.parse(["--config", str(RECIPES / f"{stage}-tiny.yaml"), "--model_name_or_path",
                                       str(base), "--dataset_name", str(DATA_DIR / data),
                                       "--output_dir", str(tmp_path / stage)]))
        assert not (tmp_path / stage).exists()  # refused before anything was written
