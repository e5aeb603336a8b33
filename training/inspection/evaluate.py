"""Held-out loss and bits per byte per source, for any export or checkpoint; and a hook the
pretraining loop can call every N steps.

    genesis eval out/genesis-1b-40k --data runs/data                     # an export
    genesis eval runs/genesis-1b --max-batches 16 --json eval.json        # every checkpoint of a run
    genesis eval out/genesis-1b-40k --data runs/data --write-lm-eval-tasks tasks/   # lm-eval, offline
    genesis eval out/genesis-1b-40k --data runs/data --lm-eval genesis_val_python_docs,my_mc \
        --lm-eval-include my_tasks/                                       # run it (pip install -e '.[lm-eval]')

The numbers are those of the training loop's validation (training/evaluation.py defines
loss, bits per byte and the count baselines): each source's row shows the model beside the
unigram and bigram counted from the train shards, and "vs bigram" = loss / bigram - 1 (below 0:
the model has learned more than pairs of tokens).

The hook (`EvalHook`) runs the same fixed batches on every rank (FSDP needs every rank in every
forward), so it needs no reduction:

    hook = EvalHook(data_dir, tokenizer, seq_len=2048, micro_batch_size=4, max_batches=8, every=1000)
    if hook.due(step):
        record |= hook(model)           # {"val_loss": {src: ...}, "val_bpb": {src: ...}, "val_bigram": ...}
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch

from training.evaluation import (  # noqa: F401  (re-exported: the inspection tools' names)
    BaselineError,
    evaluate_model,
    load_baselines,
    metrics_record,
    token_byte_lengths,
)

from . import InspectError

logger = logging.getLogger(__name__)


class EvalHook:
    """Fixed held-out batches, loaded once; `hook(model)` -> metrics for the step's record."""

    def __init__(self, data_dir, tokenizer, *, seq_len: int, micro_batch_size: int, max_batches: int = 8,
                 every: int = 1000):
        from genesis_hf.tokenizer import tokenizer_fingerprint
        from training.data.loader import validation_batches

        self.every = every
        self.batches = validation_batches(data_dir, seq_len=seq_len, micro_batch_size=micro_batch_size,
                                          max_batches=max_batches,
                                          expected_fingerprint=tokenizer_fingerprint(tokenizer))
        self.byte_lengths = token_byte_lengths(tokenizer)
        self.baselines = load_baselines(data_dir, expected_fingerprint=tokenizer_fingerprint(tokenizer))

    def due(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    def __call__(self, model) -> dict[str, dict[str, float]]:
        return metrics_record(evaluate_model(model, self.batches, self.byte_lengths, self.baselines))


def evaluate_path(path: str | Path, *, data_dir: str | Path | None = None, seq_len: int | None = None,
                  batch_size: int = 4, max_batches: int = 8, device: str = "cpu",
                  tokenizer_dir: str | Path | None = None, dtype: torch.dtype = torch.float32,
                  with_baselines: bool = True) -> dict:
    """Evaluate one export or checkpoint: {"model", "step", "seq_len", "data_dir", "sources": {...}}.
    A checkpoint defaults to its run's data and window; an export needs data_dir."""
    from genesis_hf.tokenizer import tokenizer_fingerprint
    from training.data.loader import validation_batches

    from .models import load_model

    model, tokenizer, info = load_model(path, device=device, tokenizer_dir=tokenizer_dir, dtype=dtype)
    data_dir = data_dir or info.data_dir
    if not data_dir:
        raise InspectError(f"{path}: an export does not say which data it was trained on; pass --data DIR")
    if not (Path(data_dir) / "manifest.json").is_file():
        raise InspectError(f"{data_dir}: not a prepared data folder (no manifest.json); see `genesis data prepare`")
    seq_len = seq_len or info.seq_len or min(model.config.max_position_embeddings, 2048)
    fingerprint = tokenizer_fingerprint(tokenizer)
    try:
        batches = validation_batches(data_dir, seq_len=seq_len, micro_batch_size=batch_size, max_batches=max_batches,
                                     expected_fingerprint=fingerprint)
        baselines = load_baselines(data_dir, expected_fingerprint=fingerprint,
                                   tokenizer_name=f"the tokenizer of {path}") if with_baselines else None
    except ValueError as e:
        raise InspectError(f"{path} on {data_dir}: {e}") from e
    if not batches:
        raise InspectError(f"{data_dir}: no source has a full held-out window of {seq_len + 1} tokens")
    res = evaluate_model(model, batches, token_byte_lengths(tokenizer), baselines)
    return {"model": str(path), "label": info.label, "step": info.step, "seq_len": seq_len,
            "data_dir": str(data_dir), "sources": res}


def format_table(results: list[dict]) -> str:
    """A markdown table: one row per model and source: loss and bpb beside the count baselines."""
    lines = ["| model | step | source | loss | bpb | unigram | bigram | bigram bpb | vs bigram |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        step = r["step"] if r["step"] is not None else "-"
        for s, v in sorted(r["sources"].items()):
            base = [f"{v['unigram']:.4f}", f"{v['bigram']:.4f}", f"{v['bigram_bpb']:.4f}",
                    f"{v['vs_bigram']:+.1%}"] if "bigram" in v else ["-"] * 4
            lines.append(f"| {r['label']} | {step} | {s} | {v['loss']:.4f} | {v['bpb']:.4f} | " + " | ".join(base) + " |")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="genesis eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="+", help="exports, checkpoints, or run folders (= all their checkpoints)")
    p.add_argument("--data", default=None, help="prepared data folder (default: the checkpoint's run data)")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder, if a checkpoint's is not where it was")
    p.add_argument("--seq-len", type=int, default=None, help="window (default: the run's, else the model's)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-batches", type=int, default=8, help="per source")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="weights during evaluation (logits and the loss are fp32 either way)")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--write-lm-eval-tasks", default=None, metavar="DIR",
                   help="write offline lm-evaluation-harness tasks for the held-out text of --data, "
                        "and print the lm_eval command (docs/inspect.md)")
    p.add_argument("--lm-eval", default=None, metavar="TASKS",
                   help="run lm-evaluation-harness on an export with these comma-separated LOCAL tasks: those "
                        "in --lm-eval-include folders, and genesis_val_<source> (held-out text of --data)")
    p.add_argument("--lm-eval-include", action="append", default=[], metavar="DIR",
                   help="a folder of lm-eval task YAMLs (repeatable)")
    p.add_argument("--lm-eval-limit", type=int, default=None, help="documents per task (default: all)")
    return p


