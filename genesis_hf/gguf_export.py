"""One GGUF file for llama.cpp (and Ollama, LM Studio, which run on it): `genesis export SRC DST.gguf --format gguf`.

    genesis export out/genesis-1b-40k out/genesis-1b-40k-f16.gguf --format gguf             # f16 (default)
    genesis export out/genesis-1b-40k out/genesis-1b-40k-q8_0.gguf --format gguf --outtype q8_0

`genesis_hf/export.py` owns the command and hands this module a Llama-named state dict, its
config and the tokenizer folder. Why we write the file ourselves instead of going through
llama.cpp's `convert_hf_to_gguf.py`: the converter identifies a BPE pre-tokenizer by hashing the
token ids of a fixed text, so it refuses any freshly trained vocabulary (ours included). We know
our pre-tokenizer exactly: it is llama.cpp's "qwen2" regex, and our vocabulary is spelled in
GPT-2's byte alphabet, so llama.cpp's BPE ("gpt2") tokenizer gives our token ids.

What the file holds:
- architecture "llama": context length, embedding/FFN sizes, layers, heads and KV heads (GQA),
  head dim, RoPE theta, RMS eps. Tied embeddings are written as llama.cpp expects them: no
  `output.weight`, so llama.cpp reuses `token_embd.weight`.
- q_proj and k_proj rows are permuted from HF's rotate-half RoPE layout to llama.cpp's
  interleaved pairs, as llama.cpp's converter does (transformers undoes it on load).
- tokenizer: model "gpt2", pre "qwen2" (and the regex itself under `tokenizer.ggml.pretokenizer`,
  which Ollama's Go engine reads), tokens, types (our specials are CONTROL), merges;
  eos `<|endoftext|>`, eot `<|im_end|>` (chat turns stop there), pad `<|pad|>`; no BOS is ever
  added (add_bos_token false; the bos id is `<|endoftext|>`, our document boundary, only so that
  llama.cpp does not fall back to its default id 11 for tools that ask for one); the chat template
  without transformers' `{% generation %}` tags, which only mark training targets.
- tensors: 2-D weights in the chosen type, norms in f32 (as llama.cpp's converter does); a q8_0
  tensor whose rows are not a multiple of 32 is written as f16.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import gguf
import torch

from .tokenizer import (
    CHAT_STOP_TOKENS,
    EOS_TOKEN,
    PAD_TOKEN,
    PRETOKENIZE_PATTERN,
    byte_level_pre_tokenizer,
    token_bytes,
)

# --outtype -> (tensor type of 2-D weights, file type recorded in general.file_type)
OUTTYPES: dict[str, tuple[gguf.GGMLQuantizationType, gguf.LlamaFileType]] = {
    "f32": (gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32),
    "bf16": (gguf.GGMLQuantizationType.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "f16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
    "q8_0": (gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
}
LLAMA_CPP_PRE = "qwen2"  # llama.cpp's name for our split regex
OLLAMA_PRETOKENIZER_KEY = "tokenizer.ggml.pretokenizer"
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_LAYER_TENSORS = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_GLOBAL_TENSORS = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                   "lm_head.weight": "output.weight"}  # fmt: skip


class GGUFExportError(ValueError):
    """The model or tokenizer cannot be written as a GGUF llama.cpp reproduces; the message says why."""


# ----------------------------------------------------------------------------- tokenizer


def _expected_pre_tokenizer() -> dict:
    from tokenizers import Tokenizer, models

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = byte_level_pre_tokenizer()
    return json.loads(tok.to_str())["pre_tokenizer"]


def _llama_cpp_mismatch(spec: dict) -> str | None:
    """Why llama.cpp's gpt2/qwen2 tokenizer would NOT reproduce this tokenizer.json; None if it would."""
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        return f"model type {model.get('type')!r}, not BPE"
    if model.get("byte_fallback"):
        return "byte-fallback BPE (<0xNN> tokens; Genesis before the byte-level switch)"
    for key in ("dropout", "continuing_subword_prefix", "end_of_word_suffix"):
        if model.get(key):
            return f"BPE option {key}={model[key]!r}"
    if model.get("ignore_merges"):
        return "ignore_merges=true (llama.cpp's qwen2 pre-tokenizer applies every merge)"
    if spec.get("normalizer") is not None:
        return f"a normalizer ({spec['normalizer'].get('type')})"
    if spec.get("pre_tokenizer") != _expected_pre_tokenizer():
        return "a pre-tokenizer other than the Genesis split regex + ByteLevel(use_regex=False)"
    if (spec.get("decoder") or {}).get("type") != "ByteLevel":
        return f"decoder {(spec.get('decoder') or {}).get('type')!r}, not ByteLevel"
    post = spec.get("post_processor") or {"type": "ByteLevel"}
    adds = post.get("type") == "TemplateProcessing" and any("SpecialToken" in p for p in post.get("single", []))
    if adds or post.get("type") not in ("ByteLevel", "TemplateProcessing"):
        return f"post-processor {post.get('type')!r} adding tokens (a BOS?) llama.cpp would not add"
    added = {t["content"] for t in spec.get("added_tokens", [])}
    odd = [t for t in model["vocab"] if t not in added and token_bytes(t) is None]
    if odd:
        return f"{len(odd)} tokens not spelled in GPT-2's byte alphabet, e.g. {odd[:3]}"
    return None


