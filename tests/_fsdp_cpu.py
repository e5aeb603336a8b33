"""Accelerate's FSDP2 path on 2 gloo CPU ranks, through the REAL accelerate_configs/fsdp_2gpu_pcie.yaml.

    res = run_pretrain(out, data, *args, config=FSDP_CONFIG, env=fsdp_env())

`accelerate launch` reads the file as usual (so its fsdp_config and mixed_precision are what is
tested, and the file cannot drift from the tests); the ranks import tests/fsdp_on_cpu/sitecustomize.py,
which turns Accelerate's CPU fallback (MULTI_CPU) back into DistributedType.FSDP. Without the
shim, the same command is refused by training/fsdp.py:require_granted_fsdp.
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
FSDP_CONFIG = REPO / "accelerate_configs" / "fsdp_2gpu_pcie.yaml"
SHIM = HERE / "fsdp_on_cpu"


def fsdp_env(extra: dict | None = None) -> dict:
    """Env for a child `accelerate launch` whose ranks take the FSDP2 path on CPU."""
    path = os.pathsep.join(p for p in (str(SHIM), str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return {"GENESIS_TEST_FSDP_ON_CPU": "1", "PYTHONPATH": path, **(extra or {})}


def fsdp_file() -> dict:
    """The accelerate config as written (the tests compare what ran against it)."""
    return yaml.safe_load(FSDP_CONFIG.read_text())
