"""Held-out loss and bits per byte per source, for any export or checkpoint; and a hook the
pretraining loop can call every N steps.

    genesis eval out/genesis-1b-40k --data runs/data                     # an export
    genesis eval runs/genesis-1b --max-batches 16 --json eval.json        # every checkpoint of a run
    genesis eval out/genesis-1b-40k --data runs/data --write-lm-eval-tasks tasks/   # lm-eval, offline

Definitions (per source, over the validation shards' consecutive windows, the same windows as
the pretraining loop's `val_loss`):
    loss = mean next-token cross-entropy in nats over every target token (token-weighted)
    bpb  = sum of NLL over text targets / (ln 2 x UTF-8 bytes of those targets)
A target's bytes are its token's raw bytes (a byte-level token spells its bytes in GPT-2's byte
alphabet, so a piece of a multi-byte character counts only the bytes it holds; a byte-fallback
token <0xHH> of older SentencePiece-style vocabularies is 1 byte); special tokens
(<|endoftext|> between documents) have no bytes and are left out of bpb, not of loss. bpb does
not depend on the tokenizer, so models with different vocabularies compare on it.

The hook (`EvalHook`) runs the same fixed batches on every rank (FSDP needs every rank in every
forward), so it needs no reduction:

    hook = EvalHook(data_dir, tokenizer, seq_len=2048, micro_batch_size=4, max_batches=8, every=1000)
    if hook.due(step):
        record |= hook(model)           # {"val_loss": {src: ...}, "val_bpb": {src: ...}}
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import sys
from pathlib import Path

import torch

from . import InspectError

logger = logging.getLogger(__name__)
_BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def _is_byte_level(tokenizer) -> bool:
    """True when the tokenizer's decoder maps GPT-2's byte alphabet back to bytes (Genesis, GPT-2, Llama 3)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return False
    decoder = json.loads(backend.to_str()).get("decoder") or {}
    parts = decoder.get("decoders", [decoder]) if decoder.get("type") == "Sequence" else [decoder]
    return any(d.get("type") == "ByteLevel" for d in parts)


def token_byte_lengths(tokenizer) -> torch.Tensor:
    """(V,) int64: the raw bytes each token id stands for; 0 for special tokens."""
    from genesis_hf.tokenizer import token_bytes

    vocab = tokenizer.get_vocab()
    out = torch.zeros(max(len(tokenizer), max(vocab.values()) + 1), dtype=torch.int64)
    special = set(tokenizer.all_special_ids) | {i for t, i in vocab.items() if t in tokenizer.added_tokens_encoder}
    byte_level = _is_byte_level(tokenizer)
    for tok, i in vocab.items():
        if i in special:
            continue
        raw = token_bytes(tok) if byte_level else None
        if raw is not None:  # decoding one token alone would turn a partial character into U+FFFD
            out[i] = len(raw)
        elif _BYTE_TOKEN.match(tok):
            out[i] = 1
        else:  # raw characters or SentencePiece pieces; decode handles their conventions
            out[i] = len(tokenizer.convert_tokens_to_string([tok]).encode("utf-8"))
    return out


