"""The training-side loader: fixed windows over memory-mapped shards, mixed by weight, exactly resumable.

Packing. Each source's train shards form one token stream (documents already end with
<|endoftext|>). The stream is cut into windows of ``seq_len + 1`` tokens at multiples of
``seq_len + 1``; a batch row is one window, so ``x = b[:, :-1]``, ``y = b[:, 1:]`` and every token
of a window is used. Documents run across window edges (no padding, no truncation waste). The
last ``len % (seq_len + 1)`` tokens of a source belong to no window (reported as
``unused_tail_tokens``, < one window per source): the packing remainder is a constant of the
data, not of the run, so no run state is needed to carry it.

Order. Epoch ``e`` of source ``s`` visits its windows in the permutation drawn by
``np.random.default_rng([seed, e, crc32(s)])``. The visit sequence of a source is the endless
concatenation epoch 0, 1, 2, ...: a new seeded order begins exactly when a source is exhausted.

Ranks. Every rank computes the same source schedule. The ``k``-th global draw of source ``s``
takes visit positions ``consumed[s] + rank`` for each rank, then ``consumed[s] += world_size``:
ranks are disjoint and together complete, for any world size, across epoch edges.

Mixture. The source of each draw is the one furthest behind its target share:
``argmax_s(w_s * (n + 1) - d_s)`` over the ``n`` draws of the current mixture segment (``d_s``
of them from ``s``; ties to the first name). Shares are exact to within one draw at every
step, with no randomness. Changing the weights starts a new segment: ``consumed`` is kept, so
no consumed window is replayed, and the new weights hold from that point.

State (`state_dict`, JSON): per source ``consumed`` (global visit position, identical on all
ranks) and its size, the segment's weights and draw counts, and this rank's per-source token
counters. `load_state_dict` refuses a different tokenizer, sequence length, seed, split, or
changed source data, and a different world size / micro-batch size unless
``allow_resharding=True`` (consumed positions are global, so resharding is exact).
"""

from __future__ import annotations

import logging
import zlib
from pathlib import Path

import numpy as np
import torch

from training.data import shards

logger = logging.getLogger(__name__)

STATE_VERSION = 1


class _Source:
    """One source's shards as a single virtual token array."""

    def __init__(self, data_dir: Path, name: str, entry: dict, split: str, dtype: np.dtype, checksum: bool):
        self.name = name
        parts = [s for s in entry["shards"] if s["split"] == split and s["tokens"] > 0]
        self.arrays = [shards.open_shard(data_dir, s, dtype, checksum=checksum) for s in parts]
        lengths = np.array([len(a) for a in self.arrays], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(lengths)])  # starts[i] = offset of shard i
        self.tokens = int(self.starts[-1])
        self.key = zlib.crc32(name.encode())

    def read(self, start: int, length: int) -> np.ndarray:
        i = int(np.searchsorted(self.starts, start, side="right")) - 1
        off = start - int(self.starts[i])
        piece = self.arrays[i][off : off + length]
        if len(piece) == length:
            return piece
        out = [piece]
        need = length - len(piece)
        while need > 0:  # the window crosses into the next shard(s)
            i += 1
            nxt = self.arrays[i][:need]
            out.append(nxt)
            need -= len(nxt)
        return np.concatenate(out)


