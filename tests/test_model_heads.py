"""Genesis as a transformers model beside Llama: task heads, output flags, RoPE scaling, bad input and the
tensor-parallel plan (2 gloo ranks). transformers' own common tests: tests/test_transformers_common.py."""

import json
import os
import subprocess
import sys
import warnings

import pytest
import torch
from _dist import run_ranks
from transformers import (
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    LlamaConfig,
    LlamaForCausalLM,
)

from genesis_hf import (
    GenesisConfig,
    GenesisForCausalLM,
    GenesisForQuestionAnswering,
    GenesisForSequenceClassification,
    GenesisForTokenClassification,
)
from genesis_hf.export import export

SHAPE = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=32, pad_token_id=0, rms_norm_eps=1e-5)  # fmt: skip


def pair(attn="sdpa"):
    """A Genesis causal LM and a Llama with the same weights."""
    torch.manual_seed(0)
    genesis = GenesisForCausalLM(GenesisConfig(**SHAPE, attn_implementation=attn)).eval()
    llama = LlamaForCausalLM(LlamaConfig(**SHAPE, rope_parameters=genesis.config.rope_parameters,
                                         tie_word_embeddings=True, attn_implementation=attn)).eval()  # fmt: skip
    llama.load_state_dict(genesis.state_dict())
    return genesis, llama


def test_heads_come_from_the_auto_classes():
    config = GenesisConfig(**SHAPE, num_labels=3)
    for auto, cls in ((AutoModelForSequenceClassification, GenesisForSequenceClassification),
                      (AutoModelForTokenClassification, GenesisForTokenClassification),
                      (AutoModelForQuestionAnswering, GenesisForQuestionAnswering)):  # fmt: skip
        assert type(auto.from_config(config)) is cls


def test_an_export_loads_into_every_head_with_trust_remote_code_and_no_genesis_hf(tmp_path):
    torch.manual_seed(0)
    GenesisForCausalLM(GenesisConfig(**SHAPE)).save_pretrained(tmp_path / "model")
    export(tmp_path / "model", tmp_path / "export", fmt="genesis")
    auto_map = json.loads((tmp_path / "export" / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModelForSequenceClassification"] == "modeling_genesis.GenesisForSequenceClassification"
    code = f"""
import sys
sys.modules["genesis_hf"] = None  # importing genesis_hf raises ImportError
import torch
from transformers import AutoModelForQuestionAnswering, AutoModelForSequenceClassification, AutoModelForTokenClassification
for auto in (AutoModelForSequenceClassification, AutoModelForTokenClassification, AutoModelForQuestionAnswering):
    model = auto.from_pretrained({str(tmp_path / "export")!r}, trust_remote_code=True, num_labels=1).eval()
    assert type(model).__module__.startswith("transformers_modules"), type(model)
    with torch.no_grad():
        model(torch.tensor([[5, 6, 7]]))
print("ok")
"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-2000:]


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_output_flags_behave_as_llamas(attn):
    genesis, llama = pair(attn)
    ids = torch.randint(1, 128, (2, 9))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        g = genesis(ids, output_attentions=True, output_hidden_states=True)
        ll = llama(ids, output_attentions=True, output_hidden_states=True)
    torch.testing.assert_close(g.logits, ll.logits)
    assert len(g.hidden_states) == len(ll.hidden_states) == 3
    for a, b in zip(g.hidden_states, ll.hidden_states):
        torch.testing.assert_close(a, b)
    # eager: (B, heads, T, T) per layer; sdpa never forms the weights: transformers warns and returns what Llama does.
    assert len(g.attentions) == len(ll.attentions)
    for a, b in zip(g.attentions, ll.attentions):
        torch.testing.assert_close(a, b)
    # config flags count as the keywords do; return_dict=False gives Llama's tuple.
    genesis.config.output_hidden_states = llama.config.output_hidden_states = True
    with torch.no_grad():
        assert len(genesis(ids).hidden_states) == 3
        g_tuple, ll_tuple = genesis(ids, return_dict=False), llama(ids, return_dict=False)
    assert isinstance(g_tuple, tuple) and len(g_tuple) == len(ll_tuple)


def test_the_old_cache_name_warns_as_in_llama():
    genesis, _ = pair()
    with pytest.warns(FutureWarning, match="`past_key_values` is deprecated"):
        genesis(torch.tensor([[1, 2, 3]]), past_key_values=None)


def test_rope_scaling_lifts_the_length_limit_and_an_unknown_type_is_refused():
    long_ids = torch.randint(1, 128, (1, 48))  # 1.5 x max_position_embeddings
    for rope_type in ("linear", "dynamic", "yarn"):
        rope = {"rope_type": rope_type, "factor": 2.0, "rope_theta": 10_000.0}
        model = GenesisForCausalLM(GenesisConfig(**SHAPE, rope_parameters=rope)).eval()
        with torch.no_grad():
            assert model(long_ids).logits.shape == (1, 48, 128)
    with pytest.raises(ValueError, match="exceeds max_position_embeddings=32. Configure RoPE scaling"):
        GenesisForCausalLM(GenesisConfig(**SHAPE)).eval()(long_ids)
    with pytest.raises(ValueError, match=r"rope_parameters\['rope_type'\] is 'longer'.*default, dynamic, linear"):
        GenesisConfig(**SHAPE, rope_parameters={"rope_type": "longer", "rope_theta": 10_000.0})


def tensor_parallel_step(rank, world_size, folder):
    """One training step with labels under the model's own tensor-parallel plan (`tp_plan="auto"`)."""
    from torch.distributed.tensor import DTensor

    model = GenesisForCausalLM.from_pretrained(folder, tp_plan="auto")
    assert isinstance(model.lm_head.weight, DTensor)
    torch.manual_seed(1)
    ids = torch.randint(1, 99, (2, 12))
    out = model(ids, labels=ids)
    out.loss.backward()
    grad = model.model.layers[0].mlp.gate_proj.weight.grad
    grad = grad.full_tensor() if isinstance(grad, DTensor) else grad
    return {"loss": out.loss.item(), "grad_norm": grad.norm().item()}


def test_a_training_step_works_under_the_tensor_parallel_plan(tmp_path):
    torch.manual_seed(0)
    model = GenesisForCausalLM(GenesisConfig(**{**SHAPE, "vocab_size": 99}))  # 99 rows: uneven shards of the head
    model.save_pretrained(tmp_path / "model")
    torch.manual_seed(1)
    ids = torch.randint(1, 99, (2, 12))
    out = model(ids, labels=ids)
    out.loss.backward()
    expected = {"loss": out.loss.item(), "grad_norm": model.model.layers[0].mlp.gate_proj.weight.grad.norm().item()}
    results = run_ranks("test_model_heads:tensor_parallel_step", 2, kwargs={"folder": str(tmp_path / "model")},
                        result_dir=tmp_path / "ranks", timeout=120)  # fmt: skip
    assert all(r.returncode == 0 for r in results), results[0].stderr[-3000:]
    for r in results:
        assert r.value["loss"] == pytest.approx(expected["loss"], rel=1e-5)
        assert r.value["grad_norm"] == pytest.approx(expected["grad_norm"], rel=1e-4)
