"""`genesis report`: one markdown page for a run, with plots.

    genesis report runs/genesis-1b                               # -> runs/genesis-1b/report/README.md
    genesis report runs/genesis-1b --output docs/run.md --eval-last 3 --max-batches 16
    genesis report runs/genesis-1b --no-eval                     # no model loading: seconds

Sections: config (from the newest checkpoint's meta, else the wandb config), throughput and MFU
(medians over the second half of the logged steps: warm-up excluded), the loss curve and the
other training curves (resumes, extensions and checkpoints marked), the checkpoints on disk,
model vs counting (held-out loss beside the unigram and bigram baselines per source, flagged when
the model is not below the bigram after a quarter of the run), and an evaluation table (held-out loss and bits per byte per source of the newest checkpoints, beside
the loss the training loop logged). Plots are PNGs next to the markdown file.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
from datetime import datetime, timezone
from pathlib import Path

from . import InspectError
from .plots import plot_runs
from .runs import Run, load_run

logger = logging.getLogger(__name__)

CONFIG_KEYS = ["n_params", "flops_per_token", "seq_len", "tokens_per_step", "world_size", "distributed_type",
               "mixed_precision", "mixture", "hidden_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "per_device_train_batch_size", "gradient_accumulation_steps",
               "learning_rate", "min_lr", "lr_scheduler_type", "warmup_steps", "max_steps", "weight_decay",
               "max_grad_norm", "seed", "peak_flops_note"]


def _fmt(v) -> str:
    if isinstance(v, float) and abs(v) >= 1000:
        return f"{v:,.0f}"
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, int) and abs(v) >= 10000:
        return f"{v:,}"
    return str(v).replace("|", "\\|")


def _checkpoints(run_dir: Path) -> list[dict]:
    from training.checkpoint.layout import committed

    rows = []
    for step, path in committed(run_dir / "checkpoints"):
        ts, meta = {}, {}
        for name, target in (("train_state.json", ts), ("meta.json", meta)):
            try:
                target.update(json.loads((path / name).read_text()))
            except (OSError, ValueError):
                pass
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        rows.append({"step": step, "path": path, "tokens": ts.get("tokens_seen"), "loss": ts.get("last_loss"),
                     "saved": meta.get("saved_utc"), "mb": size / 2**20, "meta": meta,
                     "parent": Path(meta["parent_checkpoint"]).name if meta.get("parent_checkpoint") else "-"})
    return rows


def _median(run: Run, key: str) -> float | None:
    xs, ys = run.series(key)
    tail = ys[len(ys) // 2:]  # second half: past warm-up, compile and the first data reads
    return statistics.median(tail) if tail else None


def build_report(run_dir: str | Path, output: str | Path | None = None, *, evaluate: bool = True, eval_last: int = 2,
                 max_batches: int | None = None, data_dir: str | None = None, device: str = "cpu",
                 allow_partial: bool = False) -> Path:
    """Write the markdown page and its PNGs; returns the page's path."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise InspectError(f"{run_dir}: not a run folder (no such directory)")
    output = Path(output) if output else run_dir / "report" / "README.md"
    run = load_run(run_dir, allow_partial=allow_partial)
    ckpts = _checkpoints(run_dir)
    output.parent.mkdir(parents=True, exist_ok=True)
    stem = output.stem.lower()
    curves = plot_runs([run], output.parent / f"{stem}_curves.png", title=f"{run.name}: training curves")
    speed = plot_runs([run], output.parent / f"{stem}_throughput.png", panels=["tok_s", "mfu"],
                      title=f"{run.name}: throughput")
    steps = sorted(run.steps)
    last = run.steps[steps[-1]]
    tokens = next((run.steps[s]["tokens"] for s in reversed(steps) if run.steps[s].get("tokens") is not None), None)
    meta = ckpts[-1]["meta"] if ckpts else {}
    config = {**run.config, **(meta.get("recipe") or {}), **{k: v for k, v in meta.items() if k != "recipe"}}

    md = [f"# Run report: {run.name}", "",
          f"Source `{run_dir}`, written {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC by `genesis report`.", "",
          f"- steps logged: {steps[0]}..{steps[-1]} ({len(steps)} records); tokens seen: {_fmt(tokens)}",
          f"- last training loss: {_fmt(last.get('loss'))} at step {steps[-1]}",
          f"- resumes at steps: {', '.join(map(str, run.resumes)) or 'none'}",
          f"- spikes at steps: {', '.join(map(str, run.spikes)) or 'none'}; rollbacks: "
          f"{', '.join(f'step {t} -> {r}' for t, r in run.rollbacks) or 'none'} (genesis spikes RUN)",
          f"- extensions: {', '.join(f'at {s}: max_steps {a} -> {b}' for s, a, b in run.extensions) or 'none'}"]
    md += [f"- stopped: step {e['step']}: {e.get('problem', e['event'])}" for e in run.events]
    md += [f"- note: {n}" for n in run.notes]
    md += ["", "## Config", "", "| key | value |", "|---|---|"]
    md += [f"| {k} | {_fmt(config[k])} |" for k in CONFIG_KEYS if config.get(k) is not None]
    md += ["", "## Throughput and MFU", "", "Medians over the second half of the logged steps.", "",
           "| tokens/s (all devices) | tokens/s per device | MFU | peak memory (GiB) |", "|---|---|---|---|"]
    mfu, mem = _median(run, "mfu"), _median(run, "peak_mem_gb")
    md += [f"| {_fmt(_median(run, 'tok_s'))} | {_fmt(_median(run, 'tok_s_per_device'))} | "
           f"{f'{mfu:.1%}' if mfu is not None else 'n/a (' + str(config.get('peak_flops_note', 'no GPU peak')) + ')'}"
           f" | {_fmt(mem) if mem is not None else 'n/a'} |", "", f"![throughput]({speed.name})", ""]
    md += _plan_section(run)
    md += ["## Loss curve", "", f"![curves]({curves.name})", "",
           "Dashed lines: resumes; broad faint bands: extensions; triangles: checkpoints on disk.", ""]
    md += ["## Checkpoints", ""]
    if ckpts:
        md += ["| step | tokens | last loss | saved (UTC) | size (MiB) | its launch resumed from |", "|---|---|---|---|---|---|"]
        md += [f"| {c['step']} | {_fmt(c['tokens'])} | {_fmt(c['loss'])} | {c['saved'] or '-'} | {c['mb']:.1f} | "
               f"{c['parent']} |" for c in ckpts]
    else:
        md += ["No committed checkpoint under `checkpoints/`."]
    md += _saves_section(run)
    md += ["", "## Model vs counting", ""] + _baseline_section(run)
    md += ["", "## Evaluation", ""] + _eval_section(run, ckpts, evaluate, eval_last, max_batches, data_dir, device)
    tmp = output.with_name(f".{output.name}.tmp")
    tmp.write_text("\n".join(md) + "\n", encoding="utf-8")
    os.replace(tmp, output)
    return output


