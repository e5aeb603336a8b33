"""Genesis <-> transformers' LlamaForCausalLM: same weights, same logits, same generations; export both ways."""

import json

import pytest
import torch
from transformers import LlamaForCausalLM

from genesis_cli import main as genesis_main
from genesis_hf import GenesisConfig, GenesisForCausalLM
from genesis_hf.export import ExportError, convert_model, export, genesis_to_llama_config

TINY = dict(
    vocab_size=300,
    hidden_size=64,
    intermediate_size=160,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=96,
    rope_theta=500_000.0,
)


@pytest.fixture
def pair():
    torch.manual_seed(0)
    genesis = GenesisForCausalLM(GenesisConfig(**TINY)).eval()
    llama = LlamaForCausalLM(genesis_to_llama_config(genesis.config)).eval()
    llama.load_state_dict(genesis.state_dict(), strict=True)
    return genesis, llama


def test_same_weights_give_the_same_logits_fp32(pair):
    genesis, llama = pair
    ids = torch.randint(0, 300, (2, 40))
    mask = torch.ones_like(ids)
    mask[0, :7] = 0
    with torch.no_grad():
        for attention_mask in (None, mask):
            a = genesis(ids, attention_mask=attention_mask).logits
            b = llama(ids, attention_mask=attention_mask).logits
            keep = slice(None) if attention_mask is None else attention_mask.bool()
            torch.testing.assert_close(a[keep], b[keep], rtol=0, atol=1e-5)


def test_same_loss_as_llama(pair):
    genesis, llama = pair
    ids = torch.randint(0, 300, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(
            genesis(ids, labels=ids).loss, llama(ids, labels=ids).loss, rtol=1e-6, atol=1e-6
        )


def test_identical_greedy_generations(pair):
    genesis, llama = pair
    prompt = torch.randint(0, 300, (3, 6))
    kwargs = dict(max_new_tokens=20, do_sample=False, pad_token_id=0)
    assert torch.equal(genesis.generate(prompt, **kwargs), llama.generate(prompt, **kwargs))


def test_export_to_llama_and_back_via_cli(tmp_path, pair):
    genesis, _ = pair
    genesis.save_pretrained(tmp_path / "genesis")
    assert (
        genesis_main(["export", str(tmp_path / "genesis"), str(tmp_path / "llama"), "--format", "llama"]) == 0
    )
    config = json.loads((tmp_path / "llama" / "config.json").read_text())
    assert config["model_type"] == "llama" and config["architectures"] == ["LlamaForCausalLM"]
    assert not (tmp_path / "llama" / "modeling_genesis.py").exists()
    llama = LlamaForCausalLM.from_pretrained(tmp_path / "llama").eval()

    assert (
        genesis_main(["export", str(tmp_path / "llama"), str(tmp_path / "back"), "--format", "genesis"]) == 0
    )
    back = GenesisForCausalLM.from_pretrained(tmp_path / "back").eval()
    ids = torch.randint(0, 300, (1, 30))
    with torch.no_grad():
        ref = genesis(ids).logits
        torch.testing.assert_close(llama(ids).logits, ref, rtol=0, atol=1e-5)
        torch.testing.assert_close(back(ids).logits, ref, rtol=0, atol=0)
    assert back.config.rope_parameters["rope_theta"] == 500_000.0


def test_export_refuses_existing_destination_and_unknown_sources(tmp_path, pair):
    genesis, _ = pair
    genesis.save_pretrained(tmp_path / "src")
    (tmp_path / "dst").mkdir()
    with pytest.raises(ExportError, match="already exists"):
        export(tmp_path / "src", tmp_path / "dst")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ExportError, match="no config.json"):
        export(tmp_path / "empty", tmp_path / "out")
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(ExportError, match="model_type 'bert'"):
        convert_model(tmp_path / "bert", "llama")
    assert not (tmp_path / "out").exists()


def test_incompatible_llama_is_refused_with_the_field(tmp_path):
    from transformers import LlamaConfig

    config = LlamaConfig(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=4,
        hidden_act="gelu",
    )
    LlamaForCausalLM(config).save_pretrained(tmp_path / "gelu")
    with pytest.raises(ExportError, match="hidden_act must be 'silu'"):
        export(tmp_path / "gelu", tmp_path / "out", fmt="genesis")
