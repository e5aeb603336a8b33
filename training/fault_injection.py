"""Test hook, off unless GENESIS_TEST_FAULTS (or GENESIS_TEST_BATCH_LOG / GENESIS_TEST_PROBE) is set:
fault injection for the reliability tests. Real runs never set these; nothing here runs without them.

The loop calls four hooks (scale_loss, log_batch, after_step, probe); each is a no-op by default.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import time

logger = logging.getLogger("training.reliability")


class TestFaults:
    """Test-only fault injection, read from GENESIS_TEST_FAULTS (never set in real runs).

    Comma-separated `kind@step[:rank]` where step is the optimizer step being computed (1-based)
    and rank defaults to every rank:
        nan@3:1    loss x NaN on rank 1 at step 3   (poisons loss and gradients)
        inf@3      loss x inf on every rank
        spike@7    loss x 20 on every rank (a 20x spike)
        kill@4     SIGKILL every rank right after step 4 (and its save) completed
        killrecovered@9  the same, but only once the run has rolled back (spike_policy rollback)
        respike@9  loss x 20 at step 9 in every generation, rollbacks or not
    nan, inf and spike stand for bad data: they hit only before the run's first rollback (the
    rollback skips the data, so a replayed step no longer spikes).
        sleep@2    every rank sleeps after step 2, GENESIS_TEST_SLEEP_S seconds (default 3) or until the
                   file GENESIS_TEST_RELEASE exists: a test signals or kills the launcher meanwhile
    GENESIS_TEST_BATCH_LOG=<dir>: every rank appends {rank, step, micro, sha, windows} of each
    micro-batch to <dir>/rank-R.jsonl (windows: the loader's [source, epoch, offset] of each row), so
    a test can compare the tokens a run consumed.
    GENESIS_TEST_PROBE=<file>: at the end of training, every rank runs the live (possibly sharded)
    model on a fixed input and rank 0 saves its logits there (torch.save), so a test can compare
    an export of the last checkpoint with the model that trained.
    """

    ENV = "GENESIS_TEST_FAULTS"

    def __init__(self, rank: int):
        self.rank = rank
        self.batch_log = None
        if log_dir := os.environ.get("GENESIS_TEST_BATCH_LOG"):
            os.makedirs(log_dir, exist_ok=True)
            self.batch_log = open(os.path.join(log_dir, f"rank-{rank}.jsonl"), "a", encoding="utf-8")
        self.generation = 0  # rollbacks so far (set by the loop)
        self.faults: list[tuple[str, int, int | None]] = []
        for item in filter(None, (s.strip() for s in os.environ.get(self.ENV, "").split(","))):
            kind, _, where = item.partition("@")
            step, _, r = where.partition(":")
            self.faults.append((kind, int(step), int(r) if r else None))
        if self.faults:
            logger.warning("%s is set: injecting %s", self.ENV, self.faults)

    def _hit(self, kind: str, step: int) -> bool:
        return any(k == kind and s == step and r in (None, self.rank) for k, s, r in self.faults)

    def scale_loss(self, loss, step: int):
        for kind, factor in (("nan", float("nan")), ("inf", float("inf")), ("spike", 20.0)):
            if self.generation == 0 and self._hit(kind, step):
                loss = loss * factor
        if self._hit("respike", step):  # a spike in every generation: exhausts max_rollbacks
            loss = loss * 20.0
        return loss

    def log_batch(self, step: int, micro: int, batch, refs=()) -> None:
        if self.batch_log is not None:
            sha = hashlib.sha256(batch.numpy().tobytes()).hexdigest()[:16]
            record = {"rank": self.rank, "step": step, "micro": micro, "sha": sha, "windows": [list(r) for r in refs]}
            self.batch_log.write(json.dumps(record) + "\n")
            self.batch_log.flush()

    def probe(self, model, accelerator) -> None:
        path = os.environ.get("GENESIS_TEST_PROBE")
        if not path:
            return
        import torch  # not at the top: this module sets CUDA env vars before torch is imported

        vocab = accelerator.unwrap_model(model).config.vocab_size
        ids = (torch.arange(48, device=accelerator.device) * 7 % vocab)[None]  # (1, 48)
        was_training = model.training
        model.eval()
        with torch.no_grad():
            logits = model(input_ids=ids).logits  # every FSDP rank must take part in the forward
        model.train(was_training)
        if self.rank == 0:
            torch.save({"input_ids": ids.cpu(), "logits": logits.float().cpu()}, path)

    def after_step(self, step: int) -> None:
        if self._hit("kill", step) or (self.generation > 0 and self._hit("killrecovered", step)):
            os.kill(os.getpid(), signal.SIGKILL)
        if self._hit("sleep", step):
            deadline = time.monotonic() + float(os.environ.get("GENESIS_TEST_SLEEP_S", "3"))
            release = os.environ.get("GENESIS_TEST_RELEASE")
            while time.monotonic() < deadline and not (release and os.path.exists(release)):
                time.sleep(0.05)
