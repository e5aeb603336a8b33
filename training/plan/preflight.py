"""Preflight: before step 1 on CUDA, pretrain.py (and alignment/sft.py, dpo.py) ask the planner about this launch.

It logs the plan's one line and refuses a setting predicted not to fit (one line with the numbers
and the `genesis plan --fit` command), unless the user says to go ahead anyway: `--ignore_plan`
(a PretrainArguments field, read here with getattr) or GENESIS_IGNORE_PLAN=1.

The plan runs in a child process on the main rank: its fake process group cannot live beside the
run's real one. Its answer is broadcast, so every rank refuses together.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from training.plan.profiles import GIB, lookup, names

logger = logging.getLogger("training.pretrain")
ROOT = Path(__file__).resolve().parents[2]


class PlanRefused(ValueError):
    """The plan says this launch does not fit its GPUs (and --ignore_plan was not given)."""


# The words of torch.cuda.get_device_name() that name each profile ("NVIDIA GeForce RTX 4090",
# "NVIDIA H100 80GB HBM3", "NVIDIA H100 PCIe", "NVIDIA A100-SXM4-80GB", "NVIDIA L4").
_DEVICE_WORDS = {"RTX 3090": "3090", "RTX 4090": "4090", "RTX 4080": "4080", "RTX 4060 Ti 16 GB": "4060 ti",
                 "RTX 5090": "5090", "A100 40GB": "a100", "A100 80GB": "a100", "L4": "l4", "L40S": "l40s",
                 "H100 SXM": "h100", "H100 PCIe": "h100 pcie", "H100 NVL": "h100 nvl", "H200": "h200"}


def profile_name(device_name: str, total_memory: int) -> str | None:
    """The gpus.yaml profile of a CUDA device: the longest matching words, then the nearest memory."""
    words = f" {device_name.lower().replace('-', ' ')} "
    hits = [n for n, w in _DEVICE_WORDS.items() if f" {w} " in words and n in names()]
    if not hits:
        return None
    longest = max(len(_DEVICE_WORDS[n]) for n in hits)
    hits = [n for n in hits if len(_DEVICE_WORDS[n]) == longest]
    return min(hits, key=lambda n: abs(lookup(n).vram_gib * GIB - total_memory))


def decide(plan_json: dict, ignore: bool) -> tuple[bool, str]:
    """(go ahead?, the line to log). Refuses only a plan that says it does not fit, unless ignored."""
    m, t = plan_json["memory"], plan_json["time"]
    line = (f"plan: {plan_json['world_size']} x {plan_json['gpu']}: peak allocated {m['peak_allocated'] / GIB:.2f} GiB, "
            f"card total {m['predicted_device_total'] / GIB:.2f} of {m['vram'] / GIB:.2f} GiB; "
            f"{t['tokens_per_s']:,.0f} tokens/s ({t['tokens_per_s_range'][0]:,.0f}-{t['tokens_per_s_range'][1]:,.0f}), "
            f"MFU {t['mfu']:.0%}")
    if plan_json["fits"]:
        return True, line + " (fits)"
    refuse = (f"{line}: predicted NOT to fit ({(m['predicted_device_total'] - m['vram']) / GIB:.2f} GiB over). "
              "Run `genesis plan --fit` with this recipe and accelerate config for a setting that fits, "
              "or pass --ignore_plan (GENESIS_IGNORE_PLAN=1) to go ahead anyway")
    if ignore:
        return True, refuse.split(". Run")[0] + "; going ahead: --ignore_plan"
    return False, refuse


def hardware_yaml(accelerator) -> str:
    """The accelerate config of this launch, as the planner reads it, from the live accelerator."""
    from accelerate.utils import DistributedType

    fsdp = accelerator.distributed_type == DistributedType.FSDP
    plugin = accelerator.state.fsdp_plugin if fsdp else None
    # 'NO' and 'no' quoted: bare, they are YAML's false
    lines = [f"distributed_type: {'FSDP' if fsdp else repr('NO')}", f"num_processes: {accelerator.num_processes}",
             f"num_machines: {max(1, accelerator.num_processes // int(os.environ.get('LOCAL_WORLD_SIZE', accelerator.num_processes)))}",
             f"mixed_precision: '{accelerator.mixed_precision}'"]
    if fsdp:
        lines += ["fsdp_config:", "  fsdp_version: 2",
                  f"  fsdp_reshard_after_forward: {str(bool(plugin.reshard_after_forward)).lower()}",
                  f"  fsdp_activation_checkpointing: {str(bool(plugin.activation_checkpointing)).lower()}"]
    return "\n".join(lines) + "\n"


def preflight(args, accelerator, argv: list[str] | None = None, align: str | None = None) -> dict | None:
    """On CUDA: log the plan's line; raise PlanRefused (a ValueError: the scripts exit 2) when it does not
    fit. `argv`: the launch's own arguments (default sys.argv[1:]); `align`: "sft" or "dpo" for the
    alignment scripts (their recipe and TRL arguments). Returns the plan's JSON (None off CUDA or when
    the card is not in the table)."""
    import torch
    from accelerate.utils import broadcast_object_list

    if accelerator.device.type != "cuda":
        return None
    ignore = bool(getattr(args, "ignore_plan", False)) or os.environ.get("GENESIS_IGNORE_PLAN") == "1"
    box = [None]
    if accelerator.is_main_process:
        props = torch.cuda.get_device_properties(accelerator.device)
        name = profile_name(props.name, props.total_memory)
        if name is None:
            logger.warning("plan: %s is not in training/plan/gpus.yaml; no preflight prediction", props.name)
        else:
            box = [_run_plan(name, props.total_memory, accelerator, argv, align)]
    if accelerator.num_processes > 1:
        broadcast_object_list(box, from_process=0)
    plan_json = box[0]
    if plan_json is None:
        return None
    go, line = decide(plan_json, ignore)
    if not go:
        raise PlanRefused(line)
    logger.info("%s", line)
    return plan_json


# The launcher's variables describe the run, not the planner: with them, parsing TRL's arguments in the
# child (TrainingArguments sets up its device) could join the run's rendezvous or think it is one of
# its FSDP ranks. The planner reads the hardware from the YAML it is given.
_LAUNCH_PREFIXES = ("ACCELERATE_", "FSDP_", "TORCHELASTIC_", "MASTER_", "LOCAL_", "GROUP_", "ROLE_", "TORCH_NCCL_")


def planner_env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(_LAUNCH_PREFIXES)}
    return {**env, "CUDA_VISIBLE_DEVICES": "", "WORLD_SIZE": "1", "RANK": "0"}


def _run_plan(name: str, total_memory: int, accelerator, argv: list[str] | None, align: str | None = None) -> dict | None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if align:
        argv = ["--align", align, *argv]
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        f.write(hardware_yaml(accelerator))
    cmd = [sys.executable, "-m", "training.plan.cli", "--hardware", f.name, "--gpu", name,
           "--vram-gb", f"{total_memory / GIB:.3f}", "--json", *argv]
    try:
        out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=planner_env())
    except subprocess.TimeoutExpired:
        logger.warning("plan: the planner took over 600 s; no preflight prediction")
        return None
    finally:
        os.unlink(f.name)
    if out.returncode != 0:
        logger.warning("plan: the planner failed (%s); no preflight prediction", out.stderr.strip().splitlines()[-1:])
        return None
    return json.loads(out.stdout)


def compare_line(plan_json: dict, record: dict, device) -> dict:
    """The metrics.jsonl record pretrain.py writes once, at the first logged step >= 10: the plan
    against what this run measured (bytes; tokens/s of the logging window, all ranks)."""
    import torch

    m, t = plan_json["memory"], plan_json["time"]
    out = {"step": record["step"], "event": "plan_vs_measured", "predicted_peak_allocated": m["peak_allocated"],
           "predicted_device_total": m["predicted_device_total"], "predicted_tokens_per_s": t["tokens_per_s"],
           "predicted_tokens_per_s_range": t["tokens_per_s_range"], "measured_tokens_per_s": record.get("tok_s")}
    if getattr(device, "type", None) == "cuda":
        out["measured_max_memory_allocated"] = torch.cuda.max_memory_allocated(device)
        out["measured_max_memory_reserved"] = torch.cuda.max_memory_reserved(device)
    lo, hi = t["tokens_per_s_range"]
    measured_mem = (f"{out['measured_max_memory_allocated'] / GIB:.2f} GiB" if "measured_max_memory_allocated" in out
                    else "n/a")
    measured_tps = f"{record['tok_s']:,.0f}" if record.get("tok_s") is not None else "n/a"
    logger.info("plan vs measured at step %d: peak allocated %.2f GiB predicted / %s measured; tokens/s %s predicted "
                "(%s-%s) / %s measured", record["step"], m["peak_allocated"] / GIB, measured_mem,
                f"{t['tokens_per_s']:,.0f}", f"{lo:,.0f}", f"{hi:,.0f}", measured_tps)
    return out
