"""Tiny, offline building blocks for the alignment tests: a ChatML tokenizer and a model folder.

The tokenizer comes from `genesis_hf.tokenizer.train_tokenizer` when the data helper's module is
installed; until then a byte-level BPE with the same special tokens and the same ChatML template
(with `{% generation %}` around assistant content, `<|im_end|>` inside it) stands in. The model is
a tiny `GenesisForCausalLM` when `genesis_hf` provides it, else a Llama of the same shape.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

SPECIALS = [
    "<|endoftext|>",
    "<|pad|>",
    "<|im_start|>",
    "<|im_end|>",
    "<tool_call>",
    "</tool_call>",
    "<tool_response>",
    "</tool_response>",
]

# ChatML; assistant content and its <|im_end|> sit inside {% generation %} so TRL's
# assistant_only_loss trains the stop token too.
CHATML = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- generation -%}{{- message['content'] + '<|im_end|>' -}}{%- endgeneration -%}"
    "{{- '\\n' -}}"
    "{%- else -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

DATA_DIR = Path(__file__).resolve().parents[1] / "alignment" / "data"


def corpus_text() -> list[str]:
    """Every string in the bundled alignment data: the tokenizer's training text."""
    texts: list[str] = []
    for path in sorted(DATA_DIR.glob("*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                texts.append(line)
    return texts


def _fallback_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus_text(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        bos_token="<|endoftext|>",
        pad_token="<|pad|>",
        additional_special_tokens=SPECIALS[2:],
    )
    fast.chat_template = CHATML
    return fast


def make_tokenizer(tmp_dir: Path, vocab_size: int = 512):
    """A small ChatML tokenizer trained on the bundled alignment data."""
    try:
        from genesis_hf.tokenizer import train_tokenizer  # noqa: F401
    except ImportError:
        return _fallback_tokenizer(vocab_size)
    # The data helper's tokenizer: train it on our bundled text, through its own API.
    text_file = Path(tmp_dir) / "corpus.txt"
    text_file.write_text("\n".join(corpus_text()), encoding="utf-8")
    return _train_with_genesis(text_file, Path(tmp_dir) / "tokenizer", vocab_size)


def _train_with_genesis(text_file: Path, out: Path, vocab_size: int):
    from transformers import AutoTokenizer

    from genesis_hf.tokenizer import train_tokenizer

    train_tokenizer([str(text_file)], vocab_size=vocab_size, output=str(out))
    return AutoTokenizer.from_pretrained(out)


def tiny_model(vocab_size: int, seed: int = 0):
    torch.manual_seed(seed)
    kwargs = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    try:
        from genesis_hf import GenesisConfig, GenesisForCausalLM

        return GenesisForCausalLM(GenesisConfig(**kwargs))
    except ImportError:
        from transformers import LlamaConfig, LlamaForCausalLM

        return LlamaForCausalLM(LlamaConfig(tie_word_embeddings=True, **kwargs))


def make_model_folder(tmp_dir: Path, name: str = "base", seed: int = 0) -> Path:
    """A `save_pretrained` folder (model + tokenizer), the shape of a `genesis export` output."""
    out = Path(tmp_dir) / name
    tok = make_tokenizer(Path(tmp_dir))
    model = tiny_model(len(tok), seed=seed)
    model.config.eos_token_id = tok.convert_tokens_to_ids("<|endoftext|>")
    model.config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path
