"""Held-out loss per source, and how far it stands above counting: the loop's validation and `genesis eval`.

Definitions (per source, over the validation shards' consecutive windows; tokens 0..T-1 of a window
are the input and tokens 1..T the targets, as in training):
    loss = mean next-token cross-entropy in nats over every target token (token-weighted)
    bpb  = sum of NLL over text targets / (ln 2 x UTF-8 bytes of those targets)
A target's bytes are its token's raw bytes (a byte-level token spells its bytes in GPT-2's byte
alphabet, so a piece of a multi-byte character counts only the bytes it holds; a byte-fallback
token <0xHH> is 1 byte); special tokens (<|endoftext|>) have no bytes and are left out of bpb, not
of loss. bpb does not depend on the tokenizer, so models with different vocabularies compare on it.

Baselines: what counting gives on the same held-out targets.
    unigram = add-one smoothed token frequencies of the source's train shards
    bigram  = Witten-Bell interpolated bigram of the same counts:
              P(b|a) = (c(a,b) + T(a) P_uni(b)) / (c(a) + T(a)),  T(a) = distinct followers of a
Witten-Bell has no parameter to tune, so the baseline is not fitted to the held-out text. Counts
come from each source's own train shards (at most MAX_COUNT_TOKENS per source, stated in the
cache), are counted once and cached in the data folder (`baselines.npz` + `baselines.json`), and
are recounted when the shards change. `vs_bigram` = loss / bigram loss - 1: below 0 the model has
learned more than pairs of tokens; the quickstart ends at about -0.15 or lower.
"""

from __future__ import annotations

import io
import json
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from training.data import shards

logger = logging.getLogger(__name__)

_BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
BASELINE_FILES = ("baselines.json", "baselines.npz")
BASELINE_VERSION = 1
MAX_COUNT_TOKENS = 64_000_000  # per source: enough for stable bigram statistics, seconds to count


class BaselineError(ValueError):
    """Baselines refused (shards of another tokenizer, unreadable data)."""


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


