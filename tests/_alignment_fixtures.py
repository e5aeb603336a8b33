"""Tiny, offline building blocks for the alignment tests.

A Genesis tokenizer (the real `train_tokenizer`, ChatML template with `{% generation %}`) trained
in about a second on the bundled alignment data, and a tiny `GenesisForCausalLM` saved with it as
a `save_pretrained` folder: the shape of a `genesis export` output.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from genesis_hf import GenesisConfig, GenesisForCausalLM

DATA_DIR = Path(__file__).resolve().parents[1] / "alignment" / "data"


def corpus_text() -> list[str]:
    """Every string in the bundled alignment data: the tokenizer's training text."""
    texts: list[str] = []
    for path in sorted(DATA_DIR.glob("*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                texts.append(line)
    return texts


def make_tokenizer(vocab_size: int = 1024):
    """The data helper's Genesis tokenizer (ChatML template), trained on the bundled alignment data."""
    from genesis_hf.tokenizer import train_tokenizer

    return train_tokenizer(iter(corpus_text()), vocab_size=vocab_size, show_progress=False)


def tiny_model(vocab_size: int, seed: int = 0):
    torch.manual_seed(seed)
    kwargs = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )
    return GenesisForCausalLM(GenesisConfig(**kwargs))


def make_model_folder(tmp_dir: Path, name: str = "base", seed: int = 0) -> Path:
    """A `save_pretrained` folder (model + tokenizer), the shape of a `genesis export` output."""
    out = Path(tmp_dir) / name
    tok = make_tokenizer()
    model = tiny_model(len(tok), seed=seed)
    model.config.eos_token_id = tok.convert_tokens_to_ids("<|endoftext|>")
    model.config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path
