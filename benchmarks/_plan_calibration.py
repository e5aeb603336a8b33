"""What `gpu_check.py --calibrate` needs beside its pretrain.py runs: the plan of each setting (in a child
process, as pretrain.py's preflight runs it), what NVML shows per process while a run trains, one
results row per run, the markdown table and the results file `genesis plan calibrate` reads.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
GIB = 2**30


def start_plan(recipe: str, hardware: str, world: int, profile: str, vram_gib: float | None,
               overrides: list[str], log_path: Path) -> subprocess.Popen:
    """`genesis plan ... --json` for one setting, started now (the caller collects it with `plan_json`).
    No CUDA in the child: the plan runs on fake tensors, the GPU stays the run's."""
    cmd = [sys.executable, "-m", "training.plan.cli", "--config", recipe, "--hardware", hardware,
           "--num_processes", str(world), "--gpu", profile, "--json", *overrides]
    if vram_gib is not None:  # what the preflight passes: the card's own memory
        cmd[cmd.index("--json"):cmd.index("--json")] = ["--vram-gb", f"{vram_gib:.3f}"]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "WORLD_SIZE": "1", "RANK": "0"}
    out = open(log_path, "w+")  # noqa: SIM115 (closed by plan_json)
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, text=True)
    proc.log = out
    return proc


def plan_json(proc: subprocess.Popen, timeout: float = 900) -> dict:
    proc.wait(timeout=timeout)
    proc.log.seek(0)
    text = proc.log.read()
    proc.log.close()
    if proc.returncode != 0:
        raise RuntimeError(f"genesis plan failed (rc {proc.returncode}): {proc.args}\n{text[-3000:]}")
    return json.loads(text[text.index("{"):])


def cuda_device() -> tuple[str, int]:
    """(torch.cuda.get_device_name(0), total memory) asked in a child process: a CUDA context in this one
    would sit on the GPU beside the runs and be counted as theirs."""
    code = "import torch; p = torch.cuda.get_device_properties(0); print(p.total_memory, p.name)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    total, name = out.stdout.strip().splitlines()[-1].split(" ", 1)
    return name, int(total)


def _process_memory() -> dict[int, dict[int, int | None]] | None:
    """NVML index -> {pid: bytes that process uses on it (None: the driver does not say)}."""
    try:
        import pynvml

        pynvml.nvmlInit()
        out = {}
        for i in range(pynvml.nvmlDeviceGetCount()):
            procs = pynvml.nvmlDeviceGetComputeRunningProcesses(pynvml.nvmlDeviceGetHandleByIndex(i))
            out[i] = {int(p.pid): (int(p.usedGpuMemory) if p.usedGpuMemory else None) for p in procs}
        return out
    except Exception:  # noqa: BLE001  (no pynvml, or NVML refuses: try nvidia-smi)
        pass
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        gpus = subprocess.run([smi, "--query-gpu=index,uuid", "--format=csv,noheader,nounits"], capture_output=True,
                              text=True, timeout=30, check=True).stdout
        apps = subprocess.run([smi, "--query-compute-apps=pid,gpu_uuid,used_memory", "--format=csv,noheader,nounits"],
                              capture_output=True, text=True, timeout=30, check=True).stdout
    except (subprocess.SubprocessError, OSError):
        return None
    index = {u.strip(): int(i) for i, u in (ln.split(",") for ln in gpus.splitlines() if ln.strip())}
    out = {i: {} for i in index.values()}
    for line in apps.splitlines():
        pid, uuid, mib = (c.strip() for c in line.split(","))
        if uuid in index and pid.isdigit():
            out[index[uuid]][int(pid)] = int(float(mib) * 2**20) if re.fullmatch(r"[0-9.]+", mib) else None
    return out


@dataclass
class CardWatch:
    """The most memory NVML showed for the run's processes on the run's GPUs, sampled from outside."""

    gpus: tuple[int, ...]
    idle: dict[int, int] = field(default_factory=dict)  # device memory in use before the run
    process_peak: int | None = None  # max over samples and GPUs of the memory of that GPU's processes
    device_peak: int | None = None  # max over samples and GPUs of (device memory in use - idle)
    source: str | None = None
    samples: int = 0

    def start(self, snapshot) -> None:
        if snapshot is not None:
            self.idle = {g: snapshot.used.get(g, 0) for g in self.gpus}

    def add(self, snapshot) -> None:
        procs = _process_memory()
        if snapshot is None and procs is None:
            return
        self.samples += 1
        self.source = snapshot.source if snapshot is not None else "NVML per process"
        for g in self.gpus:
            if snapshot is not None and g in snapshot.used:
                used = snapshot.used[g] - self.idle.get(g, 0)
                self.device_peak = max(self.device_peak or 0, used)
            mine = {pid: v for pid, v in (procs or {}).get(g, {}).items() if pid != os.getpid()}
            if mine and all(v is not None for v in mine.values()):
                self.process_peak = max(self.process_peak or 0, sum(mine.values()))