def _plan_section(run) -> list[str]:
    """`genesis plan`'s preflight prediction beside what the run measured (the plan_vs_measured record
    pretrain.py writes after step 10 on CUDA)."""
    recs = [r for r in run.side_records if r.get("event") == "plan_vs_measured"]
    if not recs:
        return []
    gib = 2**30
    out = ["## Plan against measured", "",
           "`genesis plan`'s prediction for this launch (the preflight before step 1) and what the run measured at "
           "the step shown.", "", "| step | quantity | predicted | measured | measured / predicted |", "|---|---|---|---|---|"]

    def row(step, name, pred, meas, unit, scale=1.0):
        ratio = f"{meas / pred:.2f}" if pred and meas is not None else "n/a"
        spec = ",.2f" if unit else ",.0f"
        p = f"{format(pred / scale, spec)} {unit}".strip() if pred is not None else "n/a"
        m = f"{format(meas / scale, spec)} {unit}".strip() if meas is not None else "n/a (no CUDA)"
        return f"| {step} | {name} | {p} | {m} | {ratio} |"

    for r in recs:
        lo, hi = (r.get("predicted_tokens_per_s_range") or [None, None])[:2]
        out.append(row(r["step"], "peak allocated", r.get("predicted_peak_allocated"),
                       r.get("measured_max_memory_allocated"), "GiB", gib))
        out.append(row(r["step"], "card total (pred.) / reserved (meas.)", r.get("predicted_device_total"),
                       r.get("measured_max_memory_reserved"), "GiB", gib))
        tps = row(r["step"], "tokens/s, all GPUs", r.get("predicted_tokens_per_s"), r.get("measured_tokens_per_s"), "")
        if lo is not None and hi is not None:
            inside = r.get("measured_tokens_per_s") is not None and lo <= r["measured_tokens_per_s"] <= hi
            tps += f" range {lo:,.0f}-{hi:,.0f}: {'inside' if inside else 'outside'}"
        out.append(tps)
    return out + [""]


def _saves_section(run) -> list[str]:
    """What each save cost the run (metrics.jsonl "checkpoint" records) and the save plan."""
    saves = [r for r in run.side_records if r.get("event") == "checkpoint"]
    plans = [r for r in run.side_records if r.get("event") == "checkpoint_plan"]
    out = [""]
    for p in plans:
        out.append(f"- save plan: {p.get('requested')} requested, {p.get('mode')} used"
                   + (f" ({p['reason']})" if p.get("reason") else ""))
    if not saves:
        return out if plans else []
    out += ["", "| step | mode | training blocked (s) | total (s) | waited for the previous (s) | size (MiB) |",
            "|---|---|---|---|---|---|"]
    out += [f"| {r['step']} | {r.get('mode')} | {r.get('blocked_s', 0):.3f} | {r.get('total_s', 0):.2f} | "
            f"{r.get('waited_for_previous_s', 0):.2f} | {r.get('bytes', 0) / 2**20:.1f} |" for r in saves]
    blocked = sorted(r.get("blocked_s", 0.0) for r in saves)
    out += ["", f"Median stall per save: {blocked[len(blocked) // 2]:.3f} s over {len(saves)} saves."]
    return out