@dataclass
class SourceCounts:
    """One source's unigram and bigram counts (bigrams sparse: sorted codes a * V + b)."""

    unigram: np.ndarray  # (V,) int64
    pair_codes: np.ndarray  # (K,) int64, sorted
    pair_counts: np.ndarray  # (K,) int64
    tokens: int

    def __post_init__(self):
        v = len(self.unigram)
        self.p_uni = (self.unigram + 1.0) / (self.tokens + v)  # (V,) add-one
        ctx = self.pair_codes // v
        self.ctx_count = np.bincount(ctx, weights=self.pair_counts, minlength=v)  # c(a)
        self.followers = np.bincount(ctx, minlength=v).astype(np.float64)  # T(a)

    def nll(self, ctx: np.ndarray, tgt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(unigram, bigram) NLL in nats of each target given its previous token; same shapes as tgt."""
        v = len(self.unigram)
        codes = ctx.astype(np.int64) * v + tgt
        idx = np.minimum(np.searchsorted(self.pair_codes, codes), max(len(self.pair_codes) - 1, 0))
        hit = self.pair_codes[idx] == codes if len(self.pair_codes) else np.zeros(codes.shape, bool)
        c_ab = np.where(hit, self.pair_counts[idx] if len(self.pair_counts) else 0, 0)
        p_uni = self.p_uni[tgt]
        c_a, t_a = self.ctx_count[ctx], self.followers[ctx]
        with np.errstate(divide="ignore", invalid="ignore"):
            p_bi = np.where(c_a > 0, (c_ab + t_a * p_uni) / (c_a + t_a), p_uni)
        return -np.log(p_uni), -np.log(p_bi)


def _count_source(data_dir: Path, entry: dict, dtype: np.dtype, vocab: int, max_tokens: int) -> SourceCounts:
    unigram = np.zeros(vocab, dtype=np.int64)
    codes, n = [], 0
    for shard in entry["shards"]:
        if shard["split"] != "train" or shard["tokens"] == 0 or n >= max_tokens:
            continue
        arr = np.asarray(shards.open_shard(data_dir, shard, dtype)[: max_tokens - n], dtype=np.int64)
        n += len(arr)
        unigram += np.bincount(arr, minlength=vocab)[:vocab]
        codes.append(arr[:-1] * vocab + arr[1:])  # pairs inside the shard (one per shard edge is lost)
    allc = np.concatenate(codes) if codes else np.zeros(0, np.int64)
    pair_codes, pair_counts = np.unique(allc, return_counts=True)
    return SourceCounts(unigram, pair_codes.astype(np.int64), pair_counts.astype(np.int64), n)


def _shard_ids(manifest: dict) -> dict[str, list[str]]:
    return {s: [sh["sha256"] for sh in e["shards"] if sh["split"] == "train"] for s, e in manifest["sources"].items()}


def load_baselines(data_dir: str | Path, *, expected_fingerprint: str | None = None, tokenizer_name: str = "the tokenizer",
                   max_tokens: int = MAX_COUNT_TOKENS, write_cache: bool = True) -> dict[str, SourceCounts]:
    """{source: SourceCounts} from the cache in `data_dir`, counting (and caching) when it is missing
    or stale. Refuses shards whose tokenizer fingerprint is not `expected_fingerprint`."""
    data_dir = Path(data_dir)
    try:
        manifest = shards.read_manifest(data_dir)
    except (FileNotFoundError, ValueError) as e:
        raise BaselineError(f"baselines: {e}") from e
    if expected_fingerprint is not None and manifest["fingerprint"] != expected_fingerprint:
        raise BaselineError(
            f"baselines: {data_dir} holds shards of tokenizer fingerprint {manifest['fingerprint'][:16]}... "
            f"({manifest.get('tokenizer_format') or 'an older tokenizer'}), but {tokenizer_name} has fingerprint "
            f"{expected_fingerprint[:16]}...: refusing to count baselines that would not match the model's tokens")
    dtype = np.dtype(manifest["dtype"])
    vocab = int(manifest.get("vocab_size") or np.iinfo(dtype).max + 1)
    meta_path, npz_path = (data_dir / f for f in BASELINE_FILES)
    want = {"version": BASELINE_VERSION, "fingerprint": manifest["fingerprint"], "vocab_size": vocab,
            "max_tokens_per_source": max_tokens, "train_shards": _shard_ids(manifest)}
    try:
        meta = json.loads(meta_path.read_text())
        if {k: meta.get(k) for k in want} == want:
            with np.load(npz_path) as z:
                return {s: SourceCounts(z[f"{s}/unigram"], z[f"{s}/codes"], z[f"{s}/counts"], meta["tokens"][s])
                        for s in meta["tokens"]}
    except (OSError, ValueError, KeyError, EOFError):
        pass  # no cache, or a stale / damaged one: count again
    out = {s: _count_source(data_dir, e, dtype, vocab, max_tokens) for s, e in sorted(manifest["sources"].items())}
    out = {s: c for s, c in out.items() if c.tokens > 1}
    logger.info("baselines counted from the train shards of %s: %s", data_dir,
                ", ".join(f"{s} {c.tokens:,} tokens" for s, c in out.items()))
    if write_cache:
        buf = io.BytesIO()
        np.savez(buf, **{f"{s}/{k}": v for s, c in out.items()
                         for k, v in (("unigram", c.unigram), ("codes", c.pair_codes), ("counts", c.pair_counts))})
        try:
            shards.write_bytes_atomic(npz_path, buf.getvalue())
            shards.write_json_atomic(meta_path, want | {"tokens": {s: c.tokens for s, c in out.items()},
                                                        "method": "unigram add-one; bigram Witten-Bell"})
        except OSError as e:  # a read-only data folder: the counts still serve this process
            logger.warning("baselines: could not cache in %s (%s)", data_dir, e)
    return out


def baseline_losses(counts: dict[str, SourceCounts], batches: dict[str, list[torch.Tensor]],
                    byte_lengths: torch.Tensor | None = None) -> dict[str, dict[str, float]]:
    """{source: {"unigram", "bigram", "unigram_bpb", "bigram_bpb"}} on the same targets as evaluate_model."""
    out = {}
    bl = byte_lengths.numpy() if byte_lengths is not None else None
    for source, rows in batches.items():
        if source not in counts:
            continue
        arr = torch.cat([b for b in rows]).numpy()  # (N, T+1)
        ctx, tgt = arr[:, :-1], arr[:, 1:]
        uni, bi = counts[source].nll(ctx, tgt)
        res = {"unigram": float(uni.mean()), "bigram": float(bi.mean())}
        if bl is not None:
            nb = bl[np.minimum(tgt, len(bl) - 1)]
            text, n_bytes = nb > 0, int(nb.sum())
            for name, nll in (("unigram", uni), ("bigram", bi)):
                res[f"{name}_bpb"] = float(nll[text].sum() / (math.log(2) * n_bytes)) if n_bytes else float("nan")
        out[source] = res
    return out


def token_nll(model, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(B, T) fp32 next-token NLL of `targets` given `x`, under no grad, with no KV cache.

    Genesis (bare, or wrapped by DDP/FSDP: `model` is called as the loop prepared it) computes it
    in the model with its chunked loss, so validation never holds the (B, T, V) logits. At the 1B's
    4 x 2048 x 49,152 in bf16 the head's transient was 3.2 GiB (bf16 logits, their fp32 copy, and
    cross-entropy's result over `logits.transpose(1, 2)`) and is 0.45 GiB; the unused KV cache was
    another 0.8 GB (32 layers). Other causal LMs (a Llama export) give logits.
    """
    from transformers import PreTrainedModel

    from genesis_hf.modeling_genesis import GenesisForCausalLM

    core = getattr(model, "module", model)  # DDP keeps the model in .module; FSDP2 is the model itself
    if isinstance(core, GenesisForCausalLM):
        return model(input_ids=x, shift_labels=targets, loss_reduction="none", use_cache=False).loss
    kwargs = {"use_cache": False} if isinstance(core, PreTrainedModel) else {}
    logits = model(input_ids=x, **kwargs).logits  # (B, T, V)
    nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="none")
    return nll.view_as(targets)


