"""`genesis data prepare --dry-run`: read a sample of each source, predict the total time here.

For each source: plan its pieces (Hub sources are opened, so a bad id fails now), read up to
``sample_bytes`` of rendered text from its first piece, time reading + rendering (one core) and
encoding (the tokenizer's pool, all cores), and measure bytes per token. The text to tokenize is
the source's input size (local files; JSON syntax discounted by the sample's text/JSON ratio) or,
with a token budget, budget x bytes per token, whichever is smaller. Predicted seconds =
text x (read and render time per byte / workers + encode time per byte). Hub sources without a
budget have no known size and are left out of the total (said so).
"""

from __future__ import annotations

import json
import os
import time

from training.data.mixture import SourceSpec
from training.data.pieces import PIECE_BYTES, _tokenizer, iter_piece_records
from training.data.renderers import CHAT_SCHEMAS, get_renderer


def _input_bytes(pieces: list[dict]) -> int | None:
    if any(p["kind"] == "shard" for p in pieces):
        return None
    return sum(p["end"] - p["start"] if p["kind"] == "range" else os.path.getsize(p["file"]) for p in pieces)


def dry_run(mixture, tokenizer_dir, output_dir, *, num_proc: int | None = None, max_tokens_per_source=None,
            overrides=(), work_dir=None, piece_bytes: int = PIECE_BYTES, sample_bytes: int = 2_000_000) -> str:  # fmt: skip
    from training.data.prepare import setup_run

    run = setup_run(mixture, tokenizer_dir, output_dir, max_tokens_per_source=max_tokens_per_source,
                    work_dir=work_dir, piece_bytes=piece_bytes, overrides=overrides, merge=False)  # fmt: skip
    cores = len(os.sched_getaffinity(0))
    procs = min(num_proc or cores, cores)
    lines = [f"{'source':<24} {'pieces':>7} {'text MB':>9} {'bytes/tok':>9} {'tokens':>15} {'seconds':>9}"]
    total, unknown = 0.0, []
    for job in run.jobs:
        spec = SourceSpec(**job["spec"])
        render, texts, n_text, n_json = get_renderer(spec.schema), [], 0, 0
        t0 = time.perf_counter()
        for record in iter_piece_records(spec, job["pieces"][0], job["work_dir"]):
            n_json += len(json.dumps(record, ensure_ascii=False).encode())
            text = render(record, spec.fields)
            if isinstance(text, str) and text.strip():
                texts.append(text)
                n_text += len(text.encode("utf-8"))
                if n_text >= sample_bytes:
                    break
        t_read = time.perf_counter() - t0
        tok = _tokenizer(job["tokenizer_file"], spec.schema not in CHAT_SCHEMAS)
        t0 = time.perf_counter()
        tokens = sum(len(e.ids) + 1 for e in tok.encode_batch_fast(texts, add_special_tokens=False))
        t_enc = time.perf_counter() - t0
        if not tokens:
            lines.append(f"{spec.name:<24} {len(job['pieces']):>7} (no usable text in its first piece)")
            continue
        bpt = n_text / tokens
        size = _input_bytes(job["pieces"])
        text_bytes = None if size is None else size * n_text / max(n_json, 1)
        if job["budget"] is not None:
            by_budget = job["budget"] * bpt
            text_bytes = by_budget if text_bytes is None else min(text_bytes, by_budget)
        if text_bytes is None:
            unknown.append(spec.name)
            lines.append(f"{spec.name:<24} {len(job['pieces']):>7} {'?':>9} {bpt:>9.2f} {'?':>15} {'?':>9}")
            continue
        seconds = text_bytes * (t_read / n_text / procs + t_enc / n_text)
        total += seconds
        lines.append(f"{spec.name:<24} {len(job['pieces']):>7} {text_bytes / 1e6:>9,.1f} {bpt:>9.2f} "
                     f"{text_bytes / bpt:>15,.0f} {seconds:>9,.0f}")  # fmt: skip
    h, m = divmod(int(total) // 60, 60)
    lines.append(f"predicted total on this machine ({cores} cores, --num-proc {procs}): {total:,.0f} s ({h}h{m:02d}m)"
                 + (f"; unknown size (Hub, no budget): {', '.join(unknown)}" if unknown else ""))  # fmt: skip
    return "\n".join(lines)
