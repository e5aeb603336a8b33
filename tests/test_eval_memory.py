"""Validation's memory and numbers (training/evaluation.py): per-token losses from the model's
chunked loss, no KV cache, and the same loss and bits per byte as cross-entropy on full logits."""

from __future__ import annotations

import math

import pytest
import torch
from _model_fixtures import TINY
from torch.distributed._tools.mem_tracker import MemTracker
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from genesis_hf import GenesisConfig, GenesisForCausalLM
from training.evaluation import evaluate_model

CPU = torch.device("cpu")


def _full_logits_reference(model, batches, byte_lengths) -> dict:
    """What validation computed before: cross-entropy over the whole (B, T, V) fp32 logits."""
    nll_sum = nll_text = 0.0
    n_tok = n_bytes = 0
    with torch.no_grad():
        for batch in batches:
            x, y = batch[:, :-1], batch[:, 1:]
            logits = model(input_ids=x, use_cache=False).logits.float()  # (B, T, V)
            nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), y, reduction="none")  # (B, T)
            nb = byte_lengths[y]
            nll_sum += nll.sum().item()
            nll_text += nll[nb > 0].sum().item()
            n_tok, n_bytes = n_tok + y.numel(), n_bytes + int(nb.sum())
    return {"loss": nll_sum / n_tok, "bpb": nll_text / (math.log(2) * n_bytes), "tokens": n_tok, "bytes": n_bytes}


def _byte_lengths(vocab: int) -> torch.Tensor:
    lengths = torch.randint(1, 5, (vocab,), generator=torch.Generator().manual_seed(1))
    lengths[:3] = 0  # special tokens: in the loss, not in bits per byte
    return lengths


@pytest.mark.parametrize("arch", ["genesis", "llama"])  # the chunked path / any other causal LM's logits
def test_validation_equals_cross_entropy_on_full_logits(arch):
    torch.manual_seed(0)
    if arch == "genesis":
        model = GenesisForCausalLM(GenesisConfig(**TINY, loss_chunk_size=7))  # chunks that do not divide B*T
    else:
        from transformers import LlamaConfig, LlamaForCausalLM

        model = LlamaForCausalLM(LlamaConfig(**TINY, head_dim=16))
    model.train()  # evaluate_model switches to eval and back
    batches = [torch.randint(0, TINY["vocab_size"], (3, 17)) for _ in range(2)]
    batches[0][0, 1:6] = 1  # targets with no bytes
    lengths = _byte_lengths(TINY["vocab_size"])
    got = evaluate_model(model, {"s": batches}, lengths)["s"]
    assert model.training
    want = _full_logits_reference(model.eval(), batches, lengths)
    assert got["tokens"] == want["tokens"] and got["bytes"] == want["bytes"]
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-6)
    assert got["bpb"] == pytest.approx(want["bpb"], rel=1e-6)


def _peak_bytes(fn) -> int:
    """Peak bytes of the tensors `fn` creates and holds at once (live storages, tracked per op)."""
    with MemTracker() as tracker:
        fn()
        return tracker.get_tracker_snapshot("peak")[CPU]["Total"]


def test_validation_peak_stays_within_a_training_forward():
    """A reduced 1B shape with the vocabulary dominating: vocab 8192, T 256, B 4, loss chunks of
    256 tokens. Before: the (B, T, V) fp32 logits plus the copy that cross-entropy over
    `logits.transpose(1, 2)` makes, and a KV cache: measured 66 MB against 31 MB for the training
    forward. Now: one chunk of logits at a time, 11 MB against 25 MB (this 2-core CPU machine)."""
    torch.manual_seed(0)
    cfg = GenesisConfig(**{**TINY, "vocab_size": 8192, "max_position_embeddings": 256, "loss_chunk_size": 256})
    model = GenesisForCausalLM(cfg).train()
    batch = torch.randint(0, cfg.vocab_size, (4, 257))  # (B, T+1) as from validation_batches
    lengths = _byte_lengths(cfg.vocab_size)

    def train_forward():
        return model(input_ids=batch[:, :-1], shift_labels=batch[:, 1:]).loss  # saved activations included

    train_peak = _peak_bytes(train_forward)
    val_peak = _peak_bytes(lambda: evaluate_model(model, {"s": [batch]}, lengths))
    full_logits = 4 * 256 * cfg.vocab_size * 4
    assert val_peak <= 1.2 * train_peak, (val_peak / 2**20, train_peak / 2**20)
    assert val_peak < full_logits  # never the (B, T, V) fp32 logits, not even once


class _LargestNewTensor(TorchDispatchMode):
    """Bytes of the largest tensor an op creates (views and in-place results are not new)."""

    largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        seen = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in seen:
                self.largest = max(self.largest, t.untyped_storage().nbytes())
        return out


def test_a_no_grad_loss_keeps_no_gradient_buffers():
    """Under no_grad the chunked loss must not precompute the gradients that training's fused
    forward does (a (V, d) fp32 buffer and an (N, d) one): same loss, no such tensor."""
    torch.manual_seed(0)
    cfg = GenesisConfig(**{**TINY, "vocab_size": 8192, "max_position_embeddings": 256, "loss_chunk_size": 32})
    model = GenesisForCausalLM(cfg).eval()
    x = torch.randint(0, cfg.vocab_size, (4, 257))
    grad_loss = model(input_ids=x[:, :-1], shift_labels=x[:, 1:], use_cache=False).loss
    with torch.no_grad(), _LargestNewTensor() as mode:
        loss = model(input_ids=x[:, :-1], shift_labels=x[:, 1:], use_cache=False).loss
    torch.testing.assert_close(loss, grad_loss.detach(), rtol=1e-6, atol=0)
    weight_grad = cfg.vocab_size * cfg.hidden_size * 4  # 2 MiB; a chunk of fp32 logits is 1 MiB
    assert mode.largest < weight_grad, mode.largest
