"""The merge: one source's tokenized pieces, in piece order, into its shards and ledger.

Everything whose result depends on order happens here, sequentially, in piece index order, so it
is exact and the same at any number of workers (or engine tasks):
- **duplicates across pieces**: a document whose digest an earlier piece (or an earlier document
  of its own piece, see `pieces.tokenize_piece`) already had is dropped and counted. The digests
  of every committed document are kept in ``dedup-NNNNN.u64`` files and loaded at resume;
- **validation hold-out**: a document goes to validation when its digest < ``validation_fraction``
  and the source's held-out tokens stay <= ``validation_max_tokens``;
- **token budget**: train documents are taken until the source's train tokens reach its budget
  (the smallest whole-document prefix of the ordered stream that reaches it);
- **shards**: a shard is cut at the first document end at or past ``shard_tokens``.

Commit (after each merged piece): new shards, the digests and the tokens not yet in a shard
("carry" chunks) are written to temp names and renamed, then ``progress.json`` is replaced: the
commit point. A killed merge leaves files progress.json does not list; the re-run deletes them.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np

from training.data import shards
from training.data.pieces import piece_path, read_piece

logger = logging.getLogger(__name__)

COUNTERS = ("documents", "train_tokens", "val_tokens", "val_documents", "dropped_empty", "dropped_duplicate",
            "dropped_non_utf8", "records_read")  # fmt: skip


class SourceMerger:
    def __init__(self, out: Path, pieces_dir: Path, name: str, *, fingerprint: str, identity: str, plan: str,
                 n_pieces: int, budget: int | None, mixture: dict, dtype: np.dtype, origin: str = "",
                 overrides: bool = False):  # fmt: skip
        self.origin, self._stale = origin, []
        self.dir, self.pieces_dir, self.name, self.n_pieces = out / name, pieces_dir, name, n_pieces
        self.budget = budget if budget is not None else 1 << 62
        self.mix, self.dtype = mixture, dtype
        self.dir.mkdir(parents=True, exist_ok=True)
        self.state = self._load(fingerprint, identity, plan, overrides)
        keep = ({Path(s["file"]).name for s in self.state["shards"]} | set(self.state["dedup_files"])
                | {c["file"] for cs in self.state["carry"].values() for c in cs} | {"progress.json"})  # fmt: skip
        for f in self.dir.iterdir():
            if f.name not in keep:
                logger.info("removing uncommitted file %s", f)
                f.unlink()
        self.seen: set[int] = set()
        for f in self.state["dedup_files"]:
            self.seen.update(np.fromfile(self.dir / f, dtype=np.uint64).tolist())
        c = self.state["counters"]
        if self.state["complete"] and self.state["truncated_by_budget"] and c["train_tokens"] < self.budget:
            self.state["complete"] = False  # the budget was raised: continue where the cut was
        self.val_cut = int(mixture["validation_fraction"] * 2**64)

    def _load(self, fingerprint: str, identity: str, plan: str, overrides: bool) -> dict:
        path = self.dir / "progress.json"
        fresh = {"fingerprint": fingerprint, "identity": identity, "plan": plan, "next_piece": 0, "next_doc": 0,
                 "commits": 0, "complete": False, "truncated_by_budget": False, "shards": [], "dedup_files": [],
                 "next_shard": {"train": 0, "val": 0}, "carry": {"train": [], "val": []},
                 "counters": dict.fromkeys(COUNTERS, 0)}  # fmt: skip
        if not path.is_file():
            return fresh
        try:
            state = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: unreadable progress file ({exc.msg})") from None
        if state.get("fingerprint") != fingerprint:
            raise ValueError(
                f"{path}: source {self.name!r} was tokenized with tokenizer {str(state.get('fingerprint'))[:16]}..., "
                f"this run uses {fingerprint[:16]}...: refusing to mix tokenizers (choose a new --output)"
            )
        if state.get("identity") != identity or state.get("plan") != plan:
            if not overrides:
                raise ValueError(
                    f"{path}: source {self.name!r} changed (origin, schema, fields or file contents) since its shards "
                    f"were written: its pieces differ. Pass --overrides {self.name} to prepare it again from scratch"
                )
            logger.warning("source %r changed; --overrides: preparing it again from scratch", self.name)
            for f in self.dir.iterdir():
                f.unlink()
            shutil.rmtree(self.pieces_dir / self.name, ignore_errors=True)
            return fresh
        return state

    @property
    def complete(self) -> bool:
        return self.state["complete"]

    @property
    def next_piece(self) -> int:
        return self.state["next_piece"]

    def merge_ready(self) -> int:
        """Merge every consecutive tokenized piece from `next_piece` on; returns how many were merged."""
        merged = 0
        while not self.complete and self.state["next_piece"] < self.n_pieces:
            stem = piece_path(self.pieces_dir, self.name, self.state["next_piece"])
            if not stem.with_suffix(".json").is_file():
                break
            self._merge_piece(stem)
            merged += 1
        if not self.complete and self.state["next_piece"] >= self.n_pieces:
            self._finish()
        return merged

    def _merge_piece(self, stem: Path) -> None:
        st, c = self.state, self.state["counters"]
        ledger, tok, dig, lens = read_piece(stem, self.dtype)
        first = st["next_doc"]
        if first == 0:  # a piece's drops and records are counted once, when the merge starts it
            for k in ("dropped_empty", "dropped_non_utf8", "dropped_duplicate"):
                c[k] += ledger[k]
            c["records_read"] += ledger["records"]
        labels = np.zeros(len(dig), dtype=np.int8)  # 0 dropped / not reached, 1 train, 2 val
        new_digests, stop = [], len(dig)
        val_max = self.mix["validation_max_tokens"]
        for i in range(first, len(dig)):
            d, n = int(dig[i]), int(lens[i])
            if d in self.seen:
                c["dropped_duplicate"] += 1
                continue
            self.seen.add(d)
            new_digests.append(d)
            c["documents"] += 1
            if d < self.val_cut and c["val_tokens"] + n <= val_max:
                labels[i] = 2
                c["val_tokens"] += n
                c["val_documents"] += 1
                continue
            labels[i] = 1
            c["train_tokens"] += n
            if c["train_tokens"] >= self.budget:
                stop = i + 1
                break
        per_token = np.repeat(labels, lens)
        for split, label in (("train", 1), ("val", 2)):
            self._append(split, tok[per_token == label], lens[labels == label])
        if stop < len(dig):
            st["next_doc"], st["truncated_by_budget"] = stop, True
        else:
            st["next_piece"], st["next_doc"] = st["next_piece"] + 1, 0
            st["truncated_by_budget"] = c["train_tokens"] >= self.budget and st["next_piece"] < self.n_pieces
        if new_digests:
            name = f"dedup-{st['commits']:05d}.u64"
            shards.write_array_atomic(self.dir / name, np.array(new_digests, dtype=np.uint64))
            st["dedup_files"].append(name)
        if st["truncated_by_budget"]:
            self._finish()
        else:
            self._commit()

    def _append(self, split: str, tokens: np.ndarray, doc_lens: np.ndarray) -> None:
        """Add whole documents to `split`; cut a shard at each document end past shard_tokens."""
        if not len(doc_lens):
            return
        carry = self.state["carry"][split]
        carried = sum(ch["tokens"] for ch in carry)
        ends = carried + np.cumsum(doc_lens, dtype=np.int64)  # document ends in (carry + tokens) coordinates
        base, parts = 0, []
        while True:
            k = int(np.searchsorted(ends, base + self.mix["shard_tokens"], side="left"))
            if k >= len(ends):
                break
            parts.append((base, int(ends[k])))
            base = int(ends[k])
        if parts:
            pending = np.concatenate([self._read_carry(split), tokens])
            for a, b in parts:
                self._write_shard(split, pending[a:b])
            tokens = pending[base:]
            self._stale += [ch["file"] for ch in carry]  # deleted once the commit no longer lists them
            carry = self.state["carry"][split] = []
        if len(tokens):
            name = f"carry-{split}-{self.state['commits']:05d}.bin"
            sha = shards.write_array_atomic(self.dir / name, tokens.astype(self.dtype, copy=False))
            carry.append({"file": name, "tokens": int(len(tokens)), "sha256": sha})

    def _read_carry(self, split: str) -> np.ndarray:
        chunks = [np.fromfile(self.dir / ch["file"], dtype=self.dtype) for ch in self.state["carry"][split]]
        return np.concatenate(chunks) if chunks else np.zeros(0, dtype=self.dtype)

    def _write_shard(self, split: str, arr: np.ndarray) -> None:
        idx = self.state["next_shard"][split]
        rel = f"{self.name}/{split}-{idx:05d}.bin"
        sha = shards.write_array_atomic(self.dir / f"{split}-{idx:05d}.bin", arr.astype(self.dtype, copy=False))
        self.state["shards"].append({"file": rel, "split": split, "tokens": int(len(arr)), "sha256": sha})
        self.state["next_shard"][split] = idx + 1

    def _commit(self) -> None:
        self.state["commits"] += 1
        shards.write_json_atomic(self.dir / "progress.json", self.state)  # the commit point
        for f in self._stale:
            (self.dir / f).unlink(missing_ok=True)
        self._stale = []
        for i in range(self.state["next_piece"]):  # merged pieces are no longer needed
            stem = piece_path(self.pieces_dir, self.name, i)
            for ext in (".json", ".tok", ".dig", ".len"):
                stem.with_suffix(ext).unlink(missing_ok=True)

    def _finish(self) -> None:
        """Flush the carry into final shards; the source is complete."""
        c = self.state["counters"]
        if c["documents"] == 0:
            raise ValueError(f"{self.origin}: source {self.name!r} yielded no usable documents ({c['records_read']} records read; "
                             f"{c['dropped_empty']} empty, {c['dropped_non_utf8']} non-UTF-8)")  # fmt: skip
        for split in ("train", "val"):
            if self.state["carry"][split]:
                self._write_shard(split, self._read_carry(split))
                self._stale += [ch["file"] for ch in self.state["carry"][split]]
                self.state["carry"][split] = []
        self.state["complete"] = True
        self._commit()

    def manifest_entry(self) -> dict:
        # Train shards first, then held-out ones, each in stream order (piece sizes move the val cuts).
        listed = sorted(self.state["shards"], key=lambda s: (s["split"] != "train", s["file"]))
        return {**self.state["counters"], "shards": listed}