@torch.no_grad()
def evaluate_model(model, batches: dict[str, list[torch.Tensor]], byte_lengths: torch.Tensor | None = None,
                   ) -> dict[str, dict[str, float]]:
    """{source: {"loss", "bpb", "tokens", "bytes"}}. batches: {source: [(B, T+1) int64]} as from
    `training.data.loader.validation_batches`; like the training loop, tokens 0..T-1 of each window
    are the input and tokens 1..T the targets (all T positions count). bpb is NaN without byte_lengths."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = {}
    for source, rows in batches.items():
        nll_sum, n_tok, nll_text, n_bytes = 0.0, 0, 0.0, 0
        for batch in rows:
            batch = batch.to(device)
            x, targets = batch[:, :-1], batch[:, 1:]  # (B, T) each, as the loop's shift_labels
            logits = model(input_ids=x).logits.float()  # (B, T, V)
            nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")  # (B, T)
            nll_sum += nll.sum().item()
            n_tok += targets.numel()
            if byte_lengths is not None:
                nb = byte_lengths.to(device)[targets]  # (B, T)
                text = nb > 0
                nll_text += nll[text].sum().item()
                n_bytes += int(nb.sum().item())
        if n_tok:
            bpb = nll_text / (math.log(2) * n_bytes) if n_bytes else float("nan")
            out[source] = {"loss": nll_sum / n_tok, "bpb": bpb, "tokens": n_tok, "bytes": n_bytes}
    model.train(was_training)
    return out


class EvalHook:
    """Fixed held-out batches, loaded once; `hook(model)` -> metrics for the step's record."""

    def __init__(self, data_dir, tokenizer, *, seq_len: int, micro_batch_size: int, max_batches: int = 8,
                 every: int = 1000):
        from genesis_hf.tokenizer import tokenizer_fingerprint
        from training.data.loader import validation_batches

        self.every = every
        self.batches = validation_batches(data_dir, seq_len=seq_len, micro_batch_size=micro_batch_size,
                                          max_batches=max_batches,
                                          expected_fingerprint=tokenizer_fingerprint(tokenizer))
        self.byte_lengths = token_byte_lengths(tokenizer)

    def due(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    def __call__(self, model) -> dict[str, dict[str, float]]:
        res = evaluate_model(model, self.batches, self.byte_lengths)
        return {"val_loss": {s: r["loss"] for s, r in res.items()}, "val_bpb": {s: r["bpb"] for s, r in res.items()}}


def evaluate_path(path: str | Path, *, data_dir: str | Path | None = None, seq_len: int | None = None,
                  batch_size: int = 4, max_batches: int = 8, device: str = "cpu",
                  tokenizer_dir: str | Path | None = None, dtype: torch.dtype = torch.float32) -> dict:
    """Evaluate one export or checkpoint: {"model", "step", "seq_len", "data_dir", "sources": {...}}.
    A checkpoint defaults to its run's data and window; an export needs data_dir."""
    from genesis_hf.tokenizer import tokenizer_fingerprint
    from training.data.loader import validation_batches

    from .models import load_model

    model, tokenizer, info = load_model(path, device=device, tokenizer_dir=tokenizer_dir, dtype=dtype)
    data_dir = data_dir or info.data_dir
    if not data_dir:
        raise InspectError(f"{path}: an export does not say which data it was trained on; pass --data DIR")
    if not (Path(data_dir) / "manifest.json").is_file():
        raise InspectError(f"{data_dir}: not a prepared data folder (no manifest.json); see `genesis data prepare`")
    seq_len = seq_len or info.seq_len or min(model.config.max_position_embeddings, 2048)
    try:
        batches = validation_batches(data_dir, seq_len=seq_len, micro_batch_size=batch_size, max_batches=max_batches,
                                     expected_fingerprint=tokenizer_fingerprint(tokenizer))
    except ValueError as e:
        raise InspectError(f"{path} on {data_dir}: {e}") from e
    if not batches:
        raise InspectError(f"{data_dir}: no source has a full held-out window of {seq_len + 1} tokens")
    res = evaluate_model(model, batches, token_byte_lengths(tokenizer))
    return {"model": str(path), "label": info.label, "step": info.step, "seq_len": seq_len,
            "data_dir": str(data_dir), "sources": res}


def format_table(results: list[dict]) -> str:
    """A markdown table: one row per model, loss and bpb per source."""
    sources = sorted({s for r in results for s in r["sources"]})
    head = "| model | step | " + " | ".join(f"{s} loss | {s} bpb" for s in sources) + " |"
    lines = [head, "|" + "---|" * (2 + 2 * len(sources))]
    for r in results:
        cells = []
        for s in sources:
            v = r["sources"].get(s)
            cells += [f"{v['loss']:.4f}", f"{v['bpb']:.4f}"] if v else ["-", "-"]
        lines.append(f"| {r['label']} | {r['step'] if r['step'] is not None else '-'} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="genesis eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="+", help="exports, checkpoints, or run folders (= all their checkpoints)")
    p.add_argument("--data", default=None, help="prepared data folder (default: the checkpoint's run data)")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder, if a checkpoint's is not where it was")
    p.add_argument("--seq-len", type=int, default=None, help="window (default: the run's, else the model's)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-batches", type=int, default=8, help="per source")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="weights during evaluation (logits and the loss are fp32 either way)")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--write-lm-eval-tasks", default=None, metavar="DIR",
                   help="write offline lm-evaluation-harness tasks for the held-out text of --data, "
                        "and print the lm_eval command (docs/inspect.md)")
    return p


def cli_main(argv: list[str] | None = None) -> int:
    from .models import expand_paths

    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.write_lm_eval_tasks:
            from .lm_eval_tasks import lm_eval_command, write_val_text_tasks

            if not args.data:
                raise InspectError("--write-lm-eval-tasks needs --data DIR (the held-out text comes from it)")
            tasks = write_val_text_tasks(args.data, args.write_lm_eval_tasks, tokenizer_dir=args.tokenizer)
            for p in args.paths:
                print(" ".join(lm_eval_command(p, args.write_lm_eval_tasks, tasks, device=args.device)))
            return 0
        results = [evaluate_path(p, data_dir=args.data, seq_len=args.seq_len, batch_size=args.batch_size,
                                 max_batches=args.max_batches, device=args.device, tokenizer_dir=args.tokenizer,
                                 dtype=getattr(torch, args.dtype))
                   for p in expand_paths(args.paths)]
    except InspectError as e:
        print(f"genesis eval: {e}", file=sys.stderr)
        return 2
    print(format_table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(cli_main())
