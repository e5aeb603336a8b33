"""`genesis plan calibrate`: fit a GPU profile's constants to what runs on that GPU measured.

    python benchmarks/gpu_check.py --calibrate        # on the GPU: benchmarks/results/plan_calibration-<gpu>.json
    genesis plan calibrate --from benchmarks/results/plan_calibration-h100-sxm.json            # show the fit
    genesis plan calibrate --from benchmarks/results/plan_calibration-h100-sxm.json --write    # store it in gpus.yaml

Each row of the results file is one pretrain.py run at one setting (gpu_check: micro-batch 2, 4, 8),
with the plan's JSON for it and what the run measured. Fitted, and from what:
- matmul_efficiency: per row, by bisection, the value at which the middle prediction of the step time
  equals the measured one (tokens/s, median of the steady steps), every other constant held; the
  [pessimistic, optimistic] pair is [min, max] over the rows, so the range spans what the rows showed.
- memory_efficiency: NOT fitted. The rows differ in micro-batch only, which scales the matmul and the
  memory-bound kernels alike: tokens/s cannot tell the two apart (one scalar per row, two unknowns).
- allocator_reserve_fraction: max over rows of max_memory_reserved / max_memory_allocated - 1.
- cuda_context_gib: max over 1-rank rows of what NVML shows for the process, less max_memory_reserved.
- nccl_buffers_gib: the same over 2-rank rows, less the CUDA context (only with 2-rank rows).
The memory peak itself is the trace's and has no constant: the rows show its error, nothing fits it.

`--write` adds the fitted keys to that GPU's entry of gpus.yaml between two marker comments, with a
`calibrated:` note (source file, date, commit, rows); the rest of the file, comments included, is kept.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import sys
from dataclasses import replace
from pathlib import Path

from training.plan.profiles import GIB, TABLE, GPUProfile, UnknownGPU, load_table, lookup

ROOT = Path(__file__).resolve().parents[2]
ROW_FIELDS = ("gpu_name", "profile", "recipe", "overrides", "world_size", "accelerate_config", "plan", "measured")
MEASURED_FIELDS = ("tokens_per_s", "max_memory_allocated", "max_memory_reserved", "nvml_process_used")
BEGIN, END = "# >>> calibrated by `genesis plan calibrate --write`", "# <<< calibrated"
BRACKET = (0.01, 1.0)  # matmul efficiencies searched
METHOD = {"matmul_efficiency": "per row, bisection to the measured tokens/s; [min, max] over rows",
          "allocator_reserve_fraction": "max over rows of max_memory_reserved / max_memory_allocated - 1",
          "cuda_context_gib": "max over 1-rank rows of NVML process memory - max_memory_reserved",
          "nccl_buffers_gib": "max over 2-rank rows of NVML process memory - max_memory_reserved - CUDA context"}


class CalibrationError(ValueError):
    """A results file, field or GPU that calibrate refuses; the message names it."""


def read_results(path: Path) -> dict:
    """The results file, every field calibrate reads checked (one message naming file and field)."""
    if not path.is_file():
        raise CalibrationError(f"--from {path}: file not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CalibrationError(f"{path}: not JSON ({e})") from None
    if not isinstance(data, dict):
        raise CalibrationError(f"{path}: expected an object with 'rows', got {type(data).__name__}")
    for key in ("date", "commit", "rows"):
        if key not in data:
            raise CalibrationError(f"{path}: missing field '{key}'")
    if not isinstance(data["rows"], list) or not data["rows"]:
        raise CalibrationError(f"{path}: field 'rows' holds no rows")
    for i, row in enumerate(data["rows"]):
        for key in ROW_FIELDS:
            if not isinstance(row, dict) or key not in row:
                raise CalibrationError(f"{path}: rows[{i}]: missing field '{key}'")
        for key in MEASURED_FIELDS:
            if key not in row["measured"]:
                raise CalibrationError(f"{path}: rows[{i}]: missing field 'measured.{key}'")
        if not row["measured"]["tokens_per_s"]:
            raise CalibrationError(f"{path}: rows[{i}]: field 'measured.tokens_per_s' is {row['measured']['tokens_per_s']!r}")
    return data


def _path(p: str) -> str:
    return p if Path(p).is_absolute() or Path(p).exists() else str(ROOT / p)


class RowPlanner:
    """Predicts one row's setting under any profile; the trace is made once (cli._CACHE)."""

    def __init__(self, row: dict):
        from training.plan.cli import read_hardware, read_recipe, setting_for

        self.row = row
        hw = read_hardware(_path(row["accelerate_config"]), int(row["world_size"]))
        args, self.config = read_recipe(_path(row["recipe"]), [str(a) for a in row["overrides"]])
        self.setting, self.machines = setting_for(args, hw), hw["num_machines"]

    def __call__(self, prof: GPUProfile):
        from training.plan.cli import plan

        return plan(self.config, self.setting, prof, num_machines=self.machines)