def tokenizer_metadata(tok_dir: str | Path, n_vocab: int) -> dict:
    """Tokens, types, merges, special ids and chat template for a GGUF, from a tokenizer folder."""
    tok_dir = Path(tok_dir)
    path = tok_dir / "tokenizer.json"
    if not path.is_file():
        raise GGUFExportError(f"{tok_dir}: no tokenizer.json; a GGUF needs the model's tokenizer")
    spec = json.loads(path.read_text(encoding="utf-8"))
    why = _llama_cpp_mismatch(spec)
    if why:
        raise GGUFExportError(
            f"{path}: {why}: llama.cpp would not reproduce its token ids. Train a byte-level tokenizer "
            f"with `genesis tokenizer train` (and a model on it) to run in llama.cpp."
        )
    by_id = dict((i, t) for t, i in spec["model"]["vocab"].items())
    added = {t["id"]: t for t in spec.get("added_tokens", [])}
    by_id.update((i, t["content"]) for i, t in added.items())
    if sorted(by_id) != list(range(len(by_id))):
        raise GGUFExportError(f"{path}: token ids are not 0..{len(by_id) - 1} without gaps")
    if len(by_id) > n_vocab:
        raise GGUFExportError(f"{path}: {len(by_id)} tokens, more than the model's vocab_size {n_vocab}")
    tokens, types = [], []
    for i in range(n_vocab):
        if i not in by_id:  # rows of a padded embedding no token reaches
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if added[i].get("special") else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    merges = [" ".join(m) if isinstance(m, list) else m for m in spec["model"]["merges"]]
    ids = {t: i for i, t in by_id.items()}
    for name in (EOS_TOKEN, PAD_TOKEN, CHAT_STOP_TOKENS[0]):
        if name not in ids:
            raise GGUFExportError(f"{path}: no {name} token (not a Genesis tokenizer)")
    return {
        "tokens": tokens,
        "types": types,
        "merges": merges,
        "eos": ids[EOS_TOKEN],
        "eot": ids[CHAT_STOP_TOKENS[0]],
        "pad": ids[PAD_TOKEN],
        "chat_template": _chat_template(tok_dir),
    }


def _chat_template(tok_dir: Path) -> str | None:
    if (tok_dir / "chat_template.jinja").is_file():
        template = (tok_dir / "chat_template.jinja").read_text(encoding="utf-8")
    elif (tok_dir / "tokenizer_config.json").is_file():
        template = json.loads((tok_dir / "tokenizer_config.json").read_text()).get("chat_template")
    else:
        return None
    if not isinstance(template, str):
        return None
    # {% generation %} is a transformers extension (assistant-token masks); other engines reject it.
    return re.sub(r"\{%-?\s*(end)?generation\s*-?%\}", "", template)


# ----------------------------------------------------------------------------- tensors