def _lm_eval(args) -> int:
    import tempfile

    from .lm_eval_tasks import run_lm_eval, write_val_text_tasks

    include = list(args.lm_eval_include)
    with tempfile.TemporaryDirectory(prefix="genesis-lm-eval-") as tmp:
        if args.data:  # the held-out text of the data folder as genesis_val_<source> tasks
            write_val_text_tasks(args.data, tmp, tokenizer_dir=args.tokenizer)
            include.append(tmp)
        rows = []
        for path in args.paths:
            res = run_lm_eval(path, [t for t in args.lm_eval.split(",") if t], include, device=args.device,
                              batch_size=args.batch_size, limit=args.lm_eval_limit)
            rows += [(path, task, metric, value) for task, m in sorted(res.items()) for metric, value in m.items()]
    print("| model | task | metric | value |\n|---|---|---|---|")
    print("\n".join(f"| {p} | {t} | {m} | {v:.4f} |" for p, t, m, v in rows))
    if args.json:
        Path(args.json).write_text(json.dumps([dict(zip(("model", "task", "metric", "value"), r)) for r in rows],
                                              indent=1) + "\n")
    return 0


def cli_main(argv: list[str] | None = None) -> int:
    from .models import expand_paths

    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.lm_eval:
            return _lm_eval(args)
        if args.write_lm_eval_tasks:
            from .lm_eval_tasks import lm_eval_command, write_val_text_tasks

            if not args.data:
                raise InspectError("--write-lm-eval-tasks needs --data DIR (the held-out text comes from it)")
            tasks = write_val_text_tasks(args.data, args.write_lm_eval_tasks, tokenizer_dir=args.tokenizer)
            for p in args.paths:
                print(" ".join(lm_eval_command(p, args.write_lm_eval_tasks, tasks, device=args.device)))
            return 0
        results = [evaluate_path(p, data_dir=args.data, seq_len=args.seq_len, batch_size=args.batch_size,
                                 max_batches=args.max_batches, device=args.device, tokenizer_dir=args.tokenizer,
                                 dtype=getattr(torch, args.dtype))
                   for p in expand_paths(args.paths)]
    except InspectError as e:
        print(f"genesis eval: {e}", file=sys.stderr)
        return 2
    print(format_table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(cli_main())