BIGRAM_CHECK_FROM = 0.25  # share of the run after which a model must be below the bigram baseline


def _baseline_section(run, check_from: float = BIGRAM_CHECK_FROM) -> list[str]:
    """Model vs bigram per source at the last logged evaluation, and a flag for every source whose
    held-out loss is not below the bigram's at an evaluation after `check_from` of the run's steps."""
    evals = [s for s in sorted(run.steps) if run.steps[s].get("val_bigram")]
    if not evals:
        return ["No baseline in the logged evaluations (metrics from before the baselines, or eval_steps 0)."]
    last = run.steps[evals[-1]]
    out = [f"Held-out loss at step {evals[-1]} beside counting on the same windows (nats/token; the baselines are "
           "counted from the train shards, training/evaluation.py):", "",
           "| source | model | bigram | unigram | model bpb | bigram bpb | model vs bigram |", "|---|---|---|---|---|---|---|"]
    for src in sorted(last["val_bigram"]):
        loss, bpb = last.get("val_loss", {}).get(src), last.get("val_bpb", {}).get(src)
        big, bbpb = last["val_bigram"][src], (last.get("val_bigram_bpb") or {}).get(src)
        uni = (last.get("val_unigram") or {}).get(src)
        vs = loss / big - 1 if loss is not None else None
        out.append(f"| {src} | {_fmt(loss)} | {_fmt(big)} | {_fmt(uni)} | {_fmt(bpb)} | {_fmt(bbpb)} | "
                   f"{f'{vs:+.1%}' if vs is not None else '-'} |")
    start = int(max(run.steps) * check_from)
    bad: dict[str, list[int]] = {}
    for s in evals:
        if s < start:
            continue
        rec = run.steps[s]
        for src, big in rec["val_bigram"].items():
            loss = rec.get("val_loss", {}).get(src)
            if loss is not None and not loss < big:
                bad.setdefault(src, []).append(s)
    out.append("")
    if bad:
        out += [f"**FLAG: not below the bigram baseline** after step {start} ({check_from:.0%} of the run): "
                + "; ".join(f"{src} at steps {', '.join(map(str, steps))}" for src, steps in sorted(bad.items()))
                + ". The model has learned no more than pairs of tokens there: check the data, the LR and the "
                  "pipeline before reading anything else in this report."]
    else:
        out.append(f"Below the bigram baseline on every source at every evaluation after step {start} "
                   f"({check_from:.0%} of the run).")
    return out


def _eval_section(run, ckpts, evaluate, eval_last, max_batches, data_dir, device) -> list[str]:
    from .evaluate import evaluate_path, format_table

    out = []
    logged = [s for s in sorted(run.steps) if run.steps[s].get("val_loss")]
    if logged:
        s = logged[-1]
        vals = run.steps[s]["val_loss"]
        out += [f"Held-out loss logged by the training loop at step {s}: "
                + ", ".join(f"{k} {v:.4f}" for k, v in sorted(vals.items())), ""]
    if not evaluate or not ckpts:
        return out + ["(no checkpoint evaluated: " + ("--no-eval" if not evaluate else "no checkpoints") + ")"]
    results, errors = [], []
    recipe = ckpts[-1]["meta"].get("recipe") or {}
    # The training loop's own eval windows by default, so the two tables can be compared.
    batch_size = ckpts[-1]["meta"].get("per_device_train_batch_size") or 4
    max_batches = max_batches or recipe.get("eval_batches") or 8
    for c in ckpts[-eval_last:]:
        try:
            results.append(evaluate_path(c["path"], data_dir=data_dir, batch_size=batch_size,
                                         max_batches=max_batches, device=device))
        except InspectError as e:
            errors.append(f"- {c['path'].name}: {e}")
    if results:
        out += [f"Held-out loss (nats/token) and bits per byte per source, {max_batches} batches of {batch_size} "
                "windows per source (`genesis eval`):", "", format_table(results)]
    return out + ([""] + errors if errors else [])


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="genesis report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help="the run's output_dir")
    p.add_argument("--output", "-o", default=None, help="markdown file (default: RUN_DIR/report/README.md)")
    p.add_argument("--no-eval", action="store_true", help="skip evaluating checkpoints")
    p.add_argument("--eval-last", type=int, default=2, help="evaluate the newest N checkpoints")
    p.add_argument("--max-batches", type=int, default=None, help="per source (default: the run's eval_batches)")
    p.add_argument("--data", default=None, help="prepared data (default: the run's)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--allow-partial", action="store_true", help="tolerate broken metrics lines")
    return p


def cli_main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        out = build_report(args.run_dir, args.output, evaluate=not args.no_eval, eval_last=args.eval_last,
                           max_batches=args.max_batches, data_dir=args.data, device=args.device,
                           allow_partial=args.allow_partial)
    except InspectError as e:
        print(f"genesis report: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(cli_main())
