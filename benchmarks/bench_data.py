"""Data pipeline benchmarks: tokenizer training and encoding vs. sentencepiece, loader throughput.

    python benchmarks/bench_data.py [--vocab-sizes 4096 8192] [--repeats 3] [--no-write]

On the embedded corpus (the stdlib prose + code of embedded.yaml), in one process:
1. train our byte-level BPE (`tokenizers`) and a sentencepiece BPE (byte_fallback=True) of
   the same vocabulary size on the same text, alternating, median of `--repeats`;
2. encode the corpus with both (batch APIs, all cores), interleaved; report MB/s, bytes per token
   per source and whether decode(encode(x)) == x for every document;
3. serve PackedLoader batches (seq_len 2048, micro-batch 4) and report tokens/s against 100x the
   seed's 19,000 tokens/s training rate.
Writes its section of docs/benchmarks.md (between <!-- data:start --> and <!-- data:end -->).

    python benchmarks/bench_data.py --prepare-only [--prepare-mb 120] [--repeats 2]

4. `genesis data prepare` end to end at 1 and 2 worker processes against raw `tokenizers`
   `encode_batch` over the same documents on the same cores (interleaved), on a corpus of at least
   100 MB: the `.py` files of this Python's site-packages, one document per file, as JSON lines,
   with a 16,384-entry tokenizer trained on its first 16 MB. Writes <!-- data_prepare:start -->.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

SEED_TOKENS_PER_S = 19_000


def _corpus(work: Path) -> dict[str, list[str]]:
    from training.data.mixture import iter_mixture_texts
    from training.data.prepare import EMBEDDED_MIXTURE

    docs: dict[str, list[str]] = {}
    for name, text in iter_mixture_texts(EMBEDDED_MIXTURE, work_dir=work):
        docs.setdefault(name, []).append(text)
    return docs


def _train_ours(texts: list[str], vocab: int, out: Path):
    from genesis_hf.tokenizer import train_tokenizer

    t0 = time.perf_counter()
    tok = train_tokenizer(iter(texts), vocab, out, show_progress=False, report=False)
    return time.perf_counter() - t0, tok


def _train_spm(text_file: Path, vocab: int, prefix: Path):
    import sentencepiece as spm

    t0 = time.perf_counter()
    spm.SentencePieceTrainer.train(
        input=str(text_file), model_prefix=str(prefix), model_type="bpe", vocab_size=vocab, byte_fallback=True,
        character_coverage=0.9995, split_digits=True, remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True, normalization_rule_name="identity", max_sentence_length=1 << 16,
        num_threads=os.cpu_count() or 1, minloglevel=2,
    )  # fmt: skip
    return time.perf_counter() - t0, spm.SentencePieceProcessor(model_file=f"{prefix}.model")


def _encode_times(backend, sp, texts: list[str], repeats: int) -> dict[str, tuple[float, float]]:
    """Median seconds to encode `texts` (batch API on all cores, and one document at a time on
    one thread) for (ours, sentencepiece); the two libraries alternate run by run."""
    runs = {
        "batch": (lambda: backend.encode_batch(texts, add_special_tokens=False),
                  lambda: sp.encode(texts, num_threads=os.cpu_count() or 1)),
        "single": (lambda: [backend.encode(t, add_special_tokens=False) for t in texts],
                   lambda: [sp.encode(t) for t in texts]),
    }  # fmt: skip
    out = {}
    for mode, (ours_fn, spm_fn) in runs.items():
        ours, theirs = [], []
        for _ in range(repeats):
            for fn, times in ((ours_fn, ours), (spm_fn, theirs)):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
        out[mode] = (statistics.median(ours), statistics.median(theirs))
    return out


def bench_tokenizers(docs: dict[str, list[str]], vocab_sizes: list[int], repeats: int, work: Path) -> list[str]:
    texts = [t for ts in docs.values() for t in ts]
    n_bytes = sum(len(t.encode()) for t in texts)
    text_file = work / "corpus.txt"  # sentencepiece reads lines: one line of the corpus per sentence
    text_file.write_text("".join(t if t.endswith("\n") else t + "\n" for t in texts), encoding="utf-8")
    lines = [
        f"Corpus: embedded.yaml, {len(texts)} documents, {n_bytes / 1e6:.2f} MB "
        f"({', '.join(f'{k}: {len(v)} docs' for k, v in docs.items())}). Median of {repeats}, interleaved.",
        "",
        "| vocab | tokenizer | train s | encode MB/s (batch, all cores) | encode MB/s (1 thread) | " + " | ".join(f"bytes/token {d}" for d in docs) + " | exact round trip |",
        "| --- | --- | --- | --- | --- " + "| --- " * len(docs) + "| --- |",
    ]
    ratios = []
    for vocab in vocab_sizes:
        ours_t, spm_t = [], []
        for i in range(repeats):  # alternate the two trainers
            t, tok = _train_ours(texts, vocab, work / f"ours-{vocab}")
            ours_t.append(t)
            t, sp = _train_spm(text_file, vocab, work / f"spm-{vocab}-{i}")
            spm_t.append(t)
        backend = tok.backend_tokenizer
        enc = _encode_times(backend, sp, texts, repeats)
        rows = {"ours (tokenizers BPE)": (ours_t, 0), "sentencepiece BPE": (spm_t, 1)}
        compress = []
        for name, (train_times, k) in rows.items():
            bpt = []
            for ts in docs.values():
                if name.startswith("ours"):
                    n_tok = sum(len(e.ids) for e in backend.encode_batch(ts, add_special_tokens=False))
                    exact = sum(tok.decode(e.ids) == t for e, t in zip(backend.encode_batch(ts, add_special_tokens=False), ts))
                else:
                    ids = sp.encode(ts)
                    n_tok = sum(len(x) for x in ids)
                    exact = sum(sp.decode(x) == t for x, t in zip(ids, ts))
                bpt.append((sum(len(t.encode()) for t in ts) / n_tok, exact, len(ts)))
            total_exact = sum(e for _, e, _ in bpt)
            compress.append(n_bytes / sum(b_len / b for (b, _, _), b_len in
                                          zip(bpt, [sum(len(t.encode()) for t in ts) for ts in docs.values()])))
            lines.append(
                f"| {vocab} | {name} | {statistics.median(train_times):.2f} | {n_bytes / 1e6 / enc['batch'][k]:.1f} | "
                f"{n_bytes / 1e6 / enc['single'][k]:.1f} | "
                + " | ".join(f"{b:.3f}" for b, _, _ in bpt) + f" | {total_exact}/{len(texts)} docs |"
            )
        ratios.append(
            f"- vocab {vocab}: sentencepiece / ours time ratio: training "
            f"{statistics.median(spm_t) / statistics.median(ours_t):.2f}, batch encoding "
            f"{enc['batch'][1] / enc['batch'][0]:.2f}, single-thread encoding {enc['single'][1] / enc['single'][0]:.2f} "
            f"(< 1: sentencepiece faster); ours has {100 * (compress[0] / compress[1] - 1):+.1f}% bytes per token "
            f"(fewer tokens for the same text)."
        )
    return lines + ["", *ratios]


def bench_loader(work: Path, repeats: int) -> list[str]:
    from training.data.loader import PackedLoader
    from training.data.prepare import ensure_embedded_data

    t0 = time.perf_counter()
    _, data_dir = ensure_embedded_data(work / "embedded")
    build = time.perf_counter() - t0
    lines = [f"`ensure_embedded_data` (train a 4,096 tokenizer + prepare, cold): {build:.1f} s.", "",
             "| seq_len | micro-batch | world size | batches timed | tokens/s served (median) | x seed's 19,000 tok/s |",
             "| --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for seq_len, mbs, world in ((2048, 4, 1), (2048, 4, 2), (512, 16, 1)):
        loader = PackedLoader(data_dir, seq_len=seq_len, micro_batch_size=mbs, world_size=world)
        n = 2000
        rates = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            for _ in range(n):
                loader.next_batch()
            rates.append(n * mbs * seq_len / (time.perf_counter() - t0))  # input tokens the trainer sees
        rate = statistics.median(rates)
        lines.append(f"| {seq_len} | {mbs} | {world} | {n} x {repeats} | {rate:,.0f} | {rate / SEED_TOKENS_PER_S:,.0f}x |")
    return lines


def _py_corpus(path: Path, mb: int) -> tuple[int, int]:
    """site-packages' .py files (sorted paths) as JSON lines, up to `mb` MB of text."""
    import json
    import site

    root = Path(site.getsitepackages()[0])
    n_docs = n_bytes = 0
    with open(path, "w", encoding="utf-8") as fh:
        for f in sorted(root.rglob("*.py")):
            try:
                text = f.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue
            if text.strip():
                fh.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
                n_docs, n_bytes = n_docs + 1, n_bytes + len(text.encode())
                if n_bytes >= mb * 1_000_000:
                    break
    return n_docs, n_bytes