def measured(recs: list[dict], tokens_per_step: int, watch: CardWatch | None, wall_s: float) -> dict:
    """One run's measurements from its metrics.jsonl records and the NVML watch (None where absent)."""
    steps = [r for r in recs if "loss" in r and r.get("tok_s")]
    last = max(r["step"] for r in steps)
    timed = [r for r in steps if r["step"] >= min(3, last)]  # the first steps pay allocator and cuDNN warm-up
    tps = statistics.median(r["tok_s"] for r in timed)
    compare = next((r for r in recs if r.get("event") == "plan_vs_measured"), None)
    peak = max((r.get("peak_mem_gb") or 0.0 for r in steps), default=0.0)
    alloc = (compare or {}).get("measured_max_memory_allocated") or (int(peak * GIB) if peak else None)
    process = watch.process_peak if watch else None
    device = watch.device_peak if watch else None
    return {"tokens_per_s": tps, "step_s": tokens_per_step / tps, "tokens_per_step": tokens_per_step,
            "steps_timed": [r["step"] for r in timed], "max_memory_allocated": alloc,
            "max_memory_reserved": (compare or {}).get("measured_max_memory_reserved"),
            "nvml_process_used": process if process is not None else device,
            "nvml_how": ("the run's processes (NVML per process)" if process is not None else
                         "device memory in use less the idle device before the run" if device is not None else None),
            "nvml_source": watch.source if watch else None, "nvml_samples": watch.samples if watch else 0,
            "wall_s": round(wall_s, 1)}


def _ratio(pred, meas) -> str:
    return "n/a" if not pred or not meas else f"{pred / meas:.2f}"


def _gib(n) -> str:
    return "n/a" if n is None else f"{n / GIB:.2f}"


def table(rows: list[dict], reserve_fraction: float) -> list[str]:
    """Predicted against measured, one line per row; ratios are predicted / measured."""
    out = ["| micro-batch | peak allocated, GiB: plan / measured (ratio) | reserved, GiB: plan / measured (ratio) "
           "| card total, GiB: plan / NVML (ratio) | tokens/s: plan [range] / measured (ratio) | step s measured |",
           "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        p, m = r["plan"], r["measured"]
        alloc = p["memory"]["peak_allocated"]
        reserved = int(alloc * (1 + reserve_fraction))
        total = p["memory"]["predicted_device_total"]
        tps, (lo, hi) = p["time"]["tokens_per_s"], p["time"]["tokens_per_s_range"]
        out.append(
            f"| {p['setting']['per_device_train_batch_size']} x {p['setting']['seq_len']} | {_gib(alloc)} / "
            f"{_gib(m['max_memory_allocated'])} ({_ratio(alloc, m['max_memory_allocated'])}) | {_gib(reserved)} / "
            f"{_gib(m['max_memory_reserved'])} ({_ratio(reserved, m['max_memory_reserved'])}) | {_gib(total)} / "
            f"{_gib(m['nvml_process_used'])} ({_ratio(total, m['nvml_process_used'])}) | {tps:,.0f} [{lo:,.0f}-{hi:,.0f}] / "
            f"{m['tokens_per_s']:,.0f} ({_ratio(tps, m['tokens_per_s'])}) | {m['step_s']:.3f} |")
    return out


def commit() -> str:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              timeout=30, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=30).stdout.strip()
        return head + ("-dirty" if dirty else "")
    return "unknown"


def results_file(gpu_name: str) -> Path:
    slug = re.sub(r"[^a-z0-9]+", "-", gpu_name.lower()).strip("-")
    return REPO / "benchmarks" / "results" / f"plan_calibration-{slug}.json"


def write_results(path: Path, rows: list[dict], *, dry: bool, gpu_name: str, profile: str, machine: str,
                  failed: list[dict]) -> Path:
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"tool": "benchmarks/gpu_check.py --calibrate", "date": time.strftime("%Y-%m-%d", time.gmtime()),
            "commit": commit(), "dry_run": dry, "gpu_name": gpu_name, "profile": profile, "machine": machine,
            "torch": torch.__version__, "cuda": torch.version.cuda, "rows": rows, "failed": failed}
    path.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    return path
