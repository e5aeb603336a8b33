"""benchmarks/_gpu_watch.py: the `gpu_check.py --ranks 2` verdict on GPU contexts, judged from
NVML samples (synthetic here: no GPU on CPU CI)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import _gpu_watch  # noqa: E402
from benchmarks._gpu_watch import GpuSnapshot, Watch, foreign_contexts, own_gpu  # noqa: E402

WORKERS = {101: 0, 202: 1}  # pid -> LOCAL_RANK


def test_each_rank_on_its_own_gpu_passes():
    assert foreign_contexts({0: {101}, 1: {202}}, WORKERS, ranks=2, visible="") == (
        True, ["each rank's pid is on its own GPU only"])


def test_rank_1_with_a_context_on_gpu_0_fails():
    # The async writer thread of rank 1 once made a CUDA context on GPU 0 (a new thread's device is 0).
    verdict, findings = foreign_contexts({0: {101, 202}, 1: {202}}, WORKERS, ranks=2, visible="")
    assert verdict is False and findings == ["rank 1 (pid 202) has a context on GPU 0, its own is GPU 1"]


def test_visible_devices_map_ranks_to_nvml_indices():
    assert own_gpu(0, "2,3") == 2 and own_gpu(1, "2,3") == 3 and own_gpu(1, "") == 1
    assert own_gpu(1, "GPU-uuid-a,GPU-uuid-b") == 1  # UUIDs: no index to map, the rank's ordinal
    assert foreign_contexts({2: {101}, 3: {202}}, WORKERS, ranks=2, visible="2,3")[0] is True
    assert foreign_contexts({2: {101}, 3: {202, 101}}, WORKERS, ranks=2, visible="2,3")[0] is False


def test_pids_of_another_namespace_are_judged_by_counts():
    # In a container NVML lists the host's pids: one process per GPU passes, two on one GPU fail.
    assert foreign_contexts({0: {9001}, 1: {9002}}, WORKERS, ranks=2, visible="")[0] is True
    verdict, findings = foreign_contexts({0: {9001, 9002}, 1: {9002}}, WORKERS, ranks=2, visible="")
    assert verdict is False and findings == ["GPU 0 had 2 compute processes ([9001, 9002]); one rank owns it"]
    assert foreign_contexts({0: {9001}, 1: set()}, WORKERS, ranks=2, visible="")[0] is None


def test_no_samples_is_never_a_pass():
    assert foreign_contexts({}, WORKERS, ranks=2) == (
        None, ["no NVML samples (neither pynvml nor nvidia-smi): not checked"])


def test_watch_keeps_peaks_and_every_pid_seen():
    watch = Watch()
    watch.add(GpuSnapshot({0: 5, 1: 7}, {0: {101}, 1: set()}, "nvidia-smi"), {101: 0})
    watch.add(GpuSnapshot({0: 3, 1: 9}, {0: {101}, 1: {202}}, "nvidia-smi"), {202: 1})
    watch.add(None, {})
    assert watch.peak_used == {0: 5, 1: 9} and watch.pids == {0: {101}, 1: {202}}
    assert watch.workers == WORKERS and watch.samples == 2 and watch.source == "nvidia-smi"


def test_nvidia_smi_fallback_parses_its_csv(monkeypatch):
    answers = {"--query-gpu=index,uuid,memory.used": "0, GPU-aaa, 20480\n1, GPU-bbb, 512\n",
               "--query-compute-apps=pid,gpu_uuid": "101, GPU-aaa\n202, GPU-bbb\n202, GPU-aaa\n"}

    def run(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 0, answers[cmd[1]], "")

    monkeypatch.setattr(_gpu_watch.shutil, "which", lambda name: "/usr/bin/nvidia-smi")
    monkeypatch.setattr(_gpu_watch.subprocess, "run", run)
    snap = _gpu_watch._smi_snapshot()
    assert snap == GpuSnapshot({0: 20 * 2**30, 1: 512 * 2**20}, {0: {101, 202}, 1: {202}}, "nvidia-smi")
    assert foreign_contexts(snap.pids, WORKERS, ranks=2, visible="")[0] is False
    monkeypatch.setattr(_gpu_watch.shutil, "which", lambda name: None)
    assert _gpu_watch._smi_snapshot() is None
