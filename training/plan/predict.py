"""From a trace to a prediction: what the card shows, whether it fits, and how fast the step runs.

Memory: the allocated peak is the trace's (steady state, the second optimizer step). What the card
shows adds the caching allocator's reserve and, per process, the CUDA context and NCCL's buffers
(constants in gpus.yaml, with their sources).

Time, per kernel of the trace: max(FLOPs / (peak bf16 x matmul efficiency), bytes / (DRAM bandwidth
x memory efficiency), a launch floor), summed per segment. Communication: the all-gather and
reduce-scatter bytes of a segment, of which a ring moves (W-1)/W per GPU, over the link's bus
bandwidth. FSDP2 prefetches the next unit's all-gather during this unit's compute, so a segment
exposes max(0, comm - overlap x compute) plus the first unit's all-gather of each pass. The two
ends of the range use the pessimistic and the optimistic constants; the middle uses their means.
"""

from __future__ import annotations

from dataclasses import dataclass

from training.plan.profiles import GIB, GPUProfile
from training.plan.trace import KEYS, SEGMENTS, Setting


@dataclass
class Prediction:
    gpu: str
    world_size: int
    setting: Setting
    memory: dict  # bytes by category at the peak, and the totals
    peak_phase: str
    fits: bool
    headroom: int  # vram - predicted device total (bytes; negative: does not fit)
    host_staging: int  # bytes per rank pinned for async saves (0 for sync)
    time: dict
    layers: tuple

    def as_json(self) -> dict:
        m = self.memory
        return {
            "gpu": self.gpu,
            "world_size": self.world_size,
            "setting": {"per_device_train_batch_size": self.setting.micro_batch,
                        "gradient_accumulation_steps": self.setting.grad_accum, "seq_len": self.setting.seq_len,
                        "activation_checkpointing": self.setting.activation_checkpointing,
                        "reshard_after_forward": self.setting.reshard_after_forward, "save_mode": self.setting.save_mode,
                        "workload": self.setting.workload},
            "memory": {"params": m["params"], "grads": m["grads"], "optimizer": m["optimizer"],
                       "activations": m["activations"], "loss": m["loss"], "temporary": m["temporary"],
                       "reference": m["reference"], "peak_allocated": m["peak_allocated"], "predicted_device_total": m["predicted_device_total"],
                       "vram": m["vram"], "host_staging_per_rank": self.host_staging, "peak_phase": self.peak_phase},
            "fits": self.fits,
            "time": {k: self.time[k] for k in ("step_s", "tokens_per_s", "tokens_per_s_range", "mfu", "exposed_comm_s")}
                    | {"compute_s": self.time["compute_s"], "comm_s": self.time["comm_s"]},
        }


def _segment_compute_s(seg, prof: GPUProfile, mm_eff: float, mem_eff: float) -> float:
    peak = prof.bf16_tflops * 1e12 * mm_eff
    bw = prof.mem_gbps * 1e9 * mem_eff
    floor = prof.kernel_floor_us * 1e-6
    return sum(max(f / peak, b / bw, floor) for f, b in zip(seg.flops, seg.bytes))


def _lin(x: float, y: float, layers: tuple) -> float:
    a, b, n = layers
    return x + (y - x) * (n - a) / (b - a)


def predict(ex: dict, setting: Setting, prof: GPUProfile, *, flops_per_token: float,
            num_machines: int = 1) -> Prediction:
    """`ex`: trace.extrapolate(...) of `setting`; `prof`: the card."""
    layers = ex["_layers"]
    segs = {k: ex[k] for k in SEGMENTS if k in ex}
    name, worst = max(segs.items(), key=lambda kv: kv[1]["peak_total"])
    cats = worst["peak"]
    peak = worst["peak_total"]
    device_total = int(peak * (1 + prof.allocator_reserve_fraction)) + prof.overhead_bytes(setting.world_size)
    vram = prof.vram_bytes
    memory = {"params": cats["params_sharded"] + cats["params_unsharded"] + cats["buffers"], "grads": cats["grads"],
              "optimizer": cats["optimizer"], "activations": cats["activations"], "loss": cats["loss"],
              "temporary": cats["temporary"], "reference": cats.get("reference", 0), "peak_allocated": peak, "predicted_device_total": device_total,
              "vram": vram, "by_category": dict(cats),
              "segments": {k: v["peak_total"] for k, v in segs.items()}}
    steady = ex["_steady"]
    host = steady["params_sharded"] + steady["optimizer"] if setting.save_mode == "async" else 0

    w = setting.world_size
    if num_machines > 1:
        link, link_gbps = "between machines", prof.internode_gbps
    else:
        link, link_gbps = prof.link, prof.link_gbps.get(prof.link, 0.0)
    n_units = layers[2] + 1  # decoder layers + the root (embedding/head, final norm)

    def step(i: int | None) -> dict:
        pick = (lambda pair: pair[i]) if i is not None else (lambda pair: sum(pair) / 2)
        mm, mem, lk, ov = (pick(prof.matmul_efficiency), pick(prof.memory_efficiency), pick(prof.link_efficiency),
                           pick(prof.overlap))
        out = {"compute_s": 0.0, "comm_s": 0.0, "exposed_comm_s": 0.0}
        for kind, seg in segs.items():
            n = {"accumulate": setting.grad_accum - 1, "last_micro_batch": 1, "optimizer_step": 1}[kind]
            sa, sb = seg["kernels"]
            compute = _lin(_segment_compute_s(sa, prof, mm, mem), _segment_compute_s(sb, prof, mm, mem), layers)
            comm = 0.0
            if w > 1 and link_gbps:
                comm = (seg["allgather_bytes"] + seg["reduce_scatter_bytes"]) * (w - 1) / w / (link_gbps * 1e9 * lk)
            first_unit = comm * (seg["allgather_bytes"] / max(1, seg["allgather_bytes"] + seg["reduce_scatter_bytes"])) / n_units
            exposed = max(0.0, comm - ov * compute) + (first_unit if kind != "optimizer_step" else 0.0)
            exposed = min(exposed, comm)
            out["compute_s"] += n * compute
            out["comm_s"] += n * comm
            out["exposed_comm_s"] += n * exposed
        out["step_s"] = out["compute_s"] + out["exposed_comm_s"]
        return out

    low, mid, high = step(0), step(None), step(1)
    tokens = setting.tokens_per_step
    tps = tokens / mid["step_s"]
    per_gpu = tps / w
    time = {"step_s": mid["step_s"], "tokens_per_s": tps,
            "tokens_per_s_range": [tokens / low["step_s"], tokens / high["step_s"]],
            "mfu": per_gpu * flops_per_token / (prof.bf16_tflops * 1e12),
            "exposed_comm_s": mid["exposed_comm_s"], "compute_s": mid["compute_s"], "comm_s": mid["comm_s"],
            "link": f"{link} {link_gbps:g} GB/s", "ends": (low, high)}
    return Prediction(gpu=prof.name, world_size=w, setting=setting, memory=memory, peak_phase=worst["phase"],
                      fits=device_total <= vram, headroom=vram - device_total, host_staging=host, time=time,
                      layers=layers)


def gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB"


def table(p: Prediction) -> str:
    """The human table `genesis plan` prints."""
    m, t, s = p.memory, p.time, p.setting
    c = m["by_category"]
    what = {"pretrain": "pretraining", "sft": "SFT (TRL SFTTrainer)",
            "dpo": "DPO (TRL DPOTrainer" + (", policy + reference model)" if s.reference else ", reference precomputed)")}
    unit = " pairs" if s.workload == "dpo" else ""
    lines = [
        f"plan, {what[s.workload]}: {p.world_size} x {p.gpu}, micro-batch {s.micro_batch}{unit} x accumulation {s.grad_accum} x {s.seq_len} tokens "
        f"({s.tokens_per_step:,} tokens/step), activation checkpointing {s.activation_checkpointing}, "
        f"reshard_after_forward {s.reshard_after_forward}, "
        + (f"save {s.save_mode}" if s.workload == "pretrain" else "saves by the Trainer"),
        f"traced on fake tensors at {p.layers[0]} and {p.layers[1]} layers, extrapolated to {p.layers[2]} (exact: "
        "every layer is the same FSDP unit)",
        "",
        "memory per GPU (at the peak)",
    ]
    dtype = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}[s.param_dtype]
    rows = [(f"{'sharded ' if s.fsdp else ''}params ({dtype})", c["params_sharded"] + c["buffers"]), ("unsharded params (bf16, gathered)", c["params_unsharded"]),
            ("gradients (sharded + unsharded fp32)", c["grads"]), ("optimizer state (AdamW)", c["optimizer"]),
            ("activations", c["activations"]), ("temporaries (incl. no_sync fp32 gradient accumulators)", c["temporary"]),
            ("loss (chunked, its own peak)" if s.workload == "pretrain" else "loss (TRL's fused log-prob head, its own peak)",
             c["loss"])]
    if s.reference:
        rows.append(("reference model (bf16 shards; DPO)", c.get("reference", 0)))
    lines += [f"  {k:<56} {gib(v):>11}" for k, v in rows]
    lines += [
        f"  {'peak allocated':<56} {gib(m['peak_allocated']):>11}   at: {p.peak_phase}",
        f"  {'predicted device total (reserve, CUDA context, NCCL)':<56} {gib(m['predicted_device_total']):>11}",
        f"  {'card':<56} {gib(m['vram']):>11}",
        f"  {'headroom':<56} {gib(p.headroom):>11}   -> {'FITS' if p.fits else 'DOES NOT FIT'}",
        f"  {'host memory per rank for async save staging':<56} {gib(p.host_staging):>11}"
        + ("" if s.workload == "pretrain" else "   (the Trainer saves synchronously)"),
        "",
        "time",
        f"  step {t['step_s']:.2f} s = compute {t['compute_s']:.2f} s + exposed communication {t['exposed_comm_s']:.2f} s "
        f"(of {t['comm_s']:.2f} s over {t['link']})",
        f"  tokens/s (whole job) {t['tokens_per_s']:,.0f}, range {t['tokens_per_s_range'][0]:,.0f} - "
        f"{t['tokens_per_s_range'][1]:,.0f} (ends: pessimistic / optimistic matmul, memory, link and overlap "
        "efficiencies in gpus.yaml)",
        f"  MFU {t['mfu']:.1%} (training/metrics.py: model FLOPs per token x tokens/s per GPU / peak bf16)",
    ]
    return "\n".join(lines)


def one_line(p: Prediction) -> str:
    """The preflight's log line."""
    lo, hi = p.time["tokens_per_s_range"]
    return (f"plan: {p.world_size} x {p.gpu}: peak allocated {gib(p.memory['peak_allocated'])}, card total "
            f"{gib(p.memory['predicted_device_total'])} of {gib(p.memory['vram'])} ({'fits' if p.fits else 'DOES NOT FIT'}); "
            f"{p.time['tokens_per_s']:,.0f} tokens/s ({lo:,.0f}-{hi:,.0f}), MFU {p.time['mfu']:.0%}")


__all__ = ["KEYS", "Prediction", "predict", "table", "one_line"]
