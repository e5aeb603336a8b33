"""Tokenizer training at the seed's setting (vocab 49,152): time and peak memory on N MB samples.

    python benchmarks/bench_tokenizer_scale.py --mb 200 1000 [--work /tmp/toks]

The sample is local text only (no download): the .py, .c, .h, .txt, .md, .rst, .html and .js files
under this Python's prefix, /usr/lib and /usr/share/doc, one document per distinct file (exact
duplicates dropped), sorted by path, as JSON lines, cut at N MB of text. Each size is trained by
`genesis tokenizer train FILE --vocab-size 49152` in a child process; peak memory is the child's
maximum resident set size (getrusage). Prints one line per size; the numbers go to docs/data.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

SUFFIXES = {".py", ".c", ".h", ".txt", ".md", ".rst", ".html", ".js"}


def build_corpus(path: Path, mb: int) -> tuple[int, int]:
    roots = [Path(sys.base_prefix), Path(sys.prefix), Path("/usr/lib"), Path("/usr/share/doc")]
    seen, n_docs, n_bytes = set(), 0, 0
    with open(path, "w", encoding="utf-8") as fh:
        for root in roots:
            for dirpath, dirnames, filenames in os.walk(root):
                dirnames.sort()
                for name in sorted(filenames):
                    f = Path(dirpath) / name
                    if f.suffix not in SUFFIXES or f.is_symlink():
                        continue
                    try:
                        text = f.read_text(encoding="utf-8")
                    except (UnicodeDecodeError, OSError):
                        continue
                    key = hashlib.blake2b(text.encode(), digest_size=8).digest()
                    if not text.strip() or key in seen:
                        continue
                    seen.add(key)
                    fh.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
                    n_docs, n_bytes = n_docs + 1, n_bytes + len(text.encode())
                    if n_bytes >= mb * 1_000_000:
                        return n_docs, n_bytes
    return n_docs, n_bytes


def train(corpus: Path, out: Path, vocab: int) -> tuple[float, float]:
    """Seconds and peak RSS (GB) of `genesis tokenizer train` in a child process."""
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import sys; from genesis_cli import main; sys.exit(main())", "tokenizer",
                    "train", str(corpus), "--vocab-size", str(vocab), "--output", str(out), "--no-progress"],
                   check=True)  # fmt: skip
    seconds = time.perf_counter() - t0
    return seconds, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1e6  # KiB -> GB (approx.)


def main(sizes: list[int], work: Path, vocab: int) -> None:
    work.mkdir(parents=True, exist_ok=True)
    for mb in sizes:
        corpus = work / f"sample-{mb}mb.jsonl"
        n_docs, n_bytes = build_corpus(corpus, mb)
        seconds, peak = train(corpus, work / f"tok-{mb}mb", vocab)
        print(f"{mb} MB requested: {n_docs:,} documents, {n_bytes / 1e6:.1f} MB; vocab {vocab}: "
              f"{seconds:.0f} s, peak RSS {peak:.2f} GB (largest child so far)", flush=True)  # fmt: skip


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mb", type=int, nargs="+", default=[200, 1000])
    p.add_argument("--work", type=Path, default=Path("/tmp/genesis-tokenizer-scale"))
    p.add_argument("--vocab-size", type=int, default=49152)
    a = p.parse_args()
    main(a.mb, a.work, a.vocab_size)