def _permute_rope(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """(n_head * hd, in): per head, rows [0..hd/2) and [hd/2..hd) (rotate-half pairs) -> interleaved."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_name(name: str) -> str:
    if name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[name]
    m = _LAYER.match(name)
    if m and m.group(2) in _LAYER_TENSORS:
        return f"blk.{m.group(1)}.{_LAYER_TENSORS[m.group(2)]}"
    raise GGUFExportError(f"weight {name!r} has no place in a llama GGUF")


def _check_config(config) -> None:
    rope = dict(getattr(config, "rope_parameters", None) or {})
    if rope.get("rope_type", "default") != "default":
        raise GGUFExportError(f"rope_type {rope['rope_type']!r}: only plain RoPE (rope_type 'default') is written")
    for flag in ("attention_bias", "mlp_bias"):
        if getattr(config, flag, False):
            raise GGUFExportError(f"{flag}=True: the Genesis/Llama GGUF writer has no bias tensors")
    if getattr(config, "hidden_act", "silu") != "silu":
        raise GGUFExportError(f"hidden_act {config.hidden_act!r}: llama.cpp's llama architecture is SwiGLU (silu)")


def write_gguf(state_dict: dict[str, torch.Tensor], config, tokenizer_dir: str | Path, dst: str | Path,
               *, outtype: str = "f16", name: str | None = None) -> Path:
    """Write a llama GGUF at `dst` (must not exist) from Llama-named weights and a Llama/Genesis config."""
    if outtype not in OUTTYPES:
        raise GGUFExportError(f"--outtype {outtype!r} is not supported; choose one of {', '.join(OUTTYPES)}")
    dst = Path(dst)
    if dst.exists():
        raise GGUFExportError(f"{dst} already exists; refusing to overwrite an export.")
    _check_config(config)
    qtype, file_type = OUTTYPES[outtype]
    vocab = tokenizer_metadata(tokenizer_dir, config.vocab_size)
    n_head, n_kv = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_head
    tied = bool(getattr(config, "tie_word_embeddings", False))

    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    writer = gguf.GGUFWriter(tmp, arch="llama")
    try:
        writer.add_name(name or dst.stem)
        writer.add_file_type(file_type)
        writer.add_context_length(config.max_position_embeddings)
        writer.add_embedding_length(config.hidden_size)
        writer.add_block_count(config.num_hidden_layers)
        writer.add_feed_forward_length(config.intermediate_size)
        writer.add_head_count(n_head)
        writer.add_head_count_kv(n_kv)
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
        writer.add_rope_dimension_count(head_dim)
        writer.add_rope_freq_base(float(config.rope_parameters["rope_theta"]))
        writer.add_layer_norm_rms_eps(config.rms_norm_eps)
        writer.add_vocab_size(config.vocab_size)

        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(LLAMA_CPP_PRE)
        # Ollama's own (Go) engine takes the split regex from this key, defaulting to Llama 3's
        # (digits in threes); llama.cpp ignores it.
        writer.add_string(OLLAMA_PRETOKENIZER_KEY, PRETOKENIZE_PATTERN)
        writer.add_token_list(vocab["tokens"])
        writer.add_token_types(vocab["types"])
        writer.add_token_merges(vocab["merges"])
        writer.add_bos_token_id(vocab["eos"])  # never added (below); see the module doc
        writer.add_eos_token_id(vocab["eos"])
        writer.add_eot_token_id(vocab["eot"])
        writer.add_pad_token_id(vocab["pad"])
        writer.add_add_bos_token(False)
        writer.add_add_eos_token(False)
        if vocab["chat_template"]:
            writer.add_chat_template(vocab["chat_template"])

        names = set(state_dict)
        for key, tensor in state_dict.items():
            if key == "lm_head.weight" and tied:
                continue  # llama.cpp ties output to token_embd when output.weight is absent
            out = _gguf_name(key)
            w = tensor.detach().to(torch.float32).cpu()
            if key.endswith("q_proj.weight"):
                w = _permute_rope(w, n_head)
            elif key.endswith("k_proj.weight"):
                w = _permute_rope(w, n_kv)
            data = w.numpy()
            t = qtype if data.ndim == 2 else gguf.GGMLQuantizationType.F32
            if t == gguf.GGMLQuantizationType.Q8_0 and data.shape[-1] % 32:
                t = gguf.GGMLQuantizationType.F16
            writer.add_tensor(out, gguf.quants.quantize(data, t), raw_dtype=t)
        if not tied and "lm_head.weight" not in names:
            raise GGUFExportError("tie_word_embeddings is false but the model has no lm_head.weight")
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, dst)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return dst


__all__ = ["OUTTYPES", "GGUFExportError", "tokenizer_metadata", "write_gguf"]
