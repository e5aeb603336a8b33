"""Genesis behaves like a model that ships with transformers: Auto classes, save/load, remote code, Hub."""

import json
import os
import subprocess
import sys

import torch
from _model_fixtures import TINY
from huggingface_hub import HfApi
from transformers import AutoConfig, AutoModelForCausalLM

import genesis_hf
from genesis_hf import GenesisConfig, GenesisForCausalLM


def saved_tiny(path):
    torch.manual_seed(0)
    model = GenesisForCausalLM(GenesisConfig(**TINY))
    model.save_pretrained(path)
    return model


def test_auto_classes_know_genesis():
    config = AutoConfig.for_model("genesis", **TINY)
    assert isinstance(config, GenesisConfig)
    assert isinstance(AutoModelForCausalLM.from_config(config), GenesisForCausalLM)


def test_save_pretrained_writes_safetensors_auto_map_code_and_card(tmp_path):
    saved_tiny(tmp_path)
    files = set(os.listdir(tmp_path))
    assert {"model.safetensors", "config.json", "configuration_genesis.py", "modeling_genesis.py"} <= files
    assert "README.md" in files and "pytorch_model.bin" not in files
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "genesis"
    assert config["auto_map"] == {
        "AutoConfig": "configuration_genesis.GenesisConfig",
        "AutoModelForCausalLM": "modeling_genesis.GenesisForCausalLM",
    }
    card = (tmp_path / "README.md").read_text()
    assert "| layers | 2 |" in card and "trust_remote_code=True" in card


def test_from_pretrained_round_trip_is_exact(tmp_path):
    model = saved_tiny(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(loaded, GenesisForCausalLM)
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    ids = torch.randint(0, 256, (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(ids).logits, loaded.eval()(ids).logits, rtol=0, atol=0)


def test_saved_folder_loads_with_trust_remote_code_without_genesis_hf(tmp_path):
    model = saved_tiny(tmp_path)
    ids = [[5, 17, 200, 3]]
    with torch.no_grad():
        expected = model.eval()(torch.tensor(ids)).logits[0, -1].tolist()
    code = f"""
import json, sys
sys.modules["genesis_hf"] = None  # importing genesis_hf now raises ImportError
try:
    import genesis_hf
    raise SystemExit("genesis_hf is importable")
except ImportError:
    pass
import torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r}, trust_remote_code=True).eval()
assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
with torch.no_grad():
    print(json.dumps(model(torch.tensor({ids})).logits[0, -1].tolist()))
"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode == 0, result.stderr
    got = json.loads(result.stdout.strip().splitlines()[-1])
    torch.testing.assert_close(torch.tensor(got), torch.tensor(expected))


def test_push_to_hub_uploads_the_saved_folder_with_card(tmp_path, monkeypatch):
    calls = {}

    class Repo:
        repo_id = "someone/genesis-tiny"

    def create_repo(self, repo_id, **kwargs):
        calls["create_repo"] = (repo_id, kwargs)
        return Repo()

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        calls["upload"] = (repo_id, sorted(os.listdir(folder_path)))
        calls["card"] = open(os.path.join(folder_path, "README.md")).read()
        return "https://huggingface.co/someone/genesis-tiny/commit/0"

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    monkeypatch.setenv("HF_TOKEN", "hf_sentinel_token_never_logged")
    torch.manual_seed(0)
    model = GenesisForCausalLM(GenesisConfig(**TINY))
    url = model.push_to_hub("someone/genesis-tiny", private=True)
    assert url.endswith("/commit/0")
    assert calls["create_repo"] == ("someone/genesis-tiny", {"private": True, "exist_ok": True})
    repo_id, files = calls["upload"]
    assert repo_id == "someone/genesis-tiny"
    assert {"README.md", "config.json", "model.safetensors", "modeling_genesis.py"} <= set(files)
    assert "hf_sentinel_token_never_logged" not in calls["card"]


def test_package_exports():
    assert {"GenesisConfig", "GenesisForCausalLM"} <= set(genesis_hf.__all__)
