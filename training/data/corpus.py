"""The embedded default corpus: text every Python installation ships, so the quickstart and the
tests need no download.

Two sources, like the seed's prose + code mix:
- ``python-code``: the standard library's own ``.py`` sources (tests, site-packages and caches excluded);
- ``python-docs``: English prose: the Python language reference topics that ``pydoc`` ships
  (``pydoc_data.topics``), every stdlib module's docstrings (read with ``ast``, never imported)
  and the license text.

Order is deterministic: files are ranked by the sha1 of their path relative to the stdlib root,
which spreads a byte budget over the whole library instead of the first letters of the alphabet.
The exact text depends on the Python version, which is recorded (``corpus_info``).
"""

from __future__ import annotations

import ast
import hashlib
import json
import logging
import os
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path

logger = logging.getLogger(__name__)

KINDS = ("code", "prose")
# encodings/ is ~100 generated codec tables ("0x00e9: LATIN SMALL LETTER E WITH ACUTE"): they
# crowd out real code and teach a small model to babble hex.
_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "pydoc_data",
              "encodings"}
CORPUS_VERSION = 2  # bump when the selection changes, so cached materialisations are rebuilt


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _stdlib_files() -> list[Path]:
    root = stdlib_dir()
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("."))
        files += [Path(dirpath) / f for f in filenames if f.endswith(".py")]
    if not files:
        raise FileNotFoundError(f"no Python sources under {root}: cannot build the embedded corpus")
    rel = {f: f.relative_to(root).as_posix() for f in files}
    return sorted(files, key=lambda f: hashlib.sha1(rel[f].encode()).hexdigest())


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None  # a few legacy stdlib files are Latin-1; skipping keeps the corpus UTF-8 clean


def _docstrings(source: str) -> str | None:
    """All docstrings of a module, in source order, as one prose document."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return None
    parts = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)
            if doc and len(doc) > 40:
                title = getattr(node, "name", None)
                parts.append(f"{title}\n\n{doc}" if title else doc)
    return "\n\n".join(parts) if parts else None


def iter_documents(kind: str) -> Iterator[dict]:
    """Records ``{"text", "path"}`` of one embedded source, deterministic order."""
    if kind not in KINDS:
        raise ValueError(f"embedded corpus kind must be one of {KINDS}, got {kind!r}")
    root = stdlib_dir()
    if kind == "code":
        for f in _stdlib_files():
            text = _read(f)
            if text and text.strip():
                yield {"text": text, "path": f.relative_to(root).as_posix()}
        return
    try:
        from pydoc_data.topics import topics  # plain dict of reference text; no side effects

        for name in sorted(topics):
            yield {"text": topics[name].strip() + "\n", "path": f"pydoc_data/topics/{name}"}
    except ImportError:
        logger.warning("pydoc_data is not installed: the prose source has docstrings only")
    license_file = root / "LICENSE.txt"
    if license_file.is_file() and (text := _read(license_file)):
        yield {"text": text, "path": "LICENSE.txt"}
    for f in _stdlib_files():
        if (source := _read(f)) and (doc := _docstrings(source)):
            yield {"text": doc + "\n", "path": f.relative_to(root).as_posix() + ":docstrings"}


def materialize(out_dir: str | Path, kind: str, *, max_bytes: int | None = None) -> Path:
    """Write one embedded source to ``out_dir/<kind>[-<cap>].jsonl`` (temp file + rename), capped at
    ``max_bytes`` UTF-8 bytes of text. An existing file built by the same Python is reused."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = kind if max_bytes is None else f"{kind}-{max_bytes}"
    path, info_path = out / f"{stem}.jsonl", out / f"{stem}.info.json"
    info = {"kind": kind, "max_bytes": max_bytes, **corpus_info()}
    if path.is_file() and info_path.is_file() and json.loads(info_path.read_text()) == info:
        return path
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    size = 0
    with open(tmp, "w", encoding="utf-8") as fh:
        for rec in iter_documents(kind):
            n = len(rec["text"].encode("utf-8"))
            if max_bytes is not None and size + n > max_bytes:
                if size + 256 > max_bytes:
                    break
                continue  # keep filling with smaller documents up to the cap
            fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
            size += n
    os.replace(tmp, path)
    info_path.write_text(json.dumps(info) + "\n")
    return path


def corpus_info() -> dict:
    return {"python": sys.version.split()[0], "stdlib": str(stdlib_dir()), "corpus_version": CORPUS_VERSION}