def bench_prepare(work: Path, mb: int, repeats: int, procs: list[int]) -> list[str]:
    import json

    from genesis_hf.tokenizer import train_tokenizer
    from training.data.prepare import prepare

    corpus = work / "py.jsonl"
    n_docs, n_bytes = _py_corpus(corpus, mb)
    sample = work / "sample.jsonl"
    with open(corpus, encoding="utf-8") as src, open(sample, "w", encoding="utf-8") as dst:
        size = 0
        for line in src:
            dst.write(line)
            size += len(line)
            if size > 16_000_000:
                break
    tok_dir = work / "tok16k"
    train_tokenizer([sample], 16384, tok_dir, show_progress=False)
    mix = work / "py.yaml"
    mix.write_text(f"name: py\nvalidation_fraction: 0.001\nsources:\n  - {{name: py, data_files: {corpus}, weight: 1}}\n")
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    tok.encode_special_tokens = True
    texts = [json.loads(line)["text"] for line in open(corpus, encoding="utf-8")]

    def raw(fn):
        n = 0
        for i in range(0, len(texts), 1024):
            n += sum(len(e.ids) for e in fn(texts[i : i + 1024], add_special_tokens=False))
        return n

    times: dict[str, list[float]] = {"raw": [], "raw_fast": [], **{f"p{p}": [] for p in procs}}
    tokens, first = 0, None
    for r in range(repeats):
        for key, fn in (("raw", tok.encode_batch), ("raw_fast", tok.encode_batch_fast)):
            t0 = time.perf_counter()
            tokens = raw(fn)
            times[key].append(time.perf_counter() - t0)
        for p in procs:
            out = work / f"out-{p}-{r}"
            t0 = time.perf_counter()
            m = prepare(mix, tok_dir, out, num_proc=p, show_progress=False, work_dir=work / "cache")
            times[f"p{p}"].append(time.perf_counter() - t0)
            sha = [s["sha256"] for s in m["sources"]["py"]["shards"]]
            assert first in (None, sha), "shards differ across --num-proc"
            first = sha
    med = {k: statistics.median(v) for k, v in times.items()}
    lines = [f"Corpus: {n_docs:,} `.py` files of site-packages as JSON lines, {n_bytes / 1e6:.1f} MB of text, "
             f"{tokens:,} tokens (16,384-entry byte-level BPE trained on its first 16 MB). "
             f"{repeats} rounds, interleaved (raw, then each --num-proc); median seconds.", "",
             "| run | seconds | MB/s | x raw encode_batch |", "| --- | --- | --- | --- |",
             f"| raw `encode_batch` (all cores, batches of 1,024) | {med['raw']:.1f} | "
             f"{n_bytes / 1e6 / med['raw']:.2f} | 1.00 |",
             f"| raw `encode_batch_fast` (the same, no offsets: what prepare calls) | {med['raw_fast']:.1f} | "
             f"{n_bytes / 1e6 / med['raw_fast']:.2f} | {med['raw'] / med['raw_fast']:.2f}x |"]  # fmt: skip
    for p in procs:
        t = med[f"p{p}"]
        lines.append(f"| `genesis data prepare --num-proc {p}` (read, render, filter, encode, write shards) | "
                     f"{t:.1f} | {n_bytes / 1e6 / t:.2f} | **{med['raw'] / t:.2f}x** |")  # fmt: skip
    lines += ["", "Against `encode_batch_fast`: --num-proc " + ", ".join(
        f"{p}: {med['raw_fast'] / med[f'p{p}']:.2f}x" for p in procs) + ".",
              "Shards are byte-identical across the --num-proc values (checked each round).",
              "Each round's raw times: " + ", ".join(f"{x:.1f}" for x in times["raw"]) + " s; fast: "
              + ", ".join(f"{x:.1f}" for x in times["raw_fast"]) + " s; "
              + "; ".join(f"--num-proc {p}: " + ", ".join(f"{x:.1f}" for x in times[f"p{p}"]) for p in procs) + " s."]  # fmt: skip
    return lines


