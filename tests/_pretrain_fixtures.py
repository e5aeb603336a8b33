"""Session fixture: the embedded corpus's tokenizer + shards, built once per test session."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def embedded_data(tmp_path_factory) -> tuple:
    from training.data.prepare import ensure_embedded_data

    root = tmp_path_factory.getbasetemp() / "pretrain-embedded"
    return ensure_embedded_data(root)
