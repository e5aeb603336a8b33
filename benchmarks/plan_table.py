"""The planner's answers for the 1B recipe on 1x/2x of several cards, plain and with --fit (one process,
so each traced setting is shared by every card). Prints markdown for docs/benchmarks.md ("Plan").

    python benchmarks/plan_table.py [--gpus "RTX 4090,RTX 3090,RTX 4060 Ti 16 GB,H100 SXM"] [--no-fit]
    python benchmarks/plan_table.py --align [--no-fit]   # SFT and DPO of the 1B (alignment/recipes/*-genesis-1b.yaml)
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("OMP_NUM_THREADS", "1")

from training.plan.cli import plan, read_hardware, read_recipe, setting_for  # noqa: E402
from training.plan.fit import _flags, fit  # noqa: E402
from training.plan.predict import gib  # noqa: E402
from training.plan.profiles import lookup  # noqa: E402

RECIPE = "training/recipes/genesis-1b.yaml"
HARDWARE = {1: "accelerate_configs/single_gpu.yaml", 2: "accelerate_configs/fsdp_2gpu_pcie.yaml"}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gpus", default="RTX 4090,RTX 3090,RTX 4060 Ti 16 GB,H100 SXM")
    ap.add_argument("--no-fit", action="store_true")
    ap.add_argument("--align", action="store_true", help="the SFT and DPO recipes instead of pretraining")
    ns = ap.parse_args()
    if ns.align:
        return align_tables(ns)
    t0 = time.monotonic()
    rows, fits = [], []
    for n in (1, 2):
        hw = read_hardware(HARDWARE[n])
        # the recipe's tokens per step on any count: 4 x 32 x 2 sequences per step
        args, config = read_recipe(RECIPE, ["--gradient_accumulation_steps", str(64 // n)])
        base = setting_for(args, hw)
        for name in ns.gpus.split(","):
            prof = lookup(name)
            p = plan(config, base, prof)
            lo, hi = p.time["tokens_per_s_range"]
            rows.append(f"| {n}x {prof.name} | {gib(p.memory['peak_allocated'])} | {gib(p.memory['predicted_device_total'])} | "
                        f"{'yes' if p.fits else 'NO'} | {p.time['tokens_per_s']:,.0f} ({lo:,.0f}-{hi:,.0f}) | {p.time['mfu']:.0%} | "
                        f"{p.time['exposed_comm_s']:.2f} s of {p.time['step_s']:.1f} s |")
            if not ns.no_fit:
                fits.append(f"| {n}x {prof.name} | {fit_cells(config, base, prof, mfu=True)} |")
            print(f"[{time.monotonic() - t0:.0f}s] {n}x {name} done", file=sys.stderr, flush=True)
    return print_tables(["GPUs", "peak allocated", "card total", "fits", "tokens/s (range)", "MFU", "exposed comm"], rows,
                        ["GPUs", "--fit: best setting", "card total", "tokens/s (range)", "MFU"], fits, t0)


def fit_cells(config, base, prof, *, mfu: bool) -> str:
    """The --fit table's cells after the GPU column: the best setting, its card total and tokens/s."""
    r = fit(config, base, prof)
    if r["best"] is None:
        return f"none fits | smallest card total {gib(r['smallest'].memory['predicted_device_total'])} | |" + (" |" if mfu else "")
    tps, s, bp = r["best"]
    lo, hi = bp.time["tokens_per_s_range"]
    return (f"`{_flags(s, base)}`, AC {s.activation_checkpointing}, reshard {s.reshard_after_forward} | "
            f"{gib(bp.memory['predicted_device_total'])} | {tps:,.0f} ({lo:,.0f}-{hi:,.0f})"
            + (f" | {bp.time['mfu']:.0%}" if mfu else ""))


def print_tables(head: list[str], rows: list[str], fit_head: list[str], fits: list[str], t0: float) -> int:
    for cols, body in ((head, rows), (fit_head, fits)):
        if body:
            print(("\n" if cols is fit_head else "") + "| " + " | ".join(cols) + " |")
            print("| " + " | ".join("---" for _ in cols) + " |")
            print("\n".join(body))
    print(f"\n({time.monotonic() - t0:.0f} s on this machine)")
    return 0


ALIGN = {"sft": "alignment/recipes/sft-genesis-1b.yaml", "dpo": "alignment/recipes/dpo-genesis-1b.yaml"}


def align_tables(ns) -> int:
    """SFT and DPO of the 1B on 1x/2x of each card, the recipe's sequences per step kept (accumulation
    doubled on one GPU). The model is the 1B pretraining recipe's (the SFT/DPO input folders do not exist
    before a real run)."""
    from training.plan.align import read_align_recipe, setting_for_align

    config = read_recipe(RECIPE, [])[1]
    t0 = time.monotonic()
    rows, fits = [], []
    for stage, recipe in ALIGN.items():
        for n in (1, 2):
            hw = read_hardware(HARDWARE[n])
            script_args, training_args, model_args = read_align_recipe(stage, recipe, [])
            training_args.gradient_accumulation_steps *= 2 // n
            base = setting_for_align(stage, training_args, model_args, script_args, hw)
            for name in ns.gpus.split(","):
                prof = lookup(name)
                p = plan(config, base, prof)
                lo, hi = p.time["tokens_per_s_range"]
                m = p.memory
                rows.append(f"| {stage.upper()} | {n}x {prof.name} | {gib(m['peak_allocated'])} | "
                            f"{gib(m['reference']) if base.reference else '-'} | {gib(m['predicted_device_total'])} | "
                            f"{'yes' if p.fits else 'NO'} | {p.time['tokens_per_s']:,.0f} ({lo:,.0f}-{hi:,.0f}) | "
                            f"{p.time['mfu']:.0%} | {p.peak_phase} |")
                if not ns.no_fit:
                    fits.append(f"| {stage.upper()} | {n}x {prof.name} | {fit_cells(config, base, prof, mfu=False)} |")
                print(f"[{time.monotonic() - t0:.0f}s] {stage} {n}x {name} done", file=sys.stderr, flush=True)
    return print_tables(["stage", "GPUs", "peak allocated", "of it, reference", "card total", "fits", "tokens/s (range)",
                         "MFU", "peak at"], rows, ["stage", "GPUs", "--fit: best setting", "card total", "tokens/s (range)"],
                        fits, t0)


if __name__ == "__main__":
    sys.exit(main())