def fit_matmul(planner: RowPlanner, prof: GPUProfile, tokens_per_s: float) -> tuple[float | None, str]:
    """(the matmul efficiency at which the middle prediction makes `tokens_per_s`, or None and why)."""
    def tps(m: float) -> float:
        return planner(replace(prof, matmul_efficiency=(m, m))).time["tokens_per_s"]

    lo, hi = BRACKET
    if tokens_per_s > tps(hi):
        return None, (f"measured {tokens_per_s:,.0f} tokens/s, faster than the plan at matmul efficiency {hi} "
                      f"({tps(hi):,.0f}): the memory-bound or communication time is overestimated")
    if tokens_per_s < tps(lo):
        return None, (f"measured {tokens_per_s:,.0f} tokens/s, slower than the plan at matmul efficiency {lo} "
                      f"({tps(lo):,.0f}): not this card's GEMMs (a CPU dry run, or a stall)")
    for _ in range(50):  # predicted tokens/s grows with the efficiency
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if tps(mid) < tokens_per_s else (lo, mid)
    return (lo + hi) / 2, ""


def _card_minus_reserved(row: dict) -> float | None:
    m = row["measured"]
    if m["nvml_process_used"] is None or m["max_memory_reserved"] is None:
        return None
    return (m["nvml_process_used"] - m["max_memory_reserved"]) / GIB


def fit(rows: list[dict], planners: list[RowPlanner], prof: GPUProfile) -> tuple[dict, list[str]]:
    """(fitted constants, notes on what could not be fitted and why)."""
    fitted, notes = {}, []
    good = []
    for i, (r, p) in enumerate(zip(rows, planners)):
        r["fitted_matmul_efficiency"], why = fit_matmul(p, prof, r["measured"]["tokens_per_s"])
        if why:
            notes.append(f"matmul_efficiency: rows[{i}] left out: {why}")
        else:
            good.append(r["fitted_matmul_efficiency"])
    if good:
        fitted["matmul_efficiency"] = [round(min(good), 4), round(max(good), 4)]
    notes.append("memory_efficiency: not fitted (the rows vary the micro-batch only, which scales matmul and "
                 "memory-bound time alike; tokens/s cannot separate them)")
    ratios = [r["measured"]["max_memory_reserved"] / r["measured"]["max_memory_allocated"] - 1 for r in rows
              if r["measured"]["max_memory_reserved"] and r["measured"]["max_memory_allocated"]]
    if ratios:
        fitted["allocator_reserve_fraction"] = round(max(0.0, max(ratios)), 4)
    else:
        notes.append("allocator_reserve_fraction: not fitted (no row measured max_memory_reserved/allocated)")
    one = [x for r in rows if int(r["world_size"]) == 1 and (x := _card_minus_reserved(r)) is not None]
    two = [x for r in rows if int(r["world_size"]) > 1 and (x := _card_minus_reserved(r)) is not None]
    if one:
        fitted["cuda_context_gib"] = round(max(0.0, max(one)), 3)
    else:
        notes.append("cuda_context_gib: not fitted (no 1-rank row with NVML's process memory and the reserved peak)")
    if two:
        context = fitted.get("cuda_context_gib", prof.cuda_context_gib)
        fitted["nccl_buffers_gib"] = round(max(0.0, max(two) - context), 3)
    else:
        notes.append("nccl_buffers_gib: not fitted (no 2-rank row with NVML's process memory)")
    return fitted, notes


