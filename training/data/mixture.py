"""Mixture recipes (YAML): which sources, how to read them, and how much of each.

```yaml
name: genesis-60b
total_tokens: 60000000000      # optional: each source gets weight * total_tokens unless max_tokens
shard_tokens: 100000000        # train tokens per shard file
validation_fraction: 0.001     # documents held out per source (chosen by content hash)
validation_max_tokens: 2000000 # cap on held-out tokens per source
sources:
  - name: fineweb-edu
    hub_id: HuggingFaceFW/fineweb-edu   # or data_files: [...] (local), or embedded: code|prose
    subset: sample-100BT                # the `name` argument of load_dataset
    split: train
    schema: text                        # see training.data.renderers
    fields: {text: text}
    weight: 0.30
```

Every source, Hub or local, is read by `datasets.load_dataset(..., streaming=True)`: local
``.jsonl/.json``, ``.parquet`` and ``.txt`` files go through the "json", "parquet" and "text"
builders. Weights must be >= 0; if they do not sum to 1 they are normalised and the fact logged.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from training.data.renderers import SCHEMAS, get_renderer

logger = logging.getLogger(__name__)

_TOP_KEYS = {"name", "description", "total_tokens", "shard_tokens", "validation_fraction",
             "validation_max_tokens", "sources"}  # fmt: skip
_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text"}


@dataclass
class SourceSpec:
    name: str
    weight: float
    schema: str = "text"
    fields: dict = field(default_factory=dict)
    hub_id: str | None = None
    subset: str | None = None
    split: str = "train"
    data_dir: str | None = None
    revision: str | None = None
    data_files: list[str] | None = None
    format: str | None = None
    embedded: str | None = None
    max_bytes: int | None = None  # embedded only: cap on the materialised text
    max_tokens: int | None = None
    sample_by: str = "document"  # .txt only: "document", "paragraph" or "line"

    def identity(self) -> str:
        """Digest of everything that decides this source's documents (not its weight or budget)."""
        keep = {k: v for k, v in asdict(self).items() if k not in ("weight", "max_tokens")}
        if self.data_files and not self.hub_id:  # local files: a rewritten file is another source
            keep["stat"] = [(os.stat(f).st_size, os.stat(f).st_mtime_ns) for f in self.data_files]
        return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class Mixture:
    name: str
    sources: list[SourceSpec]
    path: Path
    total_tokens: int | None = None
    shard_tokens: int = 100_000_000
    validation_fraction: float = 0.001
    validation_max_tokens: int = 2_000_000
    description: str = ""

    @property
    def weights(self) -> dict[str, float]:
        return {s.name: s.weight for s in self.sources}


def _err(path, where: str, msg: str) -> ValueError:
    return ValueError(f"{path}: {where}: {msg}")


def _check_type(path, where, value, types, what):
    if not isinstance(value, types) or isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise _err(path, where, f"expected {what}, got {value!r}")
    return value


