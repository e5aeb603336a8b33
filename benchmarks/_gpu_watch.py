"""What `gpu_check.py --ranks 2` watches from outside the run: the worker processes, each GPU's
memory and the processes that hold a context on it (NVML), sampled while pretrain.py trains.

NVML comes from `pynvml` (the nvidia-ml-py package; torch's own `torch.cuda.device_memory_used`
needs it too, and a CUDA wheel of torch does not install it), else from `nvidia-smi`, which ships
with the driver. With neither, the report says "not checked"; it never says "pass".
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass, field


@dataclass
class GpuSnapshot:
    used: dict[int, int]  # NVML index -> bytes in use on the device (every process, and the driver's)
    pids: dict[int, set[int]]  # NVML index -> pids with a compute context on it
    source: str  # "pynvml" or "nvidia-smi"


def _pynvml_snapshot() -> GpuSnapshot | None:
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        used, pids = {}, {}
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            used[i] = int(pynvml.nvmlDeviceGetMemoryInfo(handle).used)
            pids[i] = {int(p.pid) for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle)}
        return GpuSnapshot(used, pids, "pynvml")
    except pynvml.NVMLError:
        return None


def _smi_snapshot() -> GpuSnapshot | None:
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None

    def query(*args: str) -> list[list[str]]:
        out = subprocess.run([smi, *args, "--format=csv,noheader,nounits"], capture_output=True, text=True,
                             timeout=30, check=True).stdout
        return [[c.strip() for c in line.split(",")] for line in out.splitlines() if line.strip()]

    try:
        gpus = query("--query-gpu=index,uuid,memory.used")  # memory in MiB
        apps = query("--query-compute-apps=pid,gpu_uuid")
    except (subprocess.SubprocessError, OSError):
        return None
    index = {uuid: int(i) for i, uuid, _ in gpus}
    used = {int(i): int(float(mib) * 2**20) for i, _, mib in gpus}
    pids: dict[int, set[int]] = {i: set() for i in used}
    for pid, uuid in apps:
        if uuid in index and pid.isdigit():
            pids[index[uuid]].add(int(pid))
    return GpuSnapshot(used, pids, "nvidia-smi")


def gpu_snapshot() -> GpuSnapshot | None:
    """Every GPU's memory in use and compute pids, or None when neither NVML route exists."""
    return _pynvml_snapshot() or _smi_snapshot()


def worker_pids(launcher_pid: int) -> dict[int, int]:
    """pid -> LOCAL_RANK of every process under `launcher_pid` that torchrun started as a rank."""
    import psutil

    out = {}
    try:
        children = psutil.Process(launcher_pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return out
    for child in children:
        try:
            rank = child.environ().get("LOCAL_RANK")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if rank is not None and rank.isdigit():
            out[child.pid] = int(rank)
    return out


def own_gpu(local_rank: int, visible: str | None = None) -> int:
    """The NVML index of a rank's GPU: accelerate puts LOCAL_RANK on cuda:LOCAL_RANK, which is the
    LOCAL_RANK-th entry of CUDA_VISIBLE_DEVICES when that lists indices."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES") if visible is None else visible
    entries = [v.strip() for v in (visible or "").split(",") if v.strip()]
    if entries and all(v.isdigit() for v in entries) and local_rank < len(entries):
        return int(entries[local_rank])
    return local_rank


@dataclass
class Watch:
    """What the samples showed over the whole run."""

    peak_used: dict[int, int] = field(default_factory=dict)
    pids: dict[int, set[int]] = field(default_factory=dict)  # every pid seen on each GPU
    workers: dict[int, int] = field(default_factory=dict)  # pid -> local rank
    source: str | None = None
    samples: int = 0

    def add(self, snap: GpuSnapshot | None, workers: dict[int, int]) -> None:
        self.workers |= workers
        if snap is None:
            return
        self.source, self.samples = snap.source, self.samples + 1
        for gpu, used in snap.used.items():
            self.peak_used[gpu] = max(self.peak_used.get(gpu, 0), used)
        for gpu, pids in snap.pids.items():
            self.pids.setdefault(gpu, set()).update(pids)


def foreign_contexts(pids_by_gpu: dict[int, set[int]], workers: dict[int, int], ranks: int,
                     visible: str | None = None) -> tuple[bool | None, list[str]]:
    """(verdict, findings) for "each worker holds a context on its own GPU only".

    True: every worker pid was seen, each only on its own GPU. False: some worker was seen on
    another rank's GPU, or (pids from another pid namespace, as in a container) some GPU showed
    more compute processes than the one rank that owns it. None: nothing to judge by."""
    if not pids_by_gpu:
        return None, ["no NVML samples (neither pynvml nor nvidia-smi): not checked"]
    findings = []
    seen = {pid for pids in pids_by_gpu.values() for pid in pids}
    if workers and set(workers) <= seen:
        for pid, rank in sorted(workers.items(), key=lambda kv: kv[1]):
            mine = own_gpu(rank, visible)
            for gpu in sorted(g for g, pids in pids_by_gpu.items() if pid in pids and g != mine):
                findings.append(f"rank {rank} (pid {pid}) has a context on GPU {gpu}, its own is GPU {mine}")
        return not findings, findings or ["each rank's pid is on its own GPU only"]
    # NVML reports the host's pids when we run in a container: judge by counts instead.
    for gpu, pids in sorted(pids_by_gpu.items()):
        if len(pids) > 1:
            findings.append(f"GPU {gpu} had {len(pids)} compute processes ({sorted(pids)}); one rank owns it")
    if findings:
        return False, findings
    busy = sum(1 for pids in pids_by_gpu.values() if pids)
    if busy < ranks:
        return None, [f"worker pids not in the NVML listing and only {busy} GPU(s) showed a process: not checked"]
    return True, ["worker pids not in NVML's listing (another pid namespace): one compute process per GPU"]