def apply(prof: GPUProfile, fitted: dict) -> GPUProfile:
    return replace(prof, **{k: tuple(v) if isinstance(v, list) else v for k, v in fitted.items()})


def _err(pred: float, meas: float | None) -> str:
    return "n/a" if not meas else f"{pred / meas - 1:+.1%}"


def comparison(rows: list[dict], planners: list[RowPlanner], before: GPUProfile, after: GPUProfile) -> list[str]:
    """Per row: the prediction error before and after the fit (tokens/s, card total, allocated peak)."""
    out = ["| setting | measured tokens/s | before: predicted (error) | after: predicted (error) | fitted matmul "
           "| allocated peak: predicted / measured | card total: measured, before, after (GiB) |",
           "| --- | --- | --- | --- | --- | --- | --- |"]
    for r, planner in zip(rows, planners):
        m, s = r["measured"], planner.setting
        b, a = planner(before), planner(after)
        tps = m["tokens_per_s"]
        card = m["nvml_process_used"]
        alloc = m["max_memory_allocated"]
        fm = r.get("fitted_matmul_efficiency")
        lo, hi = a.time["tokens_per_s_range"]
        inside = "in range" if lo <= tps <= hi else "OUTSIDE the range"
        out.append(
            f"| {r['world_size']} x mb {s.micro_batch} x {s.seq_len} | {tps:,.0f} | {b.time['tokens_per_s']:,.0f} "
            f"({_err(b.time['tokens_per_s'], tps)}) | {a.time['tokens_per_s']:,.0f} ({_err(a.time['tokens_per_s'], tps)}, {inside}) "
            f"| {'n/a' if fm is None else f'{fm:.3f}'} | {b.memory['peak_allocated'] / GIB:.2f} / "
            f"{'n/a' if alloc is None else f'{alloc / GIB:.2f}'} ({_err(b.memory['peak_allocated'], alloc)}) | "
            f"{'n/a' if card is None else f'{card / GIB:.2f}'}, {b.memory['predicted_device_total'] / GIB:.2f}, "
            f"{a.memory['predicted_device_total'] / GIB:.2f} |")
    return out


def _yaml_value(v) -> str:
    return json.dumps(v) if isinstance(v, (str, list)) else repr(v)


def write_profile(table: Path, gpu: str, fitted: dict, note: dict) -> None:
    """Put the fitted keys in `gpu`'s entry of `table` as text between the marker comments (an earlier
    calibration of that card is replaced); every other line of the file stays as it was."""
    lines = table.read_text(encoding="utf-8").splitlines()
    try:
        gpus_at = lines.index("gpus:")
    except ValueError:
        raise CalibrationError(f"{table}: no top-level 'gpus:' line") from None
    head = re.compile(rf"^  ['\"]?{re.escape(gpu)}['\"]?:\s*(#.*)?$")
    start = next((i for i in range(gpus_at + 1, len(lines)) if head.match(lines[i])), None)
    if start is None:
        raise CalibrationError(f"{table}: no entry '{gpu}' under gpus:")
    end = next((i for i in range(start + 1, len(lines)) if lines[i].strip() and not lines[i].startswith("   ")),
               len(lines))
    while end > start + 1 and not lines[end - 1].strip():
        end -= 1
    body = lines[start + 1:end]
    if any(ln.strip() == BEGIN for ln in body):  # drop the earlier calibration of this card
        b = next(i for i, ln in enumerate(body) if ln.strip() == BEGIN)
        e = next((i for i, ln in enumerate(body) if ln.strip() == END), len(body) - 1)
        body = body[:b] + body[e + 1:]
    for key in fitted:
        hit = next((ln for ln in body if re.match(rf"^\s+{key}:", ln)), None)
        if hit is not None:
            raise CalibrationError(f"{table}: '{gpu}' sets {key} by hand ({hit.strip()!r}); remove it first")
    block = [f"    {BEGIN}", "    calibrated:"]
    block += [f"      {k}: {_yaml_value(v)}" for k, v in note.items()]
    block += [f"    {k}: {_yaml_value(v)}" for k, v in fitted.items()]
    block.append(f"    {END}")
    out = lines[:start + 1] + body + block + lines[end:]
    table.write_text("\n".join(out) + "\n", encoding="utf-8")


