"""LoRA on Genesis without naming modules: PEFT gives "genesis" Llama's default targets (q_proj, v_proj),
with genesis_hf installed and through a saved folder's remote code (`trl sft --use_peft`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import peft
import pytest
import torch
from _alignment_fixtures import DATA_DIR, make_model_folder

from genesis_hf import GenesisConfig, GenesisForCausalLM

LLAMA_DEFAULT = set(peft.utils.constants.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING["llama"])


def test_plain_lora_config_targets_what_llama_gets():
    assert LLAMA_DEFAULT == {"q_proj", "v_proj"}
    torch.manual_seed(0)
    model = GenesisForCausalLM(GenesisConfig(vocab_size=300, hidden_size=64, intermediate_size=160,
                                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                             max_position_embeddings=64))  # fmt: skip
    ids = torch.randint(0, 300, (2, 16))
    with torch.no_grad():
        before = model(ids).logits
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4))  # no target_modules
    assert set(lora.peft_config["default"].target_modules) == LLAMA_DEFAULT
    wrapped = sorted(n for n, m in lora.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer))
    assert wrapped == [f"base_model.model.model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    with torch.no_grad():  # LoRA starts as the identity (B = 0)
        torch.testing.assert_close(lora(ids).logits, before)
    trainable = {n for n, p in lora.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)


def test_trl_sft_use_peft_on_a_genesis_folder(tmp_path):
    """`trl sft --use_peft` with no --lora_target_modules: the folder's own code (trust_remote_code)."""
    base = make_model_folder(tmp_path)
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_bytes((DATA_DIR / "sft_conversations.jsonl").read_bytes())
    trl = Path(sys.executable).with_name("trl")
    cmd = [str(trl), "sft", "--model_name_or_path", str(base), "--dataset_name", str(data), "--trust_remote_code",
           "--use_peft", "--lora_r", "4", "--output_dir", str(tmp_path / "out"), "--max_steps", "2",
           "--per_device_train_batch_size", "2", "--max_length", "128", "--activation_checkpointing", "false",
           "--bf16", "false", "--report_to", "none"]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    adapter = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert set(adapter["target_modules"]) == LLAMA_DEFAULT and adapter["peft_type"] == "LORA"


@pytest.mark.parametrize("tuner", ["ia3", "lora"])
def test_other_tuners_get_llama_defaults_too(tuner):
    constants = peft.utils.constants
    GenesisConfig().to_dict()  # what PEFT calls before its lookup
    table = getattr(constants, f"TRANSFORMERS_MODELS_TO_{tuner.upper()}_TARGET_MODULES_MAPPING")
    assert table["genesis"] == table["llama"]
