"""The Genesis tokenizer: byte-level BPE (GPT-2 style) trained with the `tokenizers` library.

    genesis tokenizer train SOURCES... --vocab-size 49152 --output DIR

SOURCES are .txt, .jsonl or .parquet files (the ``text`` field, or ``--field``) or a
mixture recipe (.yaml), whose sources are rendered exactly as `genesis data prepare`
renders them. The output folder is a standard fast tokenizer: ``AutoTokenizer.from_pretrained(DIR)``
loads it with no project code.

Design (why each choice):
- No normalizer; a regex split on raw characters (``PRETOKENIZE_PATTERN``), then each piece's
  UTF-8 bytes are spelled with GPT-2's byte-to-unicode alphabet and merged by BPE. Nothing is
  rewritten, so ``decode(encode(x)) == x`` for every string, and there is no unknown token.
- The split regex is llama.cpp's "qwen2" pre-tokenizer character for character (Llama-3's, digits
  one by one), and the vocabulary is in GPT-2's byte alphabet: llama.cpp's BPE ("gpt2") tokenizer
  reproduces our token ids exactly from a GGUF written by `genesis export --format gguf`.
- Ids are stable across vocabulary sizes: special tokens 0..7, the 256 single bytes 8..263 in
  byte order (id = 8 + byte value), then the merges in the order they were learned. The
  vocabulary has exactly ``vocab_size`` entries.
- ``eos_token`` is ``<|endoftext|>`` (the document boundary used in pretraining). Chat
  generation stops on ``<|im_end|>``: pass ``CHAT_STOP_TOKENS`` to ``generate``. No BOS.

Chat format (ChatML), also written as ``chat_template.jinja``::

    <|im_start|>system\\n{system}[\\n\\n# Tools ...<tools>json per line</tools>]<|im_end|>\\n
    <|im_start|>user\\n{content}<|im_end|>\\n
    <|im_start|>assistant\\n{content}<tool_call>\\n{"name": ..., "arguments": ...}\\n</tool_call><|im_end|>\\n
    <|im_start|>tool\\n<tool_response>\\n{content}\\n</tool_response><|im_end|>\\n

Each assistant turn's content and its ``<|im_end|>`` sit in ``{% generation %}`` so
``return_assistant_tokens_mask=True`` (TRL ``assistant_only_loss=True``) marks them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

logger = logging.getLogger(__name__)

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
SPECIAL_TOKENS: list[str] = [
    EOS_TOKEN,  # 0: document boundary; the eos_token
    PAD_TOKEN,  # 1: padding (never a training target)
    "<|im_start|>",
    "<|im_end|>",
    "<tool_call>",
    "</tool_call>",
    "<tool_response>",
    "</tool_response>",
]
# Chat generation ends at the end of the assistant turn; <|endoftext|> as a safety net.
CHAT_STOP_TOKENS: list[str] = ["<|im_end|>", EOS_TOKEN]
DEFAULT_VOCAB_SIZE = 49152
# Written into genesis_tokenizer.json; a folder with another (or no) format is an older tokenizer.
TOKENIZER_FORMAT = "byte-level-bpe"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map: printable Latin-1 bytes stand for themselves,
    the other 68 bytes take the characters from U+0100 up. llama.cpp's BPE vocabularies use it."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


BYTE_TOKENS: list[str] = list(bytes_to_unicode().values())  # ids 8..263: the token for byte b is 8 + b
UNICODE_TO_BYTE: dict[str, int] = {c: b for b, c in bytes_to_unicode().items()}


def token_bytes(token: str) -> bytes | None:
    """The raw bytes a (non-special) byte-level token stands for; None if it is not one."""
    try:
        return bytes(UNICODE_TO_BYTE[c] for c in token)
    except KeyError:
        return None


# GPT-4-style split, but digits one by one (better arithmetic) and on raw characters; equal to
# llama.cpp's "qwen2" pre-tokenizer regex ((?i:'s) is its '[sS]). Letters may carry one leading
# non-letter (" the", "_name"); whitespace runs before a newline stay together ("\r\n",
# indentation) so code formatting compresses well.
PRETOKENIZE_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# ChatML with tools; every statement opens with "{%-" or "{{-", so the file's line breaks vanish.
CHAT_TEMPLATE = (Path(__file__).resolve().parent / "chat_template.jinja").read_text(encoding="utf-8").rstrip("\n")

REPORT_FILE = "genesis_tokenizer.json"
_SAMPLE_BYTES_PER_SOURCE = 1 << 20  # bytes kept per source for the bytes-per-token report


# ----------------------------------------------------------------------------- sources


def _read_file(path: Path, field: str) -> Iterator[str]:
    """Documents of one local file; one clear error naming the file on bad input."""
    suffix = path.suffix.lower()
    if suffix == ".txt":
        # Blank-line separated paragraphs keep memory flat on large files.
        with open(path, encoding="utf-8", errors="strict", newline="") as fh:
            buf: list[str] = []
            try:
                for line in fh:
                    buf.append(line)
                    if len(buf) >= 256 and not line.strip():
                        yield "".join(buf)
                        buf = []
            except UnicodeDecodeError as exc:
                raise ValueError(f"{path}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
            if buf:
                yield "".join(buf)
    elif suffix in (".jsonl", ".json"):
        with open(path, encoding="utf-8", errors="strict") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{lineno}: invalid JSON ({exc.msg})") from None
                if field not in record:
                    raise ValueError(f"{path}:{lineno}: missing field {field!r} (has {sorted(record)})")
                if isinstance(record[field], str):
                    yield record[field]
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(path)
        if field not in pf.schema_arrow.names:
            raise ValueError(f"{path}: missing field {field!r} (has {pf.schema_arrow.names})")
        for batch in pf.iter_batches(columns=[field], batch_size=1024):
            yield from (t for t in batch.column(0).to_pylist() if isinstance(t, str))
    else:
        raise ValueError(
            f"{path}: unsupported source type {suffix!r} (use .txt, .jsonl, .parquet or a mixture .yaml)"
        )


def _iter_sources(sources, field: str, sample_bytes: int | None) -> Iterator[tuple[str, str]]:
    """(source name, document) pairs from paths, a mixture recipe, or an iterator of strings."""
    if isinstance(sources, (str, Path)):
        sources = [sources]
    if not isinstance(sources, (list, tuple)):
        # an iterator of documents, or of (source name, document) pairs (a mixture read by training/)
        yield from (t if isinstance(t, tuple) else ("texts", t) for t in sources)
        return
    for src in sources:
        path = Path(src)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer source not found: {path}")
        if path.suffix.lower() in (".yaml", ".yml"):  # genesis_hf never imports training (STYLE 11)
            raise ValueError(f"{path}: a mixture recipe is read by the training package: run `genesis tokenizer "
                             f"train {path} ...`, or pass training.data.mixture.iter_mixture_texts({path.name!r})")
        yield from ((path.name, t) for t in _read_file(path, field))


# ----------------------------------------------------------------------------- training


def byte_level_pre_tokenizer():
    # Split on raw characters first, then spell each piece in GPT-2's byte alphabet (no second regex).
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])


def _assemble(trained: Tokenizer) -> Tokenizer:
    """Specials, then the 256 bytes in byte order, then the merges in learned order, as one BPE."""
    spec = json.loads(trained.to_str())["model"]
    byte_set = set(BYTE_TOKENS)
    missing = byte_set - set(spec["vocab"])
    if missing:  # the trainer was given the whole byte alphabet; this would be a tokenizers bug
        raise ValueError(f"trained vocabulary lacks {len(missing)} of the 256 byte tokens")
    learned = [tok for tok, _ in sorted(spec["vocab"].items(), key=lambda kv: kv[1]) if tok not in byte_set]
    fixed = SPECIAL_TOKENS + BYTE_TOKENS
    vocab = {tok: i for i, tok in enumerate(fixed)}
    vocab.update({tok: len(fixed) + i for i, tok in enumerate(learned)})
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in spec["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=False, fuse_unk=False, ignore_merges=False))
    tok.pre_tokenizer = byte_level_pre_tokenizer()
    tok.decoder = decoders.ByteLevel()  # byte alphabet -> bytes -> UTF-8; nothing stripped
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return tok


def wrap_tokenizer(tok: Tokenizer):
    """A transformers fast tokenizer around a Genesis `tokenizers.Tokenizer`."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        bos_token=None,
        unk_token=None,
        clean_up_tokenization_spaces=False,  # never rewrite " ." on decode: exact round trips
        model_max_length=2048,
        chat_template=CHAT_TEMPLATE,
        extra_special_tokens=SPECIAL_TOKENS[2:],
    )


