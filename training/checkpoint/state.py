"""Small replicated or per-rank state: RNG, scheduler, and unwrapping Accelerate objects.

Everything here is JSON (RNG byte states as base64), so loading never unpickles anything; the one
fallback, a scheduler whose state_dict is not JSON-able, is torch-saved and loaded with
`weights_only=True`.
"""

from __future__ import annotations

import base64
import io
import json
import random
from pathlib import Path
from typing import Any

import torch

from ._runtime import CheckpointError
from .layout import read_json, write_bytes_durable

try:  # numpy is a dependency, but the RNG capture should not be the thing that needs it
    import numpy as np
except ImportError:  # pragma: no cover
    np = None


def unwrap_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """Accelerate's AcceleratedOptimizer keeps the real optimizer in `.optimizer`."""
    inner = optimizer
    # AcceleratedOptimizer subclasses Optimizer, so unwrap by attribute, not by type.
    while isinstance(getattr(inner, "optimizer", None), torch.optim.Optimizer):
        inner = inner.optimizer
    if not isinstance(inner, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer (or wrap one), got {type(optimizer)}")
    return inner


def unwrap_scheduler(scheduler: Any) -> Any:
    """Accelerate's AcceleratedScheduler keeps the real scheduler in `.scheduler`."""
    inner = scheduler
    while hasattr(inner, "scheduler") and hasattr(inner.scheduler, "state_dict"):
        inner = inner.scheduler
    if not (hasattr(inner, "state_dict") and hasattr(inner, "load_state_dict")):
        raise TypeError(f"scheduler must have state_dict/load_state_dict, got {type(scheduler)}")
    return inner


# ------------------------------------------------------------------ RNG


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode()


def _unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8).clone()


def capture_rng() -> dict:
    """Generator states of this process: python, numpy, torch CPU, and the current CUDA device only
    (get_rng_state_all would create a context on every visible GPU from every rank)."""
    version, state, gauss = random.getstate()
    out: dict[str, Any] = {"python": [version, list(state), gauss], "torch_cpu": _b64(torch.get_rng_state())}
    if np is not None:
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        out["numpy"] = [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)]
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        dev = torch.cuda.current_device()
        out["cuda"] = {"device": dev, "state": _b64(torch.cuda.get_rng_state(dev))}
    return out


def restore_rng(state: dict, where: str) -> list[str]:
    """Restore what capture_rng saved; returns the generators restored. Raises naming `where`."""
    try:
        version, keys, gauss = state["python"]
        random.setstate((version, tuple(keys), gauss))
        torch.set_rng_state(_unb64(state["torch_cpu"]))
        done = ["python", "torch_cpu"]
        if "numpy" in state:
            if np is None:
                raise CheckpointError(f"RNG state in {where} has a numpy state but numpy is not installed")
            kind, keys, pos, has_gauss, cached = state["numpy"]
            np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
            done.append("numpy")
        if "cuda" in state:
            if not torch.cuda.is_available():
                raise CheckpointError(f"RNG state in {where} has a CUDA state but CUDA is not available")
            torch.cuda.set_rng_state(_unb64(state["cuda"]["state"]), torch.cuda.current_device())
            done.append("cuda")
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"RNG state in {where} is malformed: {type(e).__name__}: {e}") from e
    return done


# ------------------------------------------------------------------ scheduler


def scheduler_file(scheduler: Any) -> tuple[str, bytes]:
    """(file name, bytes) of the scheduler's state now: scheduler.json when the state is JSON-able
    (every torch LRScheduler we use), else scheduler.pt."""
    state = unwrap_scheduler(scheduler).state_dict()
    try:
        return "scheduler.json", json.dumps(state, sort_keys=True).encode()
    except (TypeError, ValueError):
        buf = io.BytesIO()
        torch.save(state, buf)
        return "scheduler.pt", buf.getvalue()


def save_scheduler(folder: Path, scheduler: Any) -> str:
    name, data = scheduler_file(scheduler)
    write_bytes_durable(folder / name, data)
    return name


def load_scheduler(ckpt: Path, manifest_files: dict, scheduler: Any) -> dict:
    inner = unwrap_scheduler(scheduler)
    if "scheduler.json" in manifest_files:
        state = read_json(ckpt / "scheduler.json", "scheduler", ckpt)
    elif "scheduler.pt" in manifest_files:
        try:
            state = torch.load(ckpt / "scheduler.pt", weights_only=True)
        except Exception as e:
            raise CheckpointError(f"scheduler state in {ckpt} is unreadable: {e}") from e
    else:
        raise CheckpointError(f"scheduler state missing from {ckpt}")
    try:
        inner.load_state_dict(state)
    except Exception as e:
        raise CheckpointError(
            f"scheduler state in {ckpt} does not fit the scheduler {type(inner).__name__}: {e}"
        ) from e
    return state
