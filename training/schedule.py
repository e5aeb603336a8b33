"""The learning-rate schedule: a pure function of the optimizer step.

`step` counts optimizer steps already taken, so `lr(0)` is the LR of the first update.

cosine (the seed):  linear warmup 0 -> max_lr over warmup_steps, then a half cosine from
                    max_lr down to min_lr, reached at step max_steps.
wsd:                linear warmup, max_lr held ("stable"), then a linear decay to min_lr over
                    the last decay_ratio x max_steps steps.

Extending a run (the seed went 20k -> 40k) is a resume with a larger max_steps. THE RULE:
  * while the run is still in a phase whose LR does not depend on max_steps (warmup, or
    wsd's stable phase) the schedule is simply the same schedule with the new max_steps;
  * otherwise the decay is re-laid from the resume step k to the new max_steps, starting at
    the LR the run would have used at step k (`extension_lr` to choose another start, a
    deliberate re-warm) and ending at the same floor, with the same shape (cosine or linear).
Why: the LR stays continuous (no silent jump that a stretched cosine would cause: at 20k of
20k the old cosine is at the floor, at 20k of 40k it would be back at mid-range), it is
monotone, it lands on the floor exactly at the new end, and the first step after the resume
uses the LR the straight run would have used. A finished run extended this way continues
at its floor unless `extension_lr` says otherwise. Only the latest anchor is kept: the
schedule describes the run from its last extension onwards.

    genesis lr --config training/recipes/genesis-1b.yaml --plot lr.png
    genesis lr --config training/recipes/genesis-1b.yaml --max-steps 20000 --extend-at 20000 --extend-to 40000
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
from dataclasses import dataclass

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LRSchedule:
    max_lr: float
    min_lr: float
    warmup_steps: int
    max_steps: int
    kind: str = "cosine"  # "cosine" | "wsd"
    decay_ratio: float = 0.2  # wsd only
    anchor_step: int | None = None  # set by an extension: the decay restarts here ...
    anchor_lr: float | None = None  # ... from this LR

    def __post_init__(self):
        if self.kind not in ("cosine", "wsd"):
            raise ValueError(f"lr_scheduler_type must be 'cosine' or 'wsd', got {self.kind!r}")
        if self.max_steps <= 0 or self.warmup_steps < 0:
            raise ValueError(f"need max_steps > 0 and warmup_steps >= 0, got {self.max_steps}, {self.warmup_steps}")

    @property
    def decay_start(self) -> int:
        """First step whose LR depends on max_steps."""
        if self.kind == "wsd":
            return max(self.warmup_steps, self.max_steps - round(self.decay_ratio * self.max_steps))
        return self.warmup_steps

    def _decay(self, frac: float, start_lr: float) -> float:
        frac = min(max(frac, 0.0), 1.0)
        if self.kind == "cosine":
            return self.min_lr + 0.5 * (start_lr - self.min_lr) * (1.0 + math.cos(math.pi * frac))
        return start_lr + (self.min_lr - start_lr) * frac

    def lr(self, step: int) -> float:
        if self.anchor_step is not None and step >= self.anchor_step:
            span = max(self.max_steps - self.anchor_step, 1)
            return self._decay((step - self.anchor_step) / span, self.anchor_lr)
        if step < self.warmup_steps:
            return self.max_lr * (step + 1) / self.warmup_steps
        start = self.decay_start
        if step < start:  # wsd stable phase
            return self.max_lr
        return self._decay((step - start) / max(self.max_steps - start, 1), self.max_lr)

    def extended(self, at_step: int, new_max_steps: int, start_lr: float | None = None) -> LRSchedule:
        """The schedule after resuming at `at_step` with a larger max_steps (the rule above)."""
        if new_max_steps <= self.max_steps:
            raise ValueError(f"an extension needs max_steps > {self.max_steps}, got {new_max_steps}")
        stretched = dataclasses.replace(self, max_steps=new_max_steps)
        if start_lr is None and self.anchor_step is None and at_step < stretched.decay_start:
            return stretched  # nothing has decayed yet: no discontinuity to avoid
        lr0 = self.lr(at_step) if start_lr is None else float(start_lr)
        return dataclasses.replace(stretched, anchor_step=at_step, anchor_lr=lr0)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> LRSchedule:
        return cls(**d)

    @classmethod
    def from_args(cls, args) -> LRSchedule:
        return cls(
            max_lr=args.learning_rate, min_lr=args.min_lr, warmup_steps=args.warmup_steps,
            max_steps=args.max_steps, kind=args.lr_scheduler_type, decay_ratio=args.decay_ratio,
        )


def lr_at(step: int, *, max_lr: float, min_lr: float, warmup_steps: int, max_steps: int,
          kind: str = "cosine", decay_ratio: float = 0.2) -> float:
    """Functional form of LRSchedule(...).lr(step)."""
    return LRSchedule(max_lr, min_lr, warmup_steps, max_steps, kind, decay_ratio).lr(step)


def make_scheduler(optimizer, schedule: LRSchedule):
    """A LambdaLR whose multiplier is schedule.lr(step) / max_lr (the optimizer's lr is max_lr).

    The lambda is a closure, not an object, so LambdaLR.state_dict holds only the step count
    and the schedule itself travels in the train state, where an extension can change it.
    """
    import torch

    for group in optimizer.param_groups:
        group["lr"] = schedule.max_lr
        group["initial_lr"] = schedule.max_lr
    holder = {"schedule": schedule}

    def multiplier(step: int) -> float:
        s = holder["schedule"]
        return s.lr(step) / s.max_lr if s.max_lr > 0 else 0.0

    # The holder rides on the function, not the scheduler: LambdaLR.state_dict saves the
    # scheduler's __dict__ (it must stay plain data) but nothing of a plain function.
    multiplier.holder = holder
    return torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)


def set_schedule(scheduler, schedule: LRSchedule, step: int) -> None:
    """Swap the schedule of a make_scheduler() LambdaLR and set the LR for `step`."""
    scheduler.lr_lambdas[0].holder["schedule"] = schedule
    scheduler.base_lrs = [schedule.max_lr for _ in scheduler.base_lrs]
    lr = schedule.lr(step)
    for group in scheduler.optimizer.param_groups:
        group["lr"] = lr
    scheduler._last_lr = [lr for _ in scheduler.optimizer.param_groups]


def key_steps(s: LRSchedule) -> list[int]:
    pts = {0, max(s.warmup_steps - 1, 0), s.warmup_steps, s.decay_start, s.max_steps - 1, s.max_steps}
    pts |= {round(s.max_steps * f) for f in (0.25, 0.5, 0.75)}
    if s.anchor_step is not None:
        pts |= {s.anchor_step - 1, s.anchor_step, s.anchor_step + 1}
    return sorted(p for p in pts if 0 <= p <= s.max_steps)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="genesis lr", description="Print (and plot) a recipe's LR curve before launch.")
    p.add_argument("--config", required=True, help="pretraining recipe YAML")
    p.add_argument("--max-steps", type=int, default=None, help="override the recipe's max_steps")
    p.add_argument("--extend-at", type=int, default=None, help="preview resuming at this step ...")
    p.add_argument("--extend-to", type=int, default=None, help="... with this larger max_steps")
    p.add_argument("--extension-lr", type=float, default=None, help="start LR of the re-laid decay")
    p.add_argument("--plot", default=None, help="write the curve to this PNG (matplotlib)")
    return p


def main(args: argparse.Namespace) -> int:
    from training.args import PretrainArguments, load_recipe

    recipe = load_recipe(args.config)
    base = LRSchedule.from_args(dataclasses.replace(PretrainArguments(), **recipe))
    if args.max_steps is not None:
        base = dataclasses.replace(base, max_steps=args.max_steps)
    sched = base
    if (args.extend_at is None) != (args.extend_to is None):
        raise ValueError("--extend-at and --extend-to go together")
    if args.extend_at is not None:
        sched = base.extended(args.extend_at, args.extend_to, args.extension_lr)
    print(f"{args.config}: {sched.kind}, max_lr {sched.max_lr:.3e}, min_lr {sched.min_lr:.3e}, "
          f"warmup {sched.warmup_steps}, max_steps {sched.max_steps}"
          + (f", re-laid from step {sched.anchor_step} at {sched.anchor_lr:.4e}" if sched.anchor_step is not None else ""))
    print(f"{'step':>10}  {'lr':>12}")
    for step in key_steps(sched):
        lr = base.lr(step) if sched.anchor_step is not None and step < sched.anchor_step else sched.lr(step)
        print(f"{step:>10,}  {lr:>12.4e}")
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        n = sched.max_steps
        xs = list(range(0, n + 1, max(n // 2000, 1)))
        ys = [base.lr(x) if sched.anchor_step is not None and x < sched.anchor_step else sched.lr(x) for x in xs]
        fig, ax = plt.subplots(figsize=(7, 3.5))
        ax.plot(xs, ys)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("learning rate")
        ax.set_title(f"{args.config} ({sched.kind})")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
        plt.close(fig)
        print(f"wrote {args.plot}")
    return 0


def cli_main(argv: list[str]) -> int:
    from training.args import ConfigError

    try:
        return main(build_parser().parse_args(argv))
    except (ConfigError, ValueError) as e:
        print(f"genesis lr: {e}")
        return 2
