"""`genesis plan --fit`: the fastest setting predicted to fit, as flags to paste after pretrain.py.

Searched, for the given card and count: the micro-batch (the recipe's tokens per optimizer step kept
through gradient accumulation), activation checkpointing (every layer, every other layer, none),
`reshard_after_forward`, and the save mode (async needs the host staging; the GPU side is the same).
A setting fits when its predicted device total leaves `margin` of the card free.

Memory only grows with the micro-batch, with less checkpointing and without resharding, so the
search stops growing a branch at its first setting that does not fit.
"""

from __future__ import annotations

from dataclasses import replace

from training.plan.predict import gib
from training.plan.trace import Setting

MICRO_BATCHES = (1, 2, 4, 8)
AC = ("full", "alternate", "none")


def _flags(s: Setting, base: Setting) -> str:
    out = [f"--per_device_train_batch_size {s.micro_batch}", f"--gradient_accumulation_steps {s.grad_accum}"]
    if s.activation_checkpointing != base.activation_checkpointing:
        # TrainingArguments (transformers 5) calls it activation_checkpointing; pretrain.py gradient_checkpointing
        name = "gradient_checkpointing" if s.workload == "pretrain" else "activation_checkpointing"
        out.append(f"--{name} {s.activation_checkpointing != 'none'}")
        if s.activation_checkpointing == "alternate" and s.workload != "pretrain" and not s.fsdp:
            out.append("--activation_checkpointing_kwargs '{\"every_n_layers\": 2}'")  # transformers 5
    if s.save_mode != base.save_mode:
        out.append(f"--save_mode {s.save_mode}")
    return " ".join(out)


def _hardware_note(s: Setting, base: Setting) -> str:
    notes = []
    if not base.fsdp:  # one process: the script's flags say it all
        return ""
    if s.activation_checkpointing != base.activation_checkpointing:
        notes.append(f"accelerate config: fsdp_activation_checkpointing: {s.activation_checkpointing != 'none'}"
                     + (" (every other layer: not an Accelerate option yet)" if s.activation_checkpointing == "alternate" else ""))
    if s.reshard_after_forward != base.reshard_after_forward:
        notes.append(f"accelerate config: fsdp_reshard_after_forward: {str(s.reshard_after_forward).lower()}")
    return "; ".join(notes)


def fit(config, base: Setting, prof, *, num_machines: int = 1, margin: float = 0.05, host_gib: float | None = None) -> dict:
    from training.plan.cli import plan

    tokens = base.micro_batch * base.grad_accum  # sequences per rank per optimizer step
    budget = prof.vram_bytes * (1 - margin)
    tried = []
    smallest = None
    reshards = (True, False) if base.fsdp and base.world_size > 1 else (base.reshard_after_forward,)
    for ac in AC:
        for reshard in reshards:
            for mb in MICRO_BATCHES:
                if tokens % mb:
                    continue
                s = replace(base, micro_batch=mb, grad_accum=tokens // mb, activation_checkpointing=ac,
                            reshard_after_forward=reshard)
                p = plan(config, s, prof, num_machines=num_machines)
                total = p.memory["predicted_device_total"]
                if smallest is None or total < smallest.memory["predicted_device_total"]:
                    smallest = p
                ok = total <= budget
                tried.append((s, p, ok))
                if not ok:
                    break  # a larger micro-batch needs more
            if not tried[0][2]:
                break  # the most frugal setting does not fit: none will
        if not tried[0][2]:
            break
    fitting = sorted([(p.time["tokens_per_s"], s, p) for s, p, ok in tried if ok], key=lambda x: -x[0])
    best = fitting[0] if fitting else None
    runners = []
    if best:
        for tps, s, p in fitting[1:4]:
            runners.append((s, p, f"{tps / best[0]:.0%} of the best's tokens/s"))
    save_note = ""
    if best and best[1].save_mode == "async" and host_gib is not None and best[2].host_staging > host_gib * 2**30:
        save_note = "async staging does not fit the host's RAM: use --save_mode sync"
    out = {"best": best, "runners": runners, "tried": tried, "smallest": smallest, "budget": budget, "base": base,
           "prof": prof, "margin": margin, "save_note": save_note}
    out["json"] = {
        "gpu": prof.name, "world_size": base.world_size, "margin": margin,
        "best": best[2].as_json() | {"flags": _flags(best[1], base), "hardware": _hardware_note(best[1], base)} if best else None,
        "next": [p.as_json() | {"flags": _flags(s, base), "lost_because": why} for s, p, why in runners],
        "smallest_peak": smallest.as_json() if smallest else None,
    }
    return out


SCRIPT = {"pretrain": "training/pretrain.py", "sft": "alignment/sft.py", "dpo": "alignment/dpo.py"}


def _row(s: Setting, p) -> str:
    return (f"micro-batch {s.micro_batch:>2}{' pairs' if s.workload == 'dpo' else ''} x accum {s.grad_accum:>3}, AC {s.activation_checkpointing:<9}, reshard "
            f"{str(s.reshard_after_forward):<5}: card {gib(p.memory['predicted_device_total']):>10}, "
            f"{p.time['tokens_per_s']:>9,.0f} tok/s ({p.time['tokens_per_s_range'][0]:,.0f}-{p.time['tokens_per_s_range'][1]:,.0f}), "
            f"MFU {p.time['mfu']:.0%}")


def fit_text(result: dict) -> str:
    prof, base = result["prof"], result["base"]
    unit = "pairs" if base.workload == "dpo" else "sequences"
    head = (f"fit: {base.world_size} x {prof.name}, keeping {base.micro_batch * base.grad_accum} {unit} per rank per "
            f"step, at most {gib(result['budget'])} of {gib(prof.vram_bytes)} ({result['margin']:.0%} margin)")
    if result["best"] is None:
        s = result["smallest"]
        need = s.memory["predicted_device_total"] / (1 - result["margin"])
        return (f"{head}\nNO setting fits. The smallest predicted card total is {gib(s.memory['predicted_device_total'])} "
                f"({_row(s.setting, s)}); it would need a card of {gib(need)}, or more GPUs to shard over.")
    tps, s, p = result["best"]
    lines = [head, "", "best:", "  " + _row(s, p), "", f"paste after {SCRIPT[base.workload]}:", "  " + _flags(s, base)]
    if _hardware_note(s, base):
        lines.append("  and in the " + _hardware_note(s, base))
    if result["save_note"]:
        lines.append("  " + result["save_note"])
    lines += ["", "next best:"]
    for s2, p2, why in result["runners"]:
        lines.append(f"  {_row(s2, p2)}  -- lost: {why}")
    rejected = [(s2, p2) for s2, p2, ok in result["tried"] if not ok]
    if rejected:
        lines.append("")
        lines.append("does not fit (first of each branch):")
        lines += [f"  {_row(s2, p2)}" for s2, p2 in rejected[:4]]
    return "\n".join(lines)
