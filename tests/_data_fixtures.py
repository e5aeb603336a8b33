"""Shared helpers for the data tests: the embedded tokenizer/data (built once per session) and
small prepared folders written from in-test text."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "data"


@pytest.fixture(scope="session")
def embedded(tmp_path_factory) -> tuple[Path, Path]:
    """(tokenizer_dir, data_dir) of the embedded corpus; the same root as the pretraining tests use,
    so the session builds it once (ensure_embedded_data is a verified no-op the second time)."""
    from training.data.prepare import ensure_embedded_data

    return ensure_embedded_data(tmp_path_factory.getbasetemp() / "pretrain-embedded")


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def write_mixture(path: Path, sources: list[dict], **top) -> Path:
    import yaml

    path.write_text(yaml.safe_dump({"name": path.stem, **top, "sources": sources}, sort_keys=False))
    return path


def synthetic_docs(prefix: str, n: int, words: int = 12) -> list[dict]:
    """n distinct documents (distinct so the duplicate filter keeps them all)."""
    vocab = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    return [{"text": f"{prefix} {i}: " + " ".join(vocab[(i * 7 + k) % len(vocab)] for k in range(words + i % 5))}
            for i in range(n)]


def make_data(tmp: Path, tok_dir: Path, sizes: dict[str, int], *, shard_tokens: int = 2000,
              validation_fraction: float = 0.05) -> Path:
    """Prepare a folder with one synthetic source per entry of `sizes` (name -> documents)."""
    from training.data.prepare import prepare

    srcs = []
    for name, n in sizes.items():
        write_jsonl(tmp / f"{name}.jsonl", synthetic_docs(name, n))
        srcs.append({"name": name, "data_files": f"{name}.jsonl", "schema": "text", "weight": 1.0 / len(sizes)})
    mix = write_mixture(tmp / "mix.yaml", srcs, shard_tokens=shard_tokens, validation_fraction=validation_fraction)
    prepare(mix, tok_dir, tmp / "data", show_progress=False, num_proc=1)
    return tmp / "data"


def dying_tokenize_piece(job: dict, index: int) -> dict:
    """A worker that dies (os._exit) on piece 1 of a source, once (a marker file beside the data):
    importable in spawned worker processes, to stand in for `pieces.tokenize_piece`."""
    import os

    from training.data.pieces import tokenize_piece

    marker = Path(job["pieces_dir"]).parent / "worker-died-once"
    if index == 1 and not marker.exists():
        marker.write_text("died\n")
        os._exit(1)
    return tokenize_piece(job, index)
