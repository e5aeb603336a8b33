"""`genesis spikes RUN`: the loss spikes of a run, the data behind each, and the rollbacks.

    genesis spikes runs/genesis-1b                 # every spike: step, loss, grad norm, sources; rollbacks
    genesis spikes runs/genesis-1b --show 16950    # the text of that step's windows, truncated
    genesis spikes runs/genesis-1b --skip-data     # the skipped positions, as --skip_data JSON

Reads `<run>/metrics.jsonl` (the loop writes `{"event": "spike", "windows": [...]}` and
`{"event": "rollback", ...}`) and, for `--show`, the run's data folder and tokenizer as its newest
checkpoint's meta.json names them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def read_events(run: Path) -> tuple[list[dict], list[dict]]:
    path = run / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: is {run} a pretraining run folder?")
    spikes, rollbacks = [], []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        try:
            record = json.loads(line)
        except ValueError:
            raise ValueError(f"{path}:{n}: not JSON") from None
        if record.get("event") == "spike":
            spikes.append(record)
        elif record.get("event") == "rollback":
            rollbacks.append(record)
    return spikes, rollbacks


def summary(spikes: list[dict], rollbacks: list[dict]) -> str:
    lines = ["| step | loss | grad norm | problem | windows (source x count) | per-window loss (max) |",
             "| ---: | ---: | ---: | --- | --- | ---: |"]
    for sp in spikes:
        counts: dict[str, int] = {}
        for w in sp["windows"]:
            counts[w["source"]] = counts.get(w["source"], 0) + 1
        worst = max((w["micro_loss"] for w in sp["windows"]), default=float("nan"))
        lines.append(f"| {sp['step']} | {sp['loss']:.4g} | {sp['grad_norm']:.4g} | {sp['problem']} | "
                     f"{', '.join(f'{k} x{v}' for k, v in sorted(counts.items()))} | {worst:.4g} |")
    if not spikes:
        lines.append("| - | | | no spikes | | |")
    lines += ["", f"{len(rollbacks)} rollback(s)"]
    for rb in rollbacks:
        skipped = sum(rb["skipped_tokens"].values())
        lines.append(f"- at step {rb['trigger_step']} (spikes {rb['spikes']}): restored step {rb['restored_step']} "
                     f"(LR {rb['restart_lr']:.3g}); skipped windows {rb['skip']} = {skipped:,} tokens")
    return "\n".join(lines)


def _run_meta(run: Path) -> dict:
    metas = sorted((run / "checkpoints").glob("step-*/meta.json"))
    if not metas:
        raise FileNotFoundError(f"{run}/checkpoints has no checkpoint whose meta.json names the data and tokenizer")
    return json.loads(metas[-1].read_text())


def show(run: Path, spike: dict, chars: int) -> str:
    """The decoded text of the spike's windows (each truncated to `chars`)."""
    from transformers import AutoTokenizer

    from training.data.loader import PackedLoader

    meta = _run_meta(run)
    tokenizer = AutoTokenizer.from_pretrained(meta["tokenizer_dir"])
    loader = PackedLoader(meta["data_dir"], seq_len=meta["seq_len"], micro_batch_size=1)
    out = [f"step {spike['step']}: {spike['problem']} (loss {spike['loss']:.4g}, grad norm {spike['grad_norm']:.4g})"]
    for w in spike["windows"]:
        ids = loader.sources[w["source"]].read(w["offset"], loader.window).tolist()
        text = tokenizer.decode(ids)
        # control characters escaped (\n, \x00, \ufffd shows as itself): bad data stays visible on one line
        shown = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text[:chars])
        where = f"{w.get('shard', '?')} @ {w.get('shard_offset', '?')}, document {w.get('doc_index_in_shard', '?')}"
        out += ["", f"--- rank {w['rank']} micro {w['micro']}: {w['source']} epoch {w['epoch']} offset {w['offset']} "
                    f"({where}); micro-batch loss {w['micro_loss']:.4g}",
                shown + (f" ... [{len(text) - chars} more characters]" if len(text) > chars else "")]
    return "\n".join(out)


def cli_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="genesis spikes", description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="a pretraining run folder (with metrics.jsonl)")
    parser.add_argument("--show", type=int, metavar="STEP", help="print the text of that spike's windows")
    parser.add_argument("--chars", type=int, default=400, help="characters shown per window (--show)")
    parser.add_argument("--skip-data", action="store_true",
                        help="print every rollback's skipped positions as one --skip_data JSON object")
    args = parser.parse_args(argv)
    run = Path(args.run)
    try:
        spikes, rollbacks = read_events(run)
        if args.skip_data:
            from training.recovery import merge_skips

            print(json.dumps(merge_skips(rollbacks)))
        elif args.show is not None:
            hits = [sp for sp in spikes if sp["step"] == args.show]
            if not hits:
                raise ValueError(f"no spike at step {args.show} in {run}/metrics.jsonl; spikes at "
                                 f"{sorted({sp['step'] for sp in spikes}) or 'no step'}")
            print("\n\n".join(show(run, sp, args.chars) for sp in hits))
        else:
            print(summary(spikes, rollbacks))
    except (OSError, ValueError, KeyError) as e:
        print(f"genesis spikes: error: {e}", file=sys.stderr)
        return 2
    return 0
