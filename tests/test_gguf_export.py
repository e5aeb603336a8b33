"""`genesis export --format gguf`: the file read back with the `gguf` package (metadata, tokenizer,
tensor names, shapes, types) and loaded into transformers with `gguf_file=` (same logits)."""

from __future__ import annotations

import json
import re

import gguf
import numpy as np
import pytest
import torch
from test_tokenizer import ROUND_TRIP, _byte_fallback_tokenizer

from genesis_cli import main as genesis_main
from genesis_hf import GenesisConfig, GenesisForCausalLM
from genesis_hf.export import ExportError, export
from genesis_hf.tokenizer import PRETOKENIZE_PATTERN, SPECIAL_TOKENS, train_tokenizer

TINY = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=96, rope_theta=10_000.0, rms_norm_eps=1e-5)  # fmt: skip
# Largest logit error allowed, as a fraction of the largest |logit| of the fp32 model (measured on
# this model: f32 0, f16 0.002, bf16 0.015, q8_0 0.08; the random weights are large, so errors add up).
ATOL = {"f32": 1e-6, "f16": 1e-2, "bf16": 5e-2, "q8_0": 0.15}


def _model_folder(root, tok, *, tied: bool = True):
    torch.manual_seed(0)
    model = GenesisForCausalLM(GenesisConfig(vocab_size=len(tok), tie_word_embeddings=tied, **TINY)).eval()
    with torch.no_grad():  # larger weights than the init: logits of order 1, so tolerances mean something
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.2)
    model.save_pretrained(root)
    tok.save_pretrained(root)
    return model


@pytest.fixture(scope="module")
def tok():
    text = "\n\n".join(f"def f{i}(x):\n    return x * {i}  # the cat sat on the mat" for i in range(80))
    return train_tokenizer(iter([text, *ROUND_TRIP.values()]), 320, min_frequency=1, show_progress=False)


@pytest.fixture(scope="module")
def folder(tmp_path_factory, tok):
    root = tmp_path_factory.mktemp("gguf") / "genesis"
    return root, _model_folder(root, tok)


def _field(reader, key):
    return reader.fields[key].contents()


def test_metadata_and_tokenizer_read_back(folder, tok, tmp_path):
    src, model = folder
    dst = export(src, tmp_path / "m.gguf", fmt="gguf", outtype="f32")
    r = gguf.GGUFReader(dst)
    c = model.config
    expect = {
        "general.architecture": "llama",
        "general.file_type": int(gguf.LlamaFileType.ALL_F32),
        "llama.context_length": c.max_position_embeddings,
        "llama.embedding_length": c.hidden_size,
        "llama.block_count": c.num_hidden_layers,
        "llama.feed_forward_length": c.intermediate_size,
        "llama.attention.head_count": c.num_attention_heads,
        "llama.attention.head_count_kv": c.num_key_value_heads,
        "llama.rope.dimension_count": c.head_dim,
        "llama.vocab_size": len(tok),
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "qwen2",
        "tokenizer.ggml.pretokenizer": PRETOKENIZE_PATTERN,  # Ollama's Go engine reads the regex here
        "tokenizer.ggml.eos_token_id": 0,
        "tokenizer.ggml.eot_token_id": tok.convert_tokens_to_ids("<|im_end|>"),
        "tokenizer.ggml.padding_token_id": tok.pad_token_id,
        "tokenizer.ggml.add_bos_token": False,
        "tokenizer.ggml.add_eos_token": False,
    }
    assert {k: _field(r, k) for k in expect} == expect
    assert _field(r, "llama.rope.freq_base") == pytest.approx(10_000.0)
    assert _field(r, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(1e-5)
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    assert _field(r, "tokenizer.ggml.tokens") == [t for t, _ in vocab]
    types = _field(r, "tokenizer.ggml.token_type")
    control = [i for i, t in enumerate(types) if t == gguf.TokenType.CONTROL]
    assert control == list(range(len(SPECIAL_TOKENS)))
    assert set(types[len(SPECIAL_TOKENS):]) == {gguf.TokenType.NORMAL}
    spec = json.loads(tok.backend_tokenizer.to_str())["model"]
    assert _field(r, "tokenizer.ggml.merges") == [" ".join(m) for m in spec["merges"]]
    template = _field(r, "tokenizer.chat_template")
    assert "<|im_start|>" in template and "add_generation_prompt" in template
    assert not re.search(r"\{%-?\s*(end)?generation\s*-?%\}", template)  # transformers-only tags


def test_tensor_names_shapes_and_types(folder, tmp_path):
    src, model = folder
    c = model.config
    for outtype, qtype in [("f16", "F16"), ("bf16", "BF16"), ("q8_0", "Q8_0")]:
        r = gguf.GGUFReader(export(src, tmp_path / f"m-{outtype}.gguf", fmt="gguf", outtype=outtype))
        tensors = {t.name: t for t in r.tensors}
        kv = c.num_key_value_heads * c.head_dim
        shapes = {"token_embd.weight": [c.hidden_size, c.vocab_size], "output_norm.weight": [c.hidden_size]}
        for i in range(c.num_hidden_layers):  # ggml order: (in, out)
            shapes |= {f"blk.{i}.attn_norm.weight": [c.hidden_size], f"blk.{i}.ffn_norm.weight": [c.hidden_size],
                       f"blk.{i}.attn_q.weight": [c.hidden_size, c.hidden_size],
                       f"blk.{i}.attn_k.weight": [c.hidden_size, kv], f"blk.{i}.attn_v.weight": [c.hidden_size, kv],
                       f"blk.{i}.attn_output.weight": [c.hidden_size, c.hidden_size],
                       f"blk.{i}.ffn_gate.weight": [c.hidden_size, c.intermediate_size],
                       f"blk.{i}.ffn_up.weight": [c.hidden_size, c.intermediate_size],
                       f"blk.{i}.ffn_down.weight": [c.intermediate_size, c.hidden_size]}  # fmt: skip
        assert {n: [int(x) for x in t.shape] for n, t in tensors.items()} == shapes  # tied: no output.weight
        for name, t in tensors.items():
            assert t.tensor_type.name == ("F32" if len(t.shape) == 1 else qtype), name


@pytest.mark.parametrize("outtype", ["f32", "f16", "bf16", "q8_0"])
def test_transformers_loads_the_gguf_with_the_same_logits(folder, tmp_path, outtype):
    from transformers import AutoModelForCausalLM

    src, model = folder
    export(src, tmp_path / "m.gguf", fmt="gguf", outtype=outtype)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = model(ids).logits, loaded(ids).logits
    scale = want.abs().max().item()
    assert scale > 1.0  # a model whose logits are not all ~0
    torch.testing.assert_close(got, want, rtol=0, atol=ATOL[outtype] * scale)
    agree = (got.argmax(-1) == want.argmax(-1)).float().mean().item()
    assert agree >= (1.0 if outtype == "f32" else 0.9), agree  # the same next token almost everywhere


def test_untied_model_writes_output_weight(tmp_path, tok):
    from transformers import AutoModelForCausalLM

    model = _model_folder(tmp_path / "untied", tok, tied=False)
    export(tmp_path / "untied", tmp_path / "out" / "m.gguf", fmt="gguf", outtype="f32")
    names = {t.name for t in gguf.GGUFReader(tmp_path / "out" / "m.gguf").tensors}
    assert "output.weight" in names
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", gguf_file="m.gguf", dtype=torch.float32)
    ids = torch.arange(20)[None]
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=1e-5)
    assert not torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)  # really untied


