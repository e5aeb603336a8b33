"""Run a test function in N gloo processes on CPU, with a hard timeout.

    results = run_ranks("test_checkpoint_distributed:train_and_save", 2, kwargs={"root": str(tmp)})
    assert all(r.returncode == 0 for r in results), results[0].stderr

The target is "module:function" importable from tests/ (this file's folder is on the child's path);
it is called as fn(rank, world_size, **kwargs) after `init_process_group("gloo")`, and its return
value (JSON) comes back in RankResult.value. Each rank is a fresh `python` process in its own
session, so a hung test is killed (the whole process group) instead of hanging CI, and tests can
SIGKILL a rank or check its exit code. OMP_NUM_THREADS=1 keeps 2 ranks from fighting over 2 cores.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


@dataclasses.dataclass
class RankResult:
    rank: int
    returncode: int | None
    stdout: str
    stderr: str
    value: object = None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Ranks:
    """N started rank processes (see start_ranks)."""

    def __init__(self, procs: list[subprocess.Popen], result_dir: Path):
        self.procs, self.result_dir = procs, result_dir

    def kill(self, sig: int = signal.SIGKILL) -> None:
        for p in self.procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, sig)
                except ProcessLookupError:
                    pass

    def wait(self, timeout: float) -> list[RankResult]:
        deadline = time.monotonic() + timeout
        outs = []
        timed_out = False
        for p in self.procs:
            try:
                out, err = p.communicate(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                timed_out = True
                self.kill()
                out, err = p.communicate()
            outs.append((p.returncode, out, err))
        if timed_out:
            tails = "\n".join(f"--- rank {r} stderr ---\n{e[-3000:]}" for r, (_, _, e) in enumerate(outs))
            raise TimeoutError(f"distributed test exceeded {timeout:.0f} s and was killed\n{tails}")
        results = []
        for rank, (rc, out, err) in enumerate(outs):
            f = self.result_dir / f"rank-{rank}.json"
            value = json.loads(f.read_text()) if f.exists() else None
            results.append(RankResult(rank, rc, out, err, value))
        return results


def start_ranks(
    target: str,
    world_size: int,
    *,
    kwargs: dict | None = None,
    env: dict | None = None,
    result_dir: str | Path,
) -> Ranks:
    result_dir = Path(result_dir)
    result_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    base = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "WORLD_SIZE": str(world_size),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "WANDB_MODE": "offline",
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        **(env or {}),
    }
    procs = []
    for rank in range(world_size):
        cmd = [sys.executable, str(Path(__file__)), target, json.dumps(kwargs or {}), str(result_dir)]
        procs.append(
            subprocess.Popen(
                cmd,
                env={**base, "RANK": str(rank), "LOCAL_RANK": str(rank)},
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                start_new_session=True,  # own process group: kill() takes its children too
            )
        )
    return Ranks(procs, result_dir)


def run_ranks(
    target: str,
    world_size: int,
    *,
    kwargs: dict | None = None,
    env: dict | None = None,
    result_dir: str | Path,
    timeout: float = 120.0,
) -> list[RankResult]:
    """Start the ranks and wait for all of them; TimeoutError (after killing them) past `timeout`."""
    return start_ranks(target, world_size, kwargs=kwargs, env=env, result_dir=result_dir).wait(timeout)


def _child(target: str, kwargs_json: str, result_dir: str) -> None:
    import logging

    import torch.distributed as dist

    logging.basicConfig(level=logging.INFO, format=f"[rank {os.environ['RANK']}] %(levelname)s %(message)s")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    module, _, name = target.partition(":")
    fn = getattr(importlib.import_module(module), name)
    value = fn(rank, world, **json.loads(kwargs_json))
    Path(result_dir, f"rank-{rank}.json").write_text(json.dumps(value))
    dist.destroy_process_group()


if __name__ == "__main__":
    _child(*sys.argv[1:4])
