"""training/reliability.py:set_launch_env, the environment every training script sets before CUDA starts,
decided from the GPU names (stood in for by GENESIS_TEST_GPU_NAMES on this CPU machine). The launched
scripts' own environment is checked in tests/test_alignment_fsdp.py."""

from __future__ import annotations

import pytest

from training import reliability

MANAGED = (*reliability.LAUNCH_ENV_KEYS, "TORCH_NCCL_DUMP_ON_TIMEOUT", "TORCH_FR_BUFFER_SIZE")


@pytest.fixture
def fresh(monkeypatch):
    for key in MANAGED:
        monkeypatch.delenv(key, raising=False)  # and removed again afterwards, whatever the call set
    monkeypatch.setattr(reliability, "_NOTES", None)
    return monkeypatch


def test_consumer_cards_get_p2p_and_ib_off(fresh):
    fresh.setenv(reliability.GPU_NAMES_ENV, "NVIDIA GeForce RTX 4090, NVIDIA GeForce RTX 4090")
    notes = reliability.set_launch_env()
    assert reliability.launch_env() == {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True",
                                        "NCCL_P2P_DISABLE": "1", "NCCL_IB_DISABLE": "1"}
    assert "NCCL_IB_DISABLE=1 (set for NVIDIA GeForce RTX 4090)" in notes
    assert reliability.set_launch_env() is notes  # a second call (dpo.py imports sft.py) changes nothing


def test_user_values_win_and_datacenter_cards_keep_p2p(fresh):
    fresh.setenv(reliability.GPU_NAMES_ENV, "NVIDIA GeForce RTX 4090")
    fresh.setenv("NCCL_IB_DISABLE", "0")  # consumer cards across nodes over InfiniBand
    notes = reliability.set_launch_env()
    assert reliability.launch_env()["NCCL_IB_DISABLE"] == "0"
    assert "NCCL_IB_DISABLE=0 (set by you; left as is)" in notes

    fresh.setattr(reliability, "_NOTES", None)
    for key in MANAGED:
        fresh.delenv(key, raising=False)
    fresh.setenv(reliability.GPU_NAMES_ENV, "NVIDIA H100 80GB HBM3")
    reliability.set_launch_env()
    assert reliability.launch_env() == {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True",
                                        "NCCL_P2P_DISABLE": None, "NCCL_IB_DISABLE": None}


def test_no_gpu_sets_nothing(fresh):
    fresh.delenv(reliability.GPU_NAMES_ENV, raising=False)
    fresh.setattr(reliability, "_gpu_names_without_cuda", lambda: [])
    assert reliability.set_launch_env() == []
    assert set(reliability.launch_env().values()) == {None}
