"""Helpers for the pretraining tests: run the REAL script in subprocesses, read what it wrote.

    res = run_pretrain(out, data, "--max_steps", "8")          # accelerate launch, 2 gloo ranks
    res = run_pretrain(out, data, nproc=1)                      # plain python, one process
    losses = {s: r["loss"] for s, r in read_metrics(out).items()}
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from training.metrics import is_side_record

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "training" / "pretrain.py"
CPU_CONFIG = REPO / "accelerate_configs" / "cpu.yaml"
DEBUG_RECIPE = REPO / "training" / "recipes" / "debug.yaml"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(out: Path, data: tuple[Path, Path], *args: str, nproc: int = 2, config: Path = CPU_CONFIG) -> list[str]:
    tok_dir, data_dir = data
    common = ["--config", str(DEBUG_RECIPE), "--output_dir", str(out), "--tokenizer_dir", str(tok_dir),
              "--data_dir", str(data_dir), "--no_progress_bar", "--eval_steps", "0", *args]
    # The recipe's embedded_data would rebuild data elsewhere; point at the session's copy instead.
    common += ["--embedded_data", "", "--mixture", "training/mixtures/embedded.yaml"]
    if nproc == 1:
        return [sys.executable, str(SCRIPT), *common]
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
            "--num_processes", str(nproc), "--main_process_port", str(free_port()), str(SCRIPT), *common]


def _env(extra: dict | None) -> dict:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    env.pop("GENESIS_TEST_FAULTS", None)
    env.update(extra or {})
    return env


def kill_tree(pid: int) -> None:
    """SIGKILL a process and every descendant. torchrun starts each rank in its own session,
    so killing the launcher's process group would leave the ranks running."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=30)


def run_pretrain(out: Path, data, *args: str, nproc: int = 2, env: dict | None = None,
                 timeout: float = 240, config: Path = CPU_CONFIG) -> subprocess.CompletedProcess:
    """Run to completion (or failure). A hung run is killed (whole tree) and fails the test.
    Output goes through files, not pipes: a stray rank holding a pipe cannot block the test."""
    Path(out).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryFile("w+") as fo, tempfile.TemporaryFile("w+") as fe:
        proc = subprocess.Popen(command(out, data, *args, nproc=nproc, config=config), cwd=REPO, env=_env(env),
                                text=True,
                                stdout=fo, stderr=fe)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_tree(proc.pid)
            fe.seek(0)
            raise AssertionError(f"pretrain hung for {timeout}s\n{fe.read()[-4000:]}") from None
        fo.seek(0)
        fe.seek(0)
        return subprocess.CompletedProcess(proc.args, proc.returncode, fo.read(), fe.read())


def start_pretrain(out: Path, data, *args: str, nproc: int = 2, env: dict | None = None,
                   config: Path = CPU_CONFIG) -> subprocess.Popen:
    return subprocess.Popen(command(out, data, *args, nproc=nproc, config=config), cwd=REPO, env=_env(env),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"run ended (rc {proc.returncode}) before {path} appeared")
        if time.monotonic() > deadline:
            kill_tree(proc.pid)
            raise AssertionError(f"{path} did not appear within {timeout}s")
        time.sleep(0.1)


def wait_for_step(out: Path, proc: subprocess.Popen, step: int, timeout: float = 240) -> None:
    """Until metrics.jsonl has a record of `step` (or later); a run that ends or hangs first fails."""
    deadline = time.monotonic() + timeout
    while not (read_metrics(out) and max(read_metrics(out)) >= step):
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (rc {proc.returncode}) before step {step}")
        if time.monotonic() > deadline:
            kill_tree(proc.pid)
            raise AssertionError(f"step {step} not reached within {timeout}s")
        time.sleep(0.1)


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the launcher and every rank (nothing gets to clean up)."""
    kill_tree(proc.pid)
    proc.wait(timeout=30)


def read_metrics(out: Path) -> dict[int, dict]:
    """The LAST record of every step: a killed run's steps after its checkpoint are replayed
    by the resumed one, and the replay is what the run's history is."""
    records = {}
    path = Path(out) / "metrics.jsonl"
    if path.exists():
        for line in path.read_text().splitlines():
            r = json.loads(line)
            if is_side_record(r):  # checkpoint saves, hub uploads, the save plan
                continue
            records[r["step"]] = r
    return records


def ok(res: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert res.returncode == 0, f"rc {res.returncode}\n--- stderr ---\n{res.stderr[-6000:]}"
    return res


def checkpoint_tensors(ckpt: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint's model and optimizer (DCP) as one flat dict, single process."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    flat = {}
    for part in ("model", "optimizer"):
        dst = ckpt.parent.parent / f"_{ckpt.name}_{part}.pt"
        dcp_to_torch_save(ckpt / part, dst)
        _flatten(torch.load(dst, weights_only=True), part, flat)
        dst.unlink()
    return flat


def _flatten(obj, prefix: str, out: dict) -> None:
    if isinstance(obj, dict):
        for k, v in obj.items():
            _flatten(v, f"{prefix}.{k}", out)
    elif isinstance(obj, torch.Tensor):
        out[prefix] = obj
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _flatten(v, f"{prefix}.{i}", out)
    else:
        out[prefix] = torch.tensor(obj) if isinstance(obj, (int, float)) else obj


def assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))[:10]
    assert any("exp_avg_sq" in k for k in a), "no AdamW second moments found in the checkpoint"
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert torch.equal(a[k], b[k]), f"{k} differs"
        else:
            assert a[k] == b[k], f"{k}: {a[k]!r} != {b[k]!r}"
