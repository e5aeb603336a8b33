"""Checkpoints to the Hub while pretraining (issue 13): the interface training/pretrain.py calls.

    hub = HubSync.from_args(args, is_main=accelerator.is_main_process)  # refuses bad flags at start
    ...
    hub.submit(checkpoint_dir, step, summary)   # after a checkpoint COMMITTED; never blocks
    for record in hub.events(): metrics.log(record)
    hub.close(timeout_s)                        # at exit: waits (bounded), names what remained
"""

from __future__ import annotations

from pathlib import Path


class HubSync:
    """Uploads each committed checkpoint's export in a background thread (rank 0 only)."""

    @classmethod
    def from_args(cls, args, *, is_main: bool) -> HubSync | None:
        if not getattr(args, "push_to_hub", False):
            return None
        raise NotImplementedError("push_to_hub is not implemented yet")

    def submit(self, checkpoint: Path, step: int, summary: dict) -> None:
        raise NotImplementedError

    def events(self) -> list[dict]:
        raise NotImplementedError

    def close(self, timeout_s: float) -> list[str]:
        raise NotImplementedError
