"""Training curves of one or more runs, overlaid: loss (train, and held-out per source), LR,
gradient norm and tokens/s, with resumes, extensions and checkpoints marked.

    genesis plot runs/genesis-1b --output curves.png
    genesis plot runs/a runs/b/metrics.jsonl runs/c/wandb/offline-run-*/run-*.wandb --output cmp.png
    genesis plot runs/genesis-1b --output loss.png --panels loss --smooth 50

SOURCES are output folders, metrics.jsonl files or wandb run files (see training/inspection/runs.py).
Markers: dashed vertical line = a resume (a launch continued from that step's checkpoint),
broad faint band = an extension (max_steps grew; the new value is written at the top of the first
panel), small triangles on the step axis = committed checkpoints, red triangles at the top = loss or
grad-norm spikes, a red band = a rollback (from the checkpoint restored to the step that triggered it). In the loss panel, a dashed
horizontal line per source is the bigram baseline on the held-out windows (training/evaluation.py).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from . import InspectError
from .runs import Run, load_run

logger = logging.getLogger(__name__)

# panel name -> (metrics key, y label, log-scale y)
PANELS: dict[str, tuple[str, str, bool]] = {
    "loss": ("loss", "loss (nats/token)", False),
    "lr": ("lr", "learning rate", False),
    "grad_norm": ("grad_norm", "grad norm (pre-clip)", True),
    "tok_s": ("tok_s", "tokens / s (all devices)", False),
    "mfu": ("mfu", "MFU", False),
}


def smooth(ys: list[float], window: int) -> list[float]:
    """Trailing mean over `window` points (window <= 1: unchanged); the first points average what exists."""
    if window <= 1:
        return list(ys)
    out, acc = [], 0.0
    for i, y in enumerate(ys):
        acc += y
        if i >= window:
            acc -= ys[i - window]
        out.append(acc / min(i + 1, window))
    return out


def _mark(ax, run: Run, color, annotate: bool) -> None:
    # An extension is a broad faint band, a resume a thin dashed line: both stay visible when an
    # extension is (as usual) also a resume at the same step.
    for s in run.resumes:
        ax.axvline(s, color=color, linestyle="--", linewidth=0.9, alpha=0.8)
    for s, _, new in run.extensions:
        ax.axvline(s, color=color, linestyle="-", linewidth=6, alpha=0.18)
        if annotate:
            ax.annotate(f"max_steps -> {new}", (s, 1.0), xycoords=("data", "axes fraction"), xytext=(3, -10),
                        textcoords="offset points", fontsize=7, color=color)
    for trigger, restored in run.rollbacks:  # the abandoned stretch, from the checkpoint to the trigger
        ax.axvspan(restored, trigger, color="tab:red", alpha=0.15, linewidth=0)
    if run.spikes:
        ax.plot(run.spikes, [1.0] * len(run.spikes), linestyle="none", marker="v", markersize=6, color="tab:red",
                transform=ax.get_xaxis_transform(), clip_on=False)
    if run.checkpoints:
        ax.plot(run.checkpoints, [0.0] * len(run.checkpoints), linestyle="none", marker="^", markersize=5,
                color=color, alpha=0.8, transform=ax.get_xaxis_transform(), clip_on=False)


def _clip_loss(ax, runs: list[Run]) -> bool:
    """Keep the first steps' loss (about ln V) from squashing the rest of a long curve flat."""
    tails = []
    for run in runs:
        ys = run.series("loss")[1]
        if len(ys) >= 100:
            tails += ys[len(ys) // 50:]
    lo, hi = ax.get_ylim()
    if not tails or max(tails) >= hi * 0.9:
        return False
    ax.set_ylim(lo, max(tails) + 0.05 * (max(tails) - min(tails)))
    return True


def plot_runs(runs: list[Run], output: str | Path, *, panels: list[str] | None = None, smooth_window: int = 1,
              title: str | None = None) -> Path:
    """Write one PNG with a panel per metric; returns its path. A panel no run has data for is
    drawn with a note instead of left blank-and-silent (e.g. MFU on CPU)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    panels = panels or ["loss", "lr", "grad_norm", "tok_s"]
    unknown = [p for p in panels if p not in PANELS]
    if unknown:
        raise InspectError(f"unknown panel(s) {unknown}; choose from {sorted(PANELS)}")
    ncols = 2 if len(panels) > 1 else 1
    nrows = (len(panels) + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(6.4 * ncols, 3.6 * nrows), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, panel in zip(axes.flat, panels):
        key, label, logy = PANELS[panel]
        drawn = False
        for i, run in enumerate(runs):
            color = colors[i % len(colors)]
            xs, ys = run.series(key)
            if xs:
                ax.plot(xs, smooth(ys, smooth_window) if panel != "lr" else ys, color=color, linewidth=1.2,
                        label=run.name)
                drawn = True
            if panel == "loss":
                for j, src in enumerate(run.val_sources()):
                    vx, vy = run.series("val_loss", src)
                    # one marker and dash pattern per source: the run's colour is shared
                    ax.plot(vx, vy, color=color, linestyle=(0, (4, 1 + 2 * j)), marker="osD^vP*X"[j % 8], markersize=4,
                            linewidth=1.0, alpha=0.85, label=f"{run.name} val {src}")
                    drawn = True
                    bx, by = run.series("val_bigram", src)
                    if by:  # counting's score on the same windows: the curve has to end below it
                        ax.axhline(by[-1], color=color, linestyle="--", linewidth=0.9, alpha=0.6)
                        ax.annotate(f"bigram {src} {by[-1]:.2f}", (0.0, by[-1]), xycoords=("axes fraction", "data"),
                                    xytext=(3, 2 + 9 * j), textcoords="offset points", fontsize=7, color=color)
            _mark(ax, run, color, annotate=panel == panels[0])
        steps = [s for r in runs for s in r.steps]
        ax.set_xlim(min(steps) - 0.5, max(steps) + 0.5)  # every panel on the same step axis
        if not drawn:
            ax.set_yticks([])
            ax.text(0.5, 0.5, f"no '{key}' values in these runs", ha="center", va="center",
                    transform=ax.transAxes, color="0.4")
        else:
            vals = [v for r in runs for v in r.series(key)[1]]
            if logy and min(vals) > 0 and max(vals) / min(vals) > 20:  # spikes stay readable
                ax.set_yscale("log")
        if panel == "loss" and drawn and _clip_loss(ax, runs):
            label += " (y axis from 2% of the steps on)"
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        if panel == "loss" and drawn:
            ax.legend(fontsize=7, loc="upper right")
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    keys = [Line2D([], [], color="0.3", linestyle="--", label="resume"),
            Line2D([], [], color="0.3", linestyle="-", linewidth=6, alpha=0.18, label="extension (max_steps grew)"),
            Line2D([], [], color="0.3", linestyle="none", marker="^", label="checkpoint on disk")]
    if any(r.rollbacks or r.spikes for r in runs):
        keys += [Line2D([], [], color="tab:red", linestyle="none", marker="v", label="spike"),
                 Line2D([], [], color="tab:red", linewidth=6, alpha=0.15, label="rolled back (checkpoint -> trigger)")]
    fig.legend(handles=keys, loc="lower center", ncol=len(keys), fontsize=8, frameon=False)
    fig.suptitle(title or "  vs  ".join(r.name for r in runs), fontsize=11)
    fig.tight_layout(rect=(0, 0.05, 1, 0.96))
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(output)  # a failed plot never leaves a half-written PNG under the final name
    return output


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="genesis plot", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sources", nargs="+", help="output folders, metrics.jsonl files or run-*.wandb files")
    p.add_argument("--output", "-o", required=True, help="the PNG to write")
    p.add_argument("--panels", default="loss,lr,grad_norm,tok_s",
                   help=f"comma-separated, from {','.join(PANELS)} (default: %(default)s)")
    p.add_argument("--smooth", type=int, default=1, help="trailing-mean window in logged steps (not for lr)")
    p.add_argument("--names", default=None, help="comma-separated legend names, one per source")
    p.add_argument("--title", default=None)
    p.add_argument("--allow-partial", action="store_true",
                   help="skip broken metrics lines and read a truncated wandb file up to its last whole record")
    return p


def cli_main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    names = args.names.split(",") if args.names else [None] * len(args.sources)
    if len(names) != len(args.sources):
        print(f"genesis plot: --names has {len(names)} names for {len(args.sources)} sources", file=sys.stderr)
        return 2
    try:
        runs = [load_run(s, allow_partial=args.allow_partial, name=n) for s, n in zip(args.sources, names)]
        out = plot_runs(runs, args.output, panels=args.panels.split(","), smooth_window=args.smooth,
                        title=args.title)
    except InspectError as e:
        print(f"genesis plot: {e}", file=sys.stderr)
        return 2
    for run in runs:
        print(f"{run.name}: {len(run.steps)} steps ({min(run.steps)}..{max(run.steps)}), resumes at "
              f"{run.resumes or '-'}, extensions {[(s, f'{a}->{b}') for s, a, b in run.extensions] or '-'}, "
              f"checkpoints {run.checkpoints or '-'}")
        for note in run.notes:
            print(f"  note: {note}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(cli_main())
