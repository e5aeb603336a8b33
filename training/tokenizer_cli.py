"""`genesis tokenizer`: genesis_hf/tokenizer.py's command, with mixture recipes read here.

    genesis tokenizer train training/mixtures/genesis-60b.yaml --vocab-size 49152 --sample-bytes 2000000000 \
        --output runs/tokenizer
    genesis tokenizer train a.txt b.jsonl --vocab-size 32000 --output runs/tok

genesis_hf (what a model user installs) does not import the training package, so the mixture
recipe (training/data/mixture.py) is turned into (source, document) pairs on this side.
"""

from __future__ import annotations

from pathlib import Path


def read_sources(paths: list[str], sample_bytes: int | None):
    """The files unchanged, or a mixture recipe's (source, document) pairs, sampled by weight."""
    recipes = [p for p in paths if Path(p).suffix.lower() in (".yaml", ".yml")]
    if not recipes:
        return list(paths)
    if len(recipes) != len(paths) or len(recipes) > 1:
        raise ValueError(f"a mixture recipe is the only source of a tokenizer (got {', '.join(map(str, paths))})")
    if not Path(recipes[0]).is_file():
        raise FileNotFoundError(f"tokenizer source not found: {recipes[0]}")
    from training.data.mixture import iter_mixture_texts

    return iter_mixture_texts(recipes[0], max_bytes=sample_bytes)


def cli_main(argv: list[str]) -> int:
    from genesis_hf.tokenizer import cli_main as tokenizer_main

    return tokenizer_main(argv, read_sources=read_sources)