def test_gguf_chat_template_renders_like_the_tokenizer(folder, tmp_path):
    from transformers import AutoTokenizer

    src, _ = folder
    r = gguf.GGUFReader(export(src, tmp_path / "m.gguf", fmt="gguf", outtype="f16"))
    tok = AutoTokenizer.from_pretrained(src)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}]  # fmt: skip
    want = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    tok.chat_template = _field(r, "tokenizer.chat_template")
    assert tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == want


def test_cli_writes_a_q8_0_file(folder, tmp_path, capsys):
    src, _ = folder
    dst = tmp_path / "m-q8.gguf"
    assert genesis_main(["export", str(src), str(dst), "--format", "gguf", "--outtype", "q8_0"]) == 0
    assert "(gguf, q8_0)" in capsys.readouterr().out
    r = gguf.GGUFReader(dst)
    assert _field(r, "general.file_type") == int(gguf.LlamaFileType.MOSTLY_Q8_0)
    q = next(t for t in r.tensors if t.name == "blk.0.ffn_down.weight")
    assert q.tensor_type == gguf.GGMLQuantizationType.Q8_0 and q.data.dtype == np.uint8


def test_bad_input_is_refused(folder, tmp_path, capsys):
    src, _ = folder
    # unsupported type: one error that lists the supported ones
    assert genesis_main(["export", str(src), str(tmp_path / "a.gguf"), "--format", "gguf", "--outtype", "q4_0"]) == 2
    assert "--outtype 'q4_0' is not supported; choose one of f32, bf16, f16, q8_0" in capsys.readouterr().out
    assert not (tmp_path / "a.gguf").exists()
    # existing destination
    (tmp_path / "b.gguf").write_bytes(b"precious")
    with pytest.raises(ExportError, match="already exists"):
        export(src, tmp_path / "b.gguf", fmt="gguf")
    assert (tmp_path / "b.gguf").read_bytes() == b"precious"
    # a folder that is not a Genesis or Llama model: what was found is named
    other = tmp_path / "gpt2"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ExportError, match="model_type 'gpt2' is neither 'genesis' nor 'llama'"):
        export(other, tmp_path / "c.gguf", fmt="gguf")
    stray = tmp_path / "stray"
    stray.mkdir()
    (stray / "notes.txt").write_text("x")
    (stray / "weights.bin").write_bytes(b"x")
    with pytest.raises(ExportError, match=r"no config.json.*found: notes.txt, weights.bin"):
        export(stray, tmp_path / "d.gguf", fmt="gguf")
    # a name that is not *.gguf, and a .gguf name for a folder format
    with pytest.raises(ExportError, match=r"name it \*.gguf"):
        export(src, tmp_path / "e", fmt="gguf")
    with pytest.raises(ExportError, match="did you mean --format gguf"):
        export(src, tmp_path / "f.gguf", fmt="llama")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.gguf", "gpt2", "stray"]  # nothing half-written


def test_byte_fallback_tokenizer_is_refused(tmp_path):
    """A model on the old byte-fallback tokenizer would read garbage in llama.cpp: refuse, say why."""
    old_tok = _byte_fallback_tokenizer(tmp_path / "model")
    from transformers import AutoTokenizer

    _model_folder(tmp_path / "model", AutoTokenizer.from_pretrained(old_tok))
    with pytest.raises(ExportError, match=r"byte-fallback BPE .*llama.cpp would not reproduce its token ids"):
        export(tmp_path / "model", tmp_path / "m.gguf", fmt="gguf")
    assert not (tmp_path / "m.gguf").exists()
