"""Shared test set-up: offline by design; slow and GPU tests are skipped (never passed) unless asked for."""

import os

# Before anything imports huggingface_hub: tests never reach the network.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "offline"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

VERSIONED = ("torch", "accelerate", "transformers", "trl", "datasets", "huggingface_hub", "tokenizers", "peft", "wandb")


# Test doubles live under tests/ and are injected by the tests (the product never imports them).
sys.path.insert(0, str(Path(__file__).resolve().parent / "fake_hub"))


def pytest_report_header(config):
    """The versions this run resolved: the suite must pass with the newest releases of the day."""
    from importlib.metadata import PackageNotFoundError, version

    def v(name):
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    return "resolved: " + ", ".join(f"{n} {v(n)}" for n in VERSIONED)


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="also run tests marked slow")


def pytest_collection_modifyitems(config, items):
    run_slow = config.getoption("--runslow")
    has_cuda = torch.cuda.is_available()
    for item in items:
        if "slow" in item.keywords and not run_slow:
            item.add_marker(pytest.mark.skip(reason="slow: run with --runslow"))
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))