class PackedLoader:
    """Batches of shape (micro_batch_size, seq_len + 1), int64, for one rank. See the module doc."""

    def __init__(self, data_dir, *, seq_len: int, micro_batch_size: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, split: str = "train", expected_fingerprint: str | None = None,
                 weights: dict[str, float] | None = None, verify_checksums: bool = False):  # fmt: skip
        if seq_len < 1 or micro_batch_size < 1:
            raise ValueError(f"seq_len={seq_len} and micro_batch_size={micro_batch_size} must be >= 1")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
        self.data_dir = Path(data_dir)
        self.manifest = shards.read_manifest(self.data_dir)
        self.fingerprint: str = self.manifest["fingerprint"]
        shards.check_fingerprint(self.data_dir, self.manifest, expected_fingerprint)
        self.seq_len, self.micro_batch_size, self.window = seq_len, micro_batch_size, seq_len + 1
        self.rank, self.world_size, self.seed, self.split = rank, world_size, seed, split
        dtype = np.dtype(self.manifest["dtype"])
        self.sources: dict[str, _Source] = {}
        for name in sorted(self.manifest["sources"]):
            src = _Source(self.data_dir, name, self.manifest["sources"][name], split, dtype, verify_checksums)
            if src.tokens < self.window:
                raise ValueError(f"{self.data_dir}: source {name!r} has {src.tokens} {split} tokens, fewer than one "
                                 f"window of seq_len + 1 = {self.window}")  # fmt: skip
            self.sources[name] = src
        self.n_windows = {n: s.tokens // self.window for n, s in self.sources.items()}
        self.weights = self._normalise(weights or {n: e["weight"] for n, e in self.manifest["sources"].items()})
        self.consumed = dict.fromkeys(self.sources, 0)
        self.draws = dict.fromkeys(self.sources, 0)
        self.tokens_by_source: dict[str, int] = dict.fromkeys(self.sources, 0)
        self.retired: dict[str, dict] = {}  # sources in a loaded state that this data lacks (kept, not lost)
        self.batches = 0
        self.last_refs: list[tuple[str, int, int]] = []  # (source, epoch, token offset) per row of the last batch
        # Global visit positions [lo, hi) per source never to be read (a spike's data: training/recovery.py).
        self.skips: dict[str, list[tuple[int, int]]] = {}
        self.skipped_tokens_by_source: dict[str, int] = dict.fromkeys(self.sources, 0)  # global, every rank alike
        self._perms: dict[tuple[str, int], np.ndarray] = {}

    def _normalise(self, weights: dict[str, float]) -> dict[str, float]:
        unknown = set(weights) - set(self.sources)
        if unknown:
            raise ValueError(f"weights name unknown sources {sorted(unknown)}; data has {sorted(self.sources)}")
        if any(w < 0 for w in weights.values()):
            raise ValueError(f"negative mixture weight in {weights}")
        total = sum(weights.values())
        if total <= 0:
            raise ValueError(f"mixture weights sum to {total}")
        return {n: float(weights.get(n, 0.0)) / total for n in self.sources}

    @property
    def unused_tail_tokens(self) -> dict[str, int]:
        return {n: s.tokens - self.n_windows[n] * self.window for n, s in self.sources.items()}

    # ------------------------------------------------------------------ order

    def _perm(self, name: str, epoch: int) -> np.ndarray:
        key = (name, epoch)
        if key not in self._perms:
            rng = np.random.default_rng([self.seed, epoch, self.sources[name].key])
            n = self.n_windows[name]
            self._perms = {k: v for k, v in self._perms.items() if k[0] != name or k[1] >= epoch - 1}
            self._perms[key] = rng.permutation(n).astype(np.int64)
        return self._perms[key]

    def _pick(self) -> str:
        n = sum(self.draws.values())
        best, best_gap = None, None
        for name, w in self.weights.items():  # sorted by name; the first maximum wins ties
            if w <= 0:
                continue
            gap = w * (n + 1) - self.draws[name]
            if best_gap is None or gap > best_gap + 1e-12:
                best, best_gap = name, gap
        return best

    def window_ref(self, name: str, position: int) -> tuple[int, int]:
        """(epoch, token offset) of global visit `position` of source `name`."""
        n = self.n_windows[name]
        epoch, j = divmod(position, n)
        return epoch, int(self._perm(name, epoch)[j]) * self.window

    # ------------------------------------------------------------------ batches

    def set_skips(self, skips: dict[str, list]) -> None:
        """Positions never to be read, {source: [[lo, hi), ...]} in global visit positions. A draw that
        lands in an interval jumps to its end (every rank alike: positions are global), so nothing
        is read twice and nothing outside the intervals is skipped."""
        self.skips = {n: sorted((int(lo), int(hi)) for lo, hi in ivs) for n, ivs in skips.items()}

    def _jump_skips(self, name: str) -> None:
        for lo, hi in self.skips.get(name, ()):
            if lo <= self.consumed[name] < hi:
                self.skipped_tokens_by_source[name] += (hi - self.consumed[name]) * self.window
                self.consumed[name] = hi

    def consumed_after(self, draws: int) -> dict[str, int]:
        """The global positions `draws` draws from now (each draw: one window per rank), without
        reading data or changing state."""
        saved = dict(self.consumed), dict(self.draws), dict(self.skipped_tokens_by_source)
        try:
            for _ in range(draws):
                name = self._pick()
                self._jump_skips(name)
                self.consumed[name] += self.world_size
                self.draws[name] += 1
            return dict(self.consumed)
        finally:
            self.consumed, self.draws, self.skipped_tokens_by_source = saved

    def locate(self, name: str, offset: int) -> dict:
        """Where a window's first token lies: shard file, offset in it, and the index of the document
        it falls in (documents end with eos: counted in that shard up to the offset). For reports."""
        src = self.sources[name]
        i = int(np.searchsorted(src.starts, offset, side="right")) - 1
        off = offset - int(src.starts[i])
        parts = [s for s in self.manifest["sources"][name]["shards"] if s["split"] == self.split and s["tokens"] > 0]
        eos = self.manifest.get("eos_token_id")
        doc = int(np.count_nonzero(np.asarray(src.arrays[i][:off]) == eos)) if eos is not None else None
        return {"shard": parts[i]["file"], "shard_offset": off, "doc_index_in_shard": doc}

    def next_batch(self) -> torch.Tensor:
        rows, refs = [], []
        for _ in range(self.micro_batch_size):
            name = self._pick()
            self._jump_skips(name)
            epoch, start = self.window_ref(name, self.consumed[name] + self.rank)
            rows.append(self.sources[name].read(start, self.window))
            refs.append((name, epoch, start))
            self.consumed[name] += self.world_size
            self.draws[name] += 1
            self.tokens_by_source[name] += self.window
        self.batches += 1
        self.last_refs = refs
        return torch.from_numpy(np.stack(rows).astype(np.int64))  # (micro_batch_size, seq_len + 1)

    def __iter__(self):
        while True:
            yield self.next_batch()

    def epochs(self) -> dict[str, float]:
        """Fraction of epochs consumed per source (global, all ranks)."""
        return {n: self.consumed[n] / self.n_windows[n] for n in self.sources}

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict:
        sources = {n: {"consumed": self.consumed[n], "n_windows": self.n_windows[n], "tokens": s.tokens}
                   for n, s in self.sources.items()}  # fmt: skip
        sources.update(self.retired)
        return {
            "version": STATE_VERSION,
            "fingerprint": self.fingerprint,
            "seq_len": self.seq_len,
            "seed": self.seed,
            "split": self.split,
            "rank": self.rank,
            "world_size": self.world_size,
            "micro_batch_size": self.micro_batch_size,
            "batches": self.batches,
            "sources": sources,
            "segment": {"weights": dict(self.weights), "draws": dict(self.draws)},
            "tokens_by_source": dict(self.tokens_by_source),
            "skipped_tokens_by_source": dict(self.skipped_tokens_by_source),
        }

    def load_state_dict(self, state: dict, *, allow_resharding: bool = False) -> None:
        def check(field: str, expected) -> None:
            if field not in state:
                raise ValueError(f"loader state lacks field {field!r}")
            if state[field] != expected:
                raise ValueError(f"loader state field {field!r} is {state[field]!r}, this run has {expected!r}")

        check("version", STATE_VERSION)
        check("fingerprint", self.fingerprint)
        for field in ("seq_len", "seed", "split"):
            check(field, getattr(self, field))
        for field in ("world_size", "micro_batch_size", "rank"):
            if allow_resharding and state.get(field) != getattr(self, field):
                logger.warning("resuming with %s=%s (state has %s): allowed by allow_resharding",
                               field, getattr(self, field), state.get(field))  # fmt: skip
            else:
                check(field, getattr(self, field))
        consumed, retired = dict.fromkeys(self.sources, 0), {}
        for name, entry in state["sources"].items():
            if name not in self.sources:
                retired[name] = entry
                logger.info("source %r is in the loader state but not in this data: its position is kept", name)
                continue
            for field in ("n_windows", "tokens"):
                have = self.n_windows[name] if field == "n_windows" else self.sources[name].tokens
                if entry[field] != have:
                    raise ValueError(
                        f"loader state field sources.{name}.{field} is {entry[field]}, the data in "
                        f"{self.data_dir} has {have}: the source changed since the state was saved (its window "
                        "order would change; add new data at a cycle boundary as a source with a new name)"
                    )
            consumed[name] = int(entry["consumed"])
        segment = state["segment"]
        same_mix = set(segment["weights"]) == set(self.weights) and all(
            abs(segment["weights"][n] - w) < 1e-12 for n, w in self.weights.items()
        )
        if same_mix:
            # A draw takes one window per rank: on another world size, count the segment's draws in
            # this run's unit, so the shares keep to within one draw. (Positions are unaffected.)
            scale = int(state["world_size"]) / self.world_size
            self.draws = {n: round(int(segment["draws"].get(n, 0)) * scale) for n in self.sources}
        else:
            logger.info("mixture changed at batch %d: %s -> %s; a new segment starts, no data is replayed",
                        state["batches"], segment["weights"], self.weights)  # fmt: skip
            self.draws = dict.fromkeys(self.sources, 0)
        self.consumed, self.retired = consumed, retired
        old_tokens = state.get("tokens_by_source", {})
        self.tokens_by_source = {n: int(old_tokens.get(n, 0)) for n in self.sources}
        old_skipped = state.get("skipped_tokens_by_source", {})
        self.skipped_tokens_by_source = {n: int(old_skipped.get(n, 0)) for n in self.sources}
        self.batches = int(state["batches"])


class ValidationBatches(dict):
    """{source: [(B, T+1) int64]} that also says which data folder (and tokenizer fingerprint) it
    came from, so that an evaluation can find the folder's count baselines (training/evaluation.py)."""

    def __init__(self, data_dir: Path, fingerprint: str):
        super().__init__()
        self.data_dir, self.fingerprint = data_dir, fingerprint


def validation_batches(data_dir, *, seq_len: int, micro_batch_size: int, max_batches: int = 8,
                       expected_fingerprint: str | None = None) -> ValidationBatches:  # fmt: skip
    """Held-out batches per source: consecutive windows of the val shards, the same on every rank
    and every call. Each batch is (<= micro_batch_size, seq_len + 1) int64; only the last may be short.
    A source with less than one window of held-out text is left out (and logged)."""
    data_dir = Path(data_dir)
    manifest = shards.read_manifest(data_dir)
    shards.check_fingerprint(data_dir, manifest, expected_fingerprint)
    dtype, window = np.dtype(manifest["dtype"]), seq_len + 1
    out = ValidationBatches(data_dir, manifest["fingerprint"])
    for name in sorted(manifest["sources"]):
        src = _Source(data_dir, name, manifest["sources"][name], "val", dtype, checksum=False)
        n = min(src.tokens // window, max_batches * micro_batch_size)
        if n == 0:
            logger.warning("source %r: %d held-out tokens, less than one window of %d", name, src.tokens, window)
            continue
        rows = np.stack([src.read(i * window, window) for i in range(n)]).astype(np.int64)
        out[name] = list(torch.from_numpy(rows).split(micro_batch_size))
    return out
