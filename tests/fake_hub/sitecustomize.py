"""Test-only: with GENESIS_TEST_FAKE_HUB set, `huggingface_hub.HfApi` is the local-folder fake
(genesis_fake_hub.py) in every process started with this folder on PYTHONPATH."""

import os

if os.environ.get("GENESIS_TEST_FAKE_HUB"):
    import genesis_fake_hub

    genesis_fake_hub.install()
