"""The FSDP2 precision rule (training/fsdp.py) in 2 gloo processes: gradients summed over 8
accumulated micro-batches under bf16 compute, against an fp32 reference of the same batches."""

from __future__ import annotations

import copy

import pytest
import torch
from _dist import run_ranks
from _model_fixtures import TINY

pytestmark = pytest.mark.distributed

MICRO = 8


def _batches(rank: int, world: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every rank's micro-batches, the same on every rank (the reference needs all of them)."""
    g = torch.Generator().manual_seed(1234)
    allb = [torch.randint(0, TINY["vocab_size"], (world, 4, 33), generator=g) for _ in range(MICRO)]
    return [(b[rank, :, :-1], b[rank, :, 1:]) for b in allb], allb


def accumulate(rank: int, world: int) -> dict:
    from accelerate.utils import FullyShardedDataParallelPlugin
    from torch.distributed.fsdp import fully_shard

    from genesis_hf import GenesisConfig, GenesisForCausalLM
    from training.fsdp import genesis_policy

    torch.manual_seed(0)
    base = GenesisForCausalLM(GenesisConfig(**TINY))
    mine, allb = _batches(rank, world)

    # fp32 reference: the whole step (every rank's micro-batches) in one process, no FSDP.
    ref = copy.deepcopy(base)
    for b in allb:
        for r in range(world):
            (ref(input_ids=b[r, :, :-1], shift_labels=b[r, :, 1:]).loss / (MICRO * world)).backward()
    ref_grads = {n: p.grad for n, p in ref.named_parameters()}

    accelerate_default = FullyShardedDataParallelPlugin(fsdp_version=2)
    accelerate_default.set_mixed_precision("bf16")
    errors = {}
    for name, policy in (("genesis", genesis_policy("bf16")),
                         ("accelerate_default", accelerate_default.mixed_precision_policy)):
        model = copy.deepcopy(base)
        for layer in model.model.layers:
            fully_shard(layer, mp_policy=policy)
        fully_shard(model, mp_policy=policy)
        for i, (x, y) in enumerate(mine):
            model.set_requires_gradient_sync(i == MICRO - 1)  # no_sync until the last micro-batch
            (model(input_ids=x, shift_labels=y).loss / MICRO).backward()  # FSDP averages over ranks
        num = den = 0.0
        for n, p in model.named_parameters():
            g = p.grad.full_tensor().float()
            num += (g - ref_grads[n]).pow(2).sum().item()
            den += ref_grads[n].pow(2).sum().item()
        errors[name] = (num / den) ** 0.5
    return errors


def test_fp32_accumulation_is_closer_to_the_fp32_gradient(tmp_path):
    results = run_ranks("test_fsdp_precision:accumulate", 2, result_dir=tmp_path, timeout=180)
    assert all(r.returncode == 0 for r in results), results[0].stderr[-3000:]
    err = results[0].value
    assert err == results[1].value  # the full gradient is the same on both ranks
    # bf16 compute is common to both; only the reduction/accumulation dtype differs.
    assert err["genesis"] < err["accelerate_default"], err
    assert err["genesis"] < 0.05, err