@torch.no_grad()
def evaluate_model(model, batches: dict[str, list[torch.Tensor]], byte_lengths: torch.Tensor | None = None,
                   baselines: dict[str, SourceCounts] | None = None) -> dict[str, dict[str, float]]:
    """{source: {"loss", "bpb", "tokens", "bytes"} (+ "unigram", "bigram", their bpb and "vs_bigram"
    with `baselines`)}. batches: {source: [(B, T+1) int64]} as from `validation_batches`; bpb is NaN
    without byte_lengths."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    lengths = byte_lengths.to(device) if byte_lengths is not None else None
    out = {}
    for source, rows in batches.items():
        # Sums stay on the device and are read once per source: no host sync per batch.
        sums = torch.zeros(3, dtype=torch.float64, device=device)  # NLL, NLL of text targets, bytes
        n_tok = 0
        for batch in rows:
            batch = batch.to(device)
            x, targets = batch[:, :-1], batch[:, 1:]  # (B, T) each, as the loop's shift_labels
            nll = token_nll(model, x, targets)  # (B, T) fp32
            sums[0] += nll.sum()
            n_tok += targets.numel()
            if lengths is not None:
                nb = lengths[targets]  # (B, T)
                sums[1] += torch.where(nb > 0, nll, 0.0).sum()  # not nll[nb > 0]: its size is a host read
                sums[2] += nb.sum()
        if n_tok:
            nll_sum, nll_text, n_bytes = sums.tolist()
            n_bytes = int(n_bytes)
            bpb = nll_text / (math.log(2) * n_bytes) if n_bytes else float("nan")
            out[source] = {"loss": nll_sum / n_tok, "bpb": bpb, "tokens": n_tok, "bytes": n_bytes}
    model.train(was_training)
    if baselines:
        for source, base in baseline_losses(baselines, batches, byte_lengths).items():
            if source in out:
                out[source] |= base | {"vs_bigram": out[source]["loss"] / base["bigram"] - 1.0}
    return out


def metrics_record(results: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """evaluate_model's result as the loop's metrics.jsonl fields, one dict per quantity keyed by source:
    val_loss, val_bpb and, with baselines, val_unigram, val_bigram, val_bigram_bpb, val_vs_bigram."""
    keys = {"val_loss": "loss", "val_bpb": "bpb", "val_unigram": "unigram", "val_bigram": "bigram",
            "val_bigram_bpb": "bigram_bpb", "val_vs_bigram": "vs_bigram"}
    rec = {k: {s: r[f] for s, r in results.items() if f in r} for k, f in keys.items()}
    return {k: v for k, v in rec.items() if v}


_BASELINE_CACHE: dict[str, dict[str, SourceCounts]] = {}


def validation_metrics(model, val: dict[str, list[torch.Tensor]], byte_lengths: torch.Tensor | None) -> dict:
    """The loop's validation: evaluate_model with the data folder's baselines when `val` says where it
    came from (`val.data_dir`, as from `validation_batches`), as metrics.jsonl fields. Baselines are
    loaded (or counted) once per process and data folder."""
    data_dir = getattr(val, "data_dir", None)
    baselines = None
    if data_dir is not None:
        key = str(Path(data_dir).resolve())
        if key not in _BASELINE_CACHE:
            _BASELINE_CACHE[key] = load_baselines(data_dir, expected_fingerprint=getattr(val, "fingerprint", None))
        baselines = _BASELINE_CACHE[key]
    return metrics_record(evaluate_model(model, val, byte_lengths, baselines))
