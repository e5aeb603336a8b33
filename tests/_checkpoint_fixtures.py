"""Tiny Genesis model + AdamW + LR schedule, and a deterministic train loop, for checkpoint tests.

Batches are drawn from the global torch RNG and the model uses attention dropout, so a resumed
run reproduces the straight run only if weights, AdamW moments, scheduler AND RNG all come back.
"""

from __future__ import annotations

import random

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

VOCAB, SEQ, BATCH = 96, 16, 2


class TinyLM(nn.Module):
    """A pure-torch causal LM (tied embeddings, dropout) for the subprocess tests that only need
    *a* model: importing transformers costs ~5-10 s per process on the 2-core CI machine."""

    def __init__(self, layers: int = 2, dim: int = 32):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, dim)
        self.layers = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
            for _ in range(layers)
        )
        self.drop = nn.Dropout(0.1)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, VOCAB, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, input_ids, labels):
        h = self.embed(input_ids)  # (B, T, D)
        for layer in self.layers:
            h = h + self.drop(layer(h))
        logits = self.head(self.norm(h))  # (B, T, V)
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
        return type("Out", (), {"loss": loss})


def tiny_config(layers: int = 2):
    from genesis_hf import GenesisConfig

    return GenesisConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        attention_dropout=0.1,
    )


def build(seed: int = 0, layers: int = 2, shard: bool = False, genesis: bool = True, ac: str | None = None):
    """(model, AdamW, LambdaLR warmup) with weights from `seed`: a tiny Genesis, or TinyLM when
    `genesis=False`. `shard`: FSDP2 per decoder layer and at the root (the optimizer is built
    after sharding, over the DTensor parameters). `ac`: activation checkpointing per decoder
    layer, wrapped "before" sharding (the wrapper is the FSDP unit: Accelerate >= 1.16) or
    "after" it (the layer is the unit, the wrapper around it: Accelerate 1.15)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    torch.manual_seed(seed)
    if genesis:
        from genesis_hf import GenesisForCausalLM

        model = GenesisForCausalLM(tiny_config(layers))
    else:
        model = TinyLM(layers)
    model.train()
    layers_list = model.model.layers if genesis else model.layers
    if ac not in (None, "before", "after"):
        raise ValueError(f"ac must be None, 'before' or 'after', got {ac!r}")
    if ac == "before":
        for i, layer in enumerate(layers_list):
            layers_list[i] = checkpoint_wrapper(layer)
    if shard:
        from torch.distributed.fsdp import fully_shard

        for layer in layers_list:
            fully_shard(layer)
        fully_shard(model)
    if ac == "after":
        for i, layer in enumerate(layers_list):
            layers_list[i] = checkpoint_wrapper(layer)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 4) * 0.5 ** (s // 5))
    return model, opt, sched


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train_steps(model, opt, sched, n: int) -> list[float]:
    """n optimizer steps on random batches from the global RNG; the losses as floats."""
    losses = []
    for _ in range(n):
        x = torch.randint(0, VOCAB, (BATCH, SEQ))
        labels = x.clone()
        # python and numpy RNG choose how many leading positions are masked: their restore matters too
        labels[:, : random.randint(0, 2) + int(np.random.randint(0, 2))] = -100
        loss = model(input_ids=x, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor, or the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def snapshot(model, opt) -> dict[str, torch.Tensor]:
    """Weights and AdamW state (this rank's shards) by name, cloned."""
    names = {p: n.replace("_checkpoint_wrapped_module.", "") for n, p in model.named_parameters()}
    out = {f"param/{n}": local(p.detach()).clone() for p, n in names.items()}
    for p, st in opt.state.items():
        for k, v in st.items():
            out[f"optim/{names[p]}/{k}"] = local(v.detach()).clone()
    return out


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs"
