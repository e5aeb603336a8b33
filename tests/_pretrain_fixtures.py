"""Session fixture for the pretraining tests: a small tokenizer and a TINY prepared mixture.

Tiny on purpose: ~20 windows of 65 tokens per source, so a few optimizer steps of the debug
model cross an epoch boundary (row 6), and building it takes seconds, not the minute that the
full embedded corpus (genesis quickstart) takes.
"""

from __future__ import annotations

import itertools

import pytest

TINY_MIXTURE = """\
name: tiny-embedded
shard_tokens: 512             # several shards per source: exercises cross-shard windows
validation_fraction: 0.2
validation_max_tokens: 2048
sources:
  - name: python-docs
    embedded: prose
    max_bytes: 2000
    schema: text
    fields: {text: text}
    weight: 0.5
  - name: python-code
    embedded: code
    max_bytes: 2500
    schema: text
    fields: {text: text}
    weight: 0.5
"""


@pytest.fixture(scope="session")
def embedded_data(tmp_path_factory) -> tuple:
    """(tokenizer_dir, data_dir) of the tiny mixture."""
    from genesis_hf.tokenizer import train_tokenizer
    from training.data.corpus import iter_documents
    from training.data.prepare import prepare

    root = tmp_path_factory.mktemp("pretrain-data")
    texts = [d["text"] for kind in ("prose", "code") for d in itertools.islice(iter_documents(kind), 60)]
    train_tokenizer(iter(texts), vocab_size=512, output_dir=root / "tokenizer", show_progress=False)
    (root / "tiny.yaml").write_text(TINY_MIXTURE)
    prepare(root / "tiny.yaml", root / "tokenizer", root / "data", show_progress=False, num_proc=1)
    return root / "tokenizer", root / "data"