def bytes_per_token(tokenizer, texts_by_source: dict[str, list[str]]) -> dict[str, float]:
    """UTF-8 bytes per token per source: higher is better compression."""
    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
    out = {}
    for name, texts in texts_by_source.items():
        n_bytes = sum(len(t.encode("utf-8")) for t in texts)
        n_tokens = sum(len(e.ids) for e in backend.encode_batch(texts, add_special_tokens=False))
        out[name] = round(n_bytes / max(n_tokens, 1), 4)
    return out


def _save_atomic(hf_tok, output_dir: Path, report: dict) -> None:
    """Write into a temp folder next to output_dir, then swap: a crash leaves the old folder intact."""
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.tmp-", dir=output_dir.parent))
    try:
        hf_tok.save_pretrained(tmp)
        report = dict(report, fingerprint=tokenizer_fingerprint(tmp))
        (tmp / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
        old = None
        if output_dir.exists():
            old = output_dir.with_name(f".{output_dir.name}.old-{os.getpid()}")
            os.replace(output_dir, old)
        os.replace(tmp, output_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def train_tokenizer(
    sources: list[str | Path] | Iterable[str],
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    output_dir: str | Path | None = None,
    *,
    min_frequency: int = 2,
    show_progress: bool = True,
    field: str = "text",
    sample_bytes: int | None = None,
    report: bool = True,
):
    """Train the Genesis byte-level BPE; returns a `PreTrainedTokenizerFast` of exactly `vocab_size`.

    `sources`: a list of file paths (.txt/.jsonl/.parquet, `field` read; or a mixture .yaml,
    at most `sample_bytes` rendered per source) or an iterator of document strings.
    Saved to `output_dir` (with a `genesis_tokenizer.json` report) when given. `report=False`
    skips the bytes-per-token measurement (benchmarks time training alone).
    """
    reserved = len(SPECIAL_TOKENS) + len(BYTE_TOKENS)
    if vocab_size <= reserved:
        raise ValueError(f"vocab_size={vocab_size} must exceed the {reserved} reserved special+byte tokens")
    samples: dict[str, list[str]] = {}
    sample_size: dict[str, int] = {}
    n_docs = n_bytes = 0

    def texts() -> Iterator[str]:
        nonlocal n_docs, n_bytes
        for name, text in _iter_sources(sources, field, sample_bytes):
            if not text or text.isspace():
                continue
            n_docs += 1
            n_bytes += len(text)
            if report and sample_size.get(name, 0) < _SAMPLE_BYTES_PER_SOURCE:
                samples.setdefault(name, []).append(text)
                sample_size[name] = sample_size.get(name, 0) + len(text)
            yield text

    t0 = time.perf_counter()
    base = Tokenizer(models.BPE())
    base.pre_tokenizer = byte_level_pre_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(SPECIAL_TOKENS),  # the 256 bytes count: they are the initial alphabet
        min_frequency=min_frequency,
        show_progress=show_progress,
        special_tokens=[],
        initial_alphabet=BYTE_TOKENS,
    )
    base.train_from_iterator(texts(), trainer=trainer)
    if n_docs == 0:
        raise ValueError(
            f"tokenizer sources yielded no text: {sources if isinstance(sources, list) else '<iterator>'}"
        )
    learned = base.get_vocab_size()  # 256 bytes + merges
    if learned != vocab_size - len(SPECIAL_TOKENS):
        raise ValueError(
            f"the corpus ({n_bytes:,} characters) supports only {learned + len(SPECIAL_TOKENS)} vocabulary entries, "
            f"not vocab_size={vocab_size}: add text, lower --vocab-size or --min-frequency"
        )
    tok = _assemble(base)
    assert tok.get_vocab_size() == vocab_size, (tok.get_vocab_size(), vocab_size)
    seconds = time.perf_counter() - t0  # training proper: read, count pairs, merge, assemble
    hf_tok = wrap_tokenizer(tok)
    report = {
        "format": TOKENIZER_FORMAT,
        "vocab_size": vocab_size,
        "special_tokens": SPECIAL_TOKENS,
        "chat_stop_tokens": CHAT_STOP_TOKENS,
        "train_seconds": round(seconds, 2),
        "train_documents": n_docs,
        "train_characters": n_bytes,
        "bytes_per_token": bytes_per_token(tok, samples) if report else {},
    }
    logger.info("trained a %d-entry tokenizer in %.1fs on %d documents", vocab_size, seconds, n_docs)
    hf_tok.genesis_report = report
    if output_dir is not None:
        _save_atomic(hf_tok, Path(output_dir), report)
    return hf_tok


# ----------------------------------------------------------------------------- fingerprint


def tokenizer_fingerprint(tokenizer_or_dir) -> str:
    """sha256 over everything that decides token ids: model (vocab, merges, options),
    added/special tokens, normalizer, pre-tokenizer, decoder, post-processor and chat template.

    Accepts a tokenizer folder, a transformers tokenizer or a `tokenizers.Tokenizer`; the three
    give the same digest for the same tokenizer. Padding/truncation settings are excluded.
    """
    if isinstance(tokenizer_or_dir, (str, Path)):
        folder = Path(tokenizer_or_dir)
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no tokenizer.json (not a tokenizer folder)")
        spec = json.loads(path.read_text(encoding="utf-8"))
        template = None
        if (folder / "chat_template.jinja").is_file():
            template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
        elif (folder / "tokenizer_config.json").is_file():
            template = json.loads((folder / "tokenizer_config.json").read_text()).get("chat_template")
    else:
        backend = getattr(tokenizer_or_dir, "backend_tokenizer", tokenizer_or_dir)
        spec = json.loads(backend.to_str())
        template = getattr(tokenizer_or_dir, "chat_template", None)
    added = sorted((t["id"], t["content"], bool(t.get("special"))) for t in spec.get("added_tokens", []))
    model = dict(spec["model"])
    model["merges"] = [" ".join(m) if isinstance(m, list) else m for m in model.get("merges", [])]
    if isinstance(model.get("vocab"), dict):
        model["vocab"] = sorted(model["vocab"].items(), key=lambda kv: kv[1])
    keyed = {
        "model": model,
        "added_tokens": added,
        "normalizer": spec.get("normalizer"),
        "pre_tokenizer": spec.get("pre_tokenizer"),
        "decoder": spec.get("decoder"),
        "post_processor": spec.get("post_processor"),
        "chat_template": template,
    }
    blob = json.dumps(keyed, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


# ----------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="genesis tokenizer", description="Train the Genesis byte-level BPE tokenizer."
    )
    sub = p.add_subparsers(dest="action", required=True)
    t = sub.add_parser("train", help="train on text/jsonl/parquet files or a mixture recipe")
    t.add_argument("sources", nargs="+", help=".txt, .jsonl, .parquet files or a mixture .yaml")
    t.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE, help="exact vocabulary size")
    t.add_argument("--output", required=True, help="folder for the saved tokenizer")
    t.add_argument("--field", default="text", help="field of jsonl/parquet records to read")
    t.add_argument("--min-frequency", type=int, default=2, help="minimum pair count to merge")
    t.add_argument("--sample-bytes", type=int, default=None, help="mixture only: characters to read in all, split by weight")
    t.add_argument("--no-progress", action="store_true", help="hide progress bars")
    f = sub.add_parser("fingerprint", help="print the fingerprint of a tokenizer folder")
    f.add_argument("dir")
    return p


def cli_main(argv: list[str], *, read_sources=None) -> int:
    """`read_sources(paths, sample_bytes)`, when given, turns the command's sources into what
    train_tokenizer reads (the `genesis` command passes one that reads mixture recipes)."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.action == "fingerprint":
        print(tokenizer_fingerprint(args.dir))
        return 0
    try:
        tok = train_tokenizer(
            read_sources(args.sources, args.sample_bytes) if read_sources else args.sources,
            args.vocab_size,
            args.output,
            min_frequency=args.min_frequency,
            show_progress=not args.no_progress,
            field=args.field,
            sample_bytes=args.sample_bytes,
        )
    except (ValueError, FileNotFoundError) as exc:
        print(f"genesis tokenizer: error: {exc}", file=sys.stderr)
        return 2
    report = tok.genesis_report
    print(f"saved {args.output} ({report['vocab_size']} entries, {report['train_seconds']}s)")
    print(f"fingerprint {tokenizer_fingerprint(args.output)}")
    width = max([len(n) for n in report["bytes_per_token"]] + [6])
    print(f"{'source':<{width}}  bytes/token")
    for name, bpt in report["bytes_per_token"].items():
        print(f"{name:<{width}}  {bpt:.3f}")
    return 0
