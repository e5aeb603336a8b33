"""Sharded, atomic, verified training checkpoints (see docs/checkpoints.md).

    path = save_checkpoint(out / "checkpoints", step, model=model, optimizer=opt, scheduler=sched,
                           train_state={"step": step, "tokens_seen": n}, data_state=loader.state_dict(),
                           meta=run_meta)                       # on EVERY rank
    ckpt = resolve_resume("auto", out / "checkpoints")        # None -> fresh start
    check_resume_compatible(read_meta(ckpt), run_meta, overrides)
    state = load_checkpoint(ckpt, model=model, optimizer=opt, scheduler=sched)   # on EVERY rank
    loader.load_state_dict(state["data_state"])

`model` may be a plain module, DDP or an FSDP2 (`fully_shard`) module; `optimizer` may be
Accelerate's AcceleratedOptimizer (its `.optimizer` is used) and `scheduler` an
AcceleratedScheduler (its `.scheduler` is used).
"""

from ._runtime import WATCHDOG_EXIT_CODE, CheckpointError
from .core import RESUME_FIELDS, save_checkpoint
from .layout import latest_checkpoint, read_meta, resolve_resume
from .loading import check_resume_compatible, format_audit, load_checkpoint, load_model_weights

__all__ = [
    "CheckpointError",
    "RESUME_FIELDS",
    "WATCHDOG_EXIT_CODE",
    "check_resume_compatible",
    "format_audit",
    "latest_checkpoint",
    "load_checkpoint",
    "load_model_weights",
    "read_meta",
    "resolve_resume",
    "save_checkpoint",
]