def _rows_text(rows: list[dict], planners: list[RowPlanner]) -> str:
    mbs = ", ".join(str(p.setting.micro_batch) for p in planners)
    ranks = sorted({int(r["world_size"]) for r in rows})
    recipes = sorted({Path(r["recipe"]).name for r in rows})
    return f"micro-batch {mbs} on {'/'.join(map(str, ranks))} rank(s) ({', '.join(recipes)})"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="genesis plan calibrate", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--from", dest="results", required=True, help="a results JSON of `benchmarks/gpu_check.py --calibrate`")
    p.add_argument("--gpu", default=None, help="the profile to fit (default: the one the rows name)")
    p.add_argument("--write", action="store_true", help="store the fitted constants in the GPU's entry of the table")
    p.add_argument("--table", default=str(TABLE), help="the gpus.yaml to read and write (default: training/plan/gpus.yaml)")
    return p


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from training.args import ConfigError
    from training.plan.cli import PlanError

    path, table_path = Path(ns.results), Path(ns.table)
    try:
        data = read_results(path)
        rows = data["rows"]
        table = load_table(table_path)
        named = ns.gpu or rows[0]["profile"]
        if named is None or (ns.gpu is None and any(r["profile"] != named for r in rows)):
            raise CalibrationError(f"{path}: the rows name profiles {sorted({str(r['profile']) for r in rows})}; "
                                   "say which to fit with --gpu")
        prof = lookup(named, table)
        if ns.write and data.get("dry_run"):
            raise CalibrationError(f"{path} holds dry-run rows (CPU): --write refused (leave it out to see the fit)")
        planners = [RowPlanner(r) for r in rows]
    except (CalibrationError, UnknownGPU, PlanError, ConfigError) as e:
        print(f"genesis plan calibrate: {e}", file=sys.stderr)
        return 2
    fitted, notes = fit(rows, planners, prof)
    gpus = sorted({r["gpu_name"] for r in rows})
    print(f"calibrate {prof.name} from {path}: {len(rows)} row(s), {_rows_text(rows, planners)}; measured on "
          f"{', '.join(gpus)} on {data['date']} at commit {data['commit']}" + (" (DRY RUN rows)" if data.get("dry_run") else ""))
    for key, value in fitted.items():
        print(f"  {key}: {getattr(prof, key) if not isinstance(getattr(prof, key), tuple) else list(getattr(prof, key))}"
              f" -> {value}")
    for note in notes:
        print(f"  {note}")
    print("\n".join(["", *comparison(rows, planners, prof, apply(prof, fitted))]))
    if not ns.write:
        return 0
    if not fitted:
        print("genesis plan calibrate: nothing was fitted: nothing written", file=sys.stderr)
        return 1
    note = {"from": str(path), "date": str(data["date"]), "commit": str(data["commit"]), "gpu_name": ", ".join(gpus),
            "rows": _rows_text(rows, planners), "written": datetime.date.today().isoformat(),
            "fitted": "; ".join(f"{k}: {METHOD[k]}" for k in fitted)}
    try:
        write_profile(table_path, prof.name, fitted, note)
        check = lookup(prof.name, load_table(table_path))  # the loader reads back what was written
    except (CalibrationError, UnknownGPU) as e:
        print(f"genesis plan calibrate: {e}", file=sys.stderr)
        return 2
    print(f"\nwrote {', '.join(fitted)} for {check.name} in {table_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