def load_mixture(path: str | Path) -> Mixture:
    """Parse and validate a recipe; every error names the file and the field."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"mixture recipe not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: malformed YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping at the top level")
    unknown = set(raw) - _TOP_KEYS
    if unknown:
        raise _err(path, ", ".join(sorted(unknown)), f"unknown key(s); allowed: {sorted(_TOP_KEYS)}")
    items = raw.get("sources")
    if not isinstance(items, list) or not items:
        raise _err(path, "sources", "must be a non-empty list")
    allowed = set(SourceSpec.__dataclass_fields__)
    sources, seen = [], set()
    for i, item in enumerate(items):
        where = f"sources[{i}]"
        if not isinstance(item, dict):
            raise _err(path, where, "must be a mapping")
        if bad := set(item) - allowed:
            raise _err(path, f"{where}.{sorted(bad)[0]}", f"unknown key; allowed: {sorted(allowed)}")
        for key in ("name", "weight"):
            if key not in item:
                raise _err(path, f"{where}.{key}", "missing")
        name = _check_type(path, f"{where}.name", item["name"], str, "a string")
        where = f"sources[{i}] ({name})"
        if name in seen or "/" in name or not name:
            raise _err(path, f"{where}.name", "must be unique, non-empty, without '/'")
        seen.add(name)
        weight = _check_type(path, f"{where}.weight", item["weight"], (int, float), "a number")
        if weight < 0:
            raise _err(path, f"{where}.weight", f"must be >= 0, got {weight}")
        # data_files with hub_id name files inside the Hub repository; alone, local files.
        origins = [k for k in ("hub_id", "data_files", "embedded") if item.get(k) is not None]
        if origins == ["hub_id", "data_files"]:
            origins = ["hub_id"]
        if len(origins) != 1:
            raise _err(path, where, f"needs exactly one of hub_id, data_files, embedded (got {origins or 'none'})")
        spec = SourceSpec(**item)
        spec.weight = float(weight)
        if spec.schema not in SCHEMAS:
            raise _err(path, f"{where}.schema", f"unknown schema {spec.schema!r}; known: {sorted(SCHEMAS)}")
        _check_type(path, f"{where}.fields", spec.fields, dict, "a mapping of schema key -> column")
        if spec.data_files is not None and spec.hub_id is None:
            files = [spec.data_files] if isinstance(spec.data_files, str) else spec.data_files
            resolved = []
            for f in files:
                p = Path(f) if Path(f).is_absolute() else path.parent / f
                if not p.is_file():
                    raise _err(path, f"{where}.data_files", f"file not found: {p}")
                resolved.append(str(p.resolve()))
            spec.data_files = resolved
            fmt = spec.format or _FORMATS.get(Path(resolved[0]).suffix.lower())
            if fmt not in ("json", "parquet", "text"):
                raise _err(path, f"{where}.format", f"cannot tell the format of {resolved[0]}; set json/parquet/text")
            spec.format = fmt
        if spec.embedded is not None and spec.embedded not in ("code", "prose"):
            raise _err(path, f"{where}.embedded", f"must be 'code' or 'prose', got {spec.embedded!r}")
        for key in ("max_tokens", "max_bytes"):
            value = getattr(spec, key)
            if value is not None and (not isinstance(value, int) or value <= 0):
                raise _err(path, f"{where}.{key}", f"must be a positive integer, got {value!r}")
        sources.append(spec)
    total = sum(s.weight for s in sources)
    if total <= 0:
        raise _err(path, "sources[].weight", "weights sum to 0")
    if abs(total - 1.0) > 1e-9:
        logger.warning("%s: weights sum to %.6g, normalising them to 1", path, total)
        for s in sources:
            s.weight /= total
    mix = Mixture(name=str(raw.get("name", path.stem)), sources=sources, path=path.resolve(),
                  description=str(raw.get("description", "")))  # fmt: skip
    for key in ("total_tokens", "shard_tokens", "validation_max_tokens"):
        if key in raw:
            setattr(mix, key, _check_type(path, key, raw[key], int, "an integer"))
    if "validation_fraction" in raw:
        frac = _check_type(path, "validation_fraction", raw["validation_fraction"], (int, float), "a number")
        if not 0 <= frac < 1:
            raise _err(path, "validation_fraction", f"must be in [0, 1), got {frac}")
        mix.validation_fraction = float(frac)
    if mix.shard_tokens <= 0:
        raise _err(path, "shard_tokens", "must be positive")
    if mix.total_tokens:
        for s in sources:
            s.max_tokens = s.max_tokens or max(1, int(s.weight * mix.total_tokens))
    return mix


# `datasets.load_dataset` resolves data files with tqdm's `thread_map`, whose `ensure_lock`
# (tqdm/contrib/concurrent.py) reads the class's `_lock`, creates one when there is none, and
# DELETES it on exit in that case. Two threads that both find no lock both delete it, and the
# second dies: "type object 'tqdm' has no attribute '_lock'". A lock on tqdm's base class exists
# for every subclass (datasets' own bar included), so `ensure_lock` restores it instead of
# deleting; and opens are serialized as well, which costs nothing next to reading the data.
_OPEN_LOCK = threading.Lock()


def load_dataset_safely(*args, **kwargs):
    """`datasets.load_dataset`, safe to call from any number of threads at once."""
    import datasets  # heavy; only where records are read
    from tqdm import tqdm

    tqdm.get_lock()  # creates tqdm._lock once; never deleted afterwards
    with _OPEN_LOCK:
        return datasets.load_dataset(*args, **kwargs)


def open_records(spec: SourceSpec, work_dir: str | Path):
    """A streaming `datasets.IterableDataset` of raw records for one source (Hub or local)."""
    # Bytes that are not UTF-8 become U+FFFD ("replace"); prepare drops and counts such documents.
    # The json builder only honours errors= for a non-"utf-8" encoding name, hence the "utf_8" alias.
    if spec.embedded is not None:
        from training.data import corpus

        files = [str(corpus.materialize(Path(work_dir) / "embedded", spec.embedded, max_bytes=spec.max_bytes))]
        return load_dataset_safely("json", data_files=files, split="train", streaming=True,
                                   encoding="utf_8", encoding_errors="replace")  # fmt: skip
    if spec.data_files is not None and spec.hub_id is None:
        kwargs = {}
        if spec.format == "text":
            kwargs = {"sample_by": spec.sample_by, "encoding_errors": "replace", "keep_linebreaks": True}
        elif spec.format == "json":
            kwargs = {"encoding": "utf_8", "encoding_errors": "replace"}
        return load_dataset_safely(spec.format, data_files=spec.data_files, split="train", streaming=True, **kwargs)
    return load_dataset_safely(spec.hub_id, spec.subset, split=spec.split, data_dir=spec.data_dir,
                               data_files=spec.data_files, revision=spec.revision, streaming=True)  # fmt: skip


def default_cache_dir() -> Path:
    """Where embedded sources are materialised when no work dir is given: $GENESIS_CACHE or ~/.cache/genesis."""
    return Path(os.environ.get("GENESIS_CACHE") or Path.home() / ".cache" / "genesis")


def describe(spec: SourceSpec) -> str:
    if spec.embedded:
        return f"embedded:{spec.embedded}"
    if spec.data_files and not spec.hub_id:
        return ",".join(spec.data_files)
    return f"{spec.hub_id}" + (f"/{spec.subset}" if spec.subset else "") + f"[{spec.split}]"


def iter_mixture_texts(path: str | Path, *, max_bytes: int | None = None, work_dir: str | Path | None = None,
                       ) -> Iterator[tuple[str, str]]:  # fmt: skip
    """(source name, rendered document) for tokenizer training; `max_bytes` is split by weight."""
    mix = load_mixture(path)
    work = Path(work_dir) if work_dir else default_cache_dir()
    for spec in mix.sources:
        budget = None if max_bytes is None else int(max_bytes * spec.weight)
        render, used = get_renderer(spec.schema), 0
        for record in open_records(spec, work):
            text = render(record, spec.fields)
            if not text or text.isspace():
                continue
            yield spec.name, text
            used += len(text)
            if budget is not None and used >= budget:
                break