def main_prepare(mb: int, repeats: int, write: bool) -> str:
    from _report import machine, write_section

    with tempfile.TemporaryDirectory() as tmp:
        load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
        body = ["### Data preparation at scale (`genesis data prepare`)", "",
                f"Machine: {machine()}; load average at start {load} (a shared machine: compare ratios, "
                "not absolute times).", ""]  # fmt: skip
        body += bench_prepare(Path(tmp), mb, repeats, [1, 2])
    body += ["", "Reproduce: `python benchmarks/bench_data.py --prepare-only`."]
    text = "\n".join(body)
    print(text)
    if write:
        print(f"\nwrote {write_section('data_prepare', text)}")
    return text


def main(vocab_sizes: list[int], repeats: int, write: bool) -> str:
    from _report import machine, write_section

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        docs = _corpus(work / "cache")
        load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
        body = ["## Data: tokenizer and loader", "",
                f"Machine: {machine()}; load average at start {load} (a shared machine: compare ratios, "
                "not absolute times).", "", "### Tokenizer training and encoding", ""]  # fmt: skip
        body += bench_tokenizers(docs, vocab_sizes, repeats, work)
        body += ["", "### PackedLoader throughput", ""] + bench_loader(work, repeats)
    body += ["", "Reproduce: `python benchmarks/bench_data.py`. Bytes/token: higher is better compression; "
             "'exact round trip' counts documents with decode(encode(x)) == x."]  # fmt: skip
    text = "\n".join(body)
    print(text)
    if write:
        print(f"\nwrote {write_section('data', text)}")
    return text


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab-sizes", type=int, nargs="+", default=[4096, 8192])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    p.add_argument("--prepare-only", action="store_true", help="only the data prepare vs raw encode benchmark")
    p.add_argument("--prepare-mb", type=int, default=120, help="corpus size for the prepare benchmark (MB)")
    return p


if __name__ == "__main__":
    args = _parser().parse_args()
    if args.prepare_only:
        main_prepare(args.prepare_mb, args.repeats, not args.no_write)
    else:
        main(args.vocab_sizes, args.repeats, not args.no_write)
