"""Host reads in the training hot path: none in the model's forward and backward, and none per
micro-batch in the loop's `train_step` (docs/pretraining.md, "Host syncs per step").

On CUDA, reading a device tensor's value on the host (`.item()`, `bool(t)`, `.tolist()`, ...)
waits for every kernel queued before it. On CPU the same reads are visible as the ATen ops below
(`_local_scalar_dense` is what `.item()`, `float(t)` and `if t:` end in) and as the Python
methods that copy a tensor out, so a dispatch mode counts them without a GPU.
"""

from __future__ import annotations

import sys
import types
from collections import Counter
from pathlib import Path

import pytest
import torch
from _model_fixtures import TINY
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from genesis_hf import GenesisConfig, GenesisForCausalLM

ROOT = Path(__file__).resolve().parent.parent
READ_OPS = {"aten::_local_scalar_dense", "aten::item", "aten::is_nonzero", "aten::equal"}
READ_METHODS = {torch.Tensor.tolist, torch.Tensor.numpy, torch.Tensor.cpu}
_PLUMBING = ("torch/utils/_python_dispatch", "torch/overrides", "torch/_compile", "torch/_dynamo", __file__)


def _caller() -> str:
    """`file:function` of the innermost frame that asked for the read, relative to the repo or site-packages."""
    frame = sys._getframe(2)
    while frame is not None and any(p in frame.f_code.co_filename for p in _PLUMBING):
        frame = frame.f_back
    if frame is None:
        return "?"
    path = frame.f_code.co_filename
    path = path.split("site-packages/")[-1] if "site-packages/" in path else str(Path(path).relative_to(ROOT))
    return f"{path}:{frame.f_code.co_name}"


class HostReads(TorchDispatchMode):
    """Every op that reads a tensor's value on the host, as `file:function` of its caller."""

    def __init__(self):
        super().__init__()
        self.reads: list[str] = []
        self._methods = _ReadMethods(self.reads)

    def __enter__(self):
        self._methods.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        super().__exit__(*exc)
        self._methods.__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._schema.name in READ_OPS:
            self.reads.append(_caller())
        return func(*args, **(kwargs or {}))


class _ReadMethods(TorchFunctionMode):
    """Copies out of a tensor that a CPU run shows no ATen op for (on CUDA they are device-to-host copies)."""

    def __init__(self, reads: list[str]):
        super().__init__()
        self.reads = reads

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in READ_METHODS:
            self.reads.append(_caller())
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("target", ["shift_labels", "labels"])  # our loop / TRL
def test_training_forward_and_backward_read_nothing_on_the_host(target):
    torch.manual_seed(0)
    model = GenesisForCausalLM(GenesisConfig(**TINY)).train()
    x = torch.randint(0, TINY["vocab_size"], (2, 16))
    y = torch.randint(0, TINY["vocab_size"], (2, 16))
    y[0, :3] = -100  # the normaliser counts real targets on the device
    with HostReads() as reads:
        model(input_ids=x, **{target: y}).loss.backward()
    # Before the fix: transformers/masking_utils.py:find_packed_sequence_indices, once a forward.
    assert reads.reads == []


def test_packed_rows_still_get_the_packed_mask():
    """The caller's position_ids still reach the mask builder: documents that restart attend apart."""
    torch.manual_seed(0)
    model = GenesisForCausalLM(GenesisConfig(**TINY)).eval()
    a, b = torch.randint(0, TINY["vocab_size"], (1, 5)), torch.randint(0, TINY["vocab_size"], (1, 7))
    packed = model(input_ids=torch.cat([a, b], 1), position_ids=torch.cat([torch.arange(5), torch.arange(7)])[None],
                   use_cache=False).logits
    alone = model(input_ids=b, use_cache=False).logits
    torch.testing.assert_close(packed[:, 5:], alone, rtol=1e-5, atol=1e-5)


class _Loader:
    """PackedLoader's interface as train_step uses it, on random tokens."""

    def __init__(self):
        self.gen = torch.Generator().manual_seed(0)
        self.last_refs: list = []  # (source, epoch, offset) per row of the last batch, for the batch log

    def next_batch(self) -> torch.Tensor:
        return torch.randint(0, TINY["vocab_size"], (2, 17), generator=self.gen)  # (B, T+1) on the host


def _step_reads(accum: int) -> Counter:
    from accelerate import Accelerator

    from training.fault_injection import TestFaults
    from training.pretrain import train_step
    from training.reliability import SpikeGuard

    torch.manual_seed(0)
    accelerator = Accelerator()
    model = GenesisForCausalLM(GenesisConfig(**TINY)).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model, optimizer = accelerator.prepare(model, optimizer)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    args = types.SimpleNamespace(gradient_accumulation_steps=accum, max_grad_norm=1.0, spike_policy="stop")
    loader = _Loader()

    def step(n: int):
        return train_step(model, optimizer, scheduler, loader, accelerator, args, SpikeGuard(3.0, 10),
                          TestFaults(0), n, TINY["vocab_size"])

    step(1)  # AdamW makes its state on the first step
    with HostReads() as reads:
        res = step(2)
    assert res.problem is None
    return Counter(reads.reads)


def test_train_step_reads_the_host_once_per_step_not_per_micro_batch(monkeypatch):
    monkeypatch.delenv("GENESIS_TEST_FAULTS", raising=False)
    monkeypatch.delenv("GENESIS_TEST_BATCH_LOG", raising=False)
    one, three = _step_reads(1), _step_reads(3)
    listing = "\n".join(f"{n} x {where}" for where, n in sorted(three.items()))
    assert not [w for w in three if w.startswith(("genesis_hf/", "transformers/"))], listing
    # Two more micro-batches add only check_batch's min/max of the loader's CPU batch (host memory:
    # no device sync); every other read happens once per optimizer step.
    assert three - one == Counter({"training/pretrain.py:check_batch": 2 * 2}), listing
    # What docs/pretraining.md lists: the loss and grad-norm reads of train_step, the finiteness
    # checks on the host floats they gave, AdamW's step counters (host tensors), check_batch.
    assert set(three) <= {"training/pretrain.py:check_batch", "training/pretrain.py:train_step",
                          "torch/optim/optimizer.py:_get_value"}, listing
