"""How Genesis uses Accelerate's FSDP2 plugin: the precision rule, the refusal, per-layer compile.

Shared by training/pretrain.py and the TRL scripts in alignment/ (which import it; it imports
neither). Parallelism is applied from outside the model file, in torchtitan's order: activation
checkpointing and compile per decoder layer, then FSDP (Accelerate's `prepare`).

The precision rule (docs/pretraining.md, "Precision"):

| what                                   | dtype | why |
| -------------------------------------- | ----- | --- |
| weights kept by the optimizer (shards) | fp32  | AdamW updates of 1e-5 x a weight vanish in bf16 |
| forward/backward compute               | bf16  | tensor-core speed, half the all-gather bytes |
| gradient reduce-scatter AND the sum of no_sync micro-batches | fp32 | 32 micro-batches summed in an 8-bit mantissa lose the small ones |
| the loss and every logged metric       | fp32  | a bf16 loss has 3 significant digits: 2.051 logs as 2.046875 |

Accelerate's own FSDP2 default for `mixed_precision: bf16` is param, reduce AND output dtype
bf16; `genesis_policy` replaces it before `prepare` wraps anything.
"""

from __future__ import annotations

import logging
import os

import torch

logger = logging.getLogger(__name__)

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def genesis_policy(mixed_precision: str):
    """The FSDP2 MixedPrecisionPolicy for `mixed_precision` ("bf16", "fp16", "no"/"fp32").

    Compute in the low dtype; reduce-scatter and accumulate gradients in fp32; leave outputs in
    the dtype they were computed in (`output_dtype=None`): the decoder layers hand bf16 to each
    other, and the loss, computed in fp32 inside the model, stays fp32.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy

    low = _DTYPES.get(str(mixed_precision).lower())
    if low is None:
        return MixedPrecisionPolicy()  # fp32 everywhere: nothing to cast
    return MixedPrecisionPolicy(param_dtype=low, reduce_dtype=torch.float32, output_dtype=None,
                                cast_forward_inputs=True)


def use_genesis_policy(accelerator) -> bool:
    """Install `genesis_policy` on the accelerator's FSDP2 plugin. Call BEFORE anything is wrapped:
    pretrain.py calls it before `prepare`; the TRL scripts from the Trainer's accelerator hook
    (DPOTrainer wraps its reference model inside `__init__`). Returns False (and does nothing)
    when the run is not FSDP2."""
    from accelerate.utils import DistributedType

    state = accelerator.state
    plugin = getattr(state, "fsdp_plugin", None)
    if state.distributed_type != DistributedType.FSDP or plugin is None or plugin.fsdp_version != 2:
        return False
    plugin.mixed_precision_policy = genesis_policy(state.mixed_precision)
    logger.info("FSDP2 precision: %s", describe_policy(plugin.mixed_precision_policy))
    return True


def describe_policy(policy) -> str:
    def name(d):
        return "as computed" if d is None else str(d).replace("torch.", "")

    return (f"compute {name(policy.param_dtype) if policy.param_dtype else 'fp32'}, gradient reduce/accumulate "
            f"{name(policy.reduce_dtype) if policy.reduce_dtype else 'fp32'}, outputs {name(policy.output_dtype)}")


def fsdp_policies(model) -> dict[str, object]:
    """{module name: MixedPrecisionPolicy} of every module `fully_shard` wrapped (tests, logs)."""
    from torch.distributed.fsdp import FSDPModule

    out = {}
    for name, module in model.named_modules():
        if isinstance(module, FSDPModule):
            group = module._get_fsdp_state()._fsdp_param_group
            if group is not None:  # a wrapper around an already wrapped layer owns no parameters
                out[name or "<root>"] = group.mp_policy
    return out


def unwrapped(module):
    """The module inside activation-checkpointing / offload / compile wrappers (itself if none)."""
    while True:
        inner = getattr(module, "_checkpoint_wrapped_module", None) or getattr(module, "_orig_mod", None)
        if inner is None:
            return module
        module = inner


def layer_class_name(module) -> str:
    """The class name of the module inside any wrapper, without FSDP2's generated "FSDP" prefix."""
    return type(unwrapped(module)).__name__.removeprefix("FSDP")


def fsdp_summary(model, accelerator) -> str:
    """One line on how `prepare` sharded the model: units by class, activation checkpointing,
    precision of every unit, and the plugin's loading/state-dict settings (logged at start)."""
    from collections import Counter

    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper
    from torch.distributed.fsdp import FSDPModule

    # A unit is a parameter group; one group may span several modules (Accelerate puts the tied
    # embedding/head and the final norm in one), and a wrapper around a wrapped layer owns none.
    # Units are named by the module inside any wrapper: Accelerate >= 1.16 wraps each decoder
    # layer for activation checkpointing before sharding, so the unit itself is the wrapper.
    groups: dict[int, list[str]] = {}
    for _, module in model.named_modules():
        if isinstance(module, FSDPModule) and (group := module._get_fsdp_state()._fsdp_param_group) is not None:
            groups.setdefault(id(group), []).append(layer_class_name(module))
    units = Counter("+".join(names) for names in groups.values())
    checkpointed = sum(isinstance(m, CheckpointWrapper) for m in model.modules())
    policies = {describe_policy(p) for p in fsdp_policies(model).values()}
    plugin = accelerator.state.fsdp_plugin
    precision = (f"every unit: {policies.pop()}" if len(policies) == 1
                 else "MIXED: " + " | ".join(sorted(policies)))
    return (f"{sum(units.values())} units ({', '.join(f'{n} x{c}' for n, c in units.items())}); "
            f"activation checkpointing on {checkpointed} layers; {precision}; "
            f"cpu_ram_efficient_loading={plugin.cpu_ram_efficient_loading}; "
            f"reshard_after_forward={plugin.reshard_after_forward}; state_dict_type={plugin.state_dict_type.name}")


# ----------------------------------------------------------------------------- refusal


class FSDPNotGranted(ValueError):
    """The accelerate config asked for FSDP and this launch cannot give it."""


def accelerate_config_file() -> str:
    """The --config_file of the `accelerate launch` that started this process, if it can be seen
    (torchrun's agent runs inside the launcher: a parent process), else Accelerate's default."""
    try:
        import psutil

        proc = psutil.Process(os.getpid())
        for _ in range(4):
            proc = proc.parent()
            if proc is None:
                break
            argv = proc.cmdline()
            for i, a in enumerate(argv):
                if a in ("--config_file", "--config-file") and i + 1 < len(argv):
                    return argv[i + 1]
                if a.startswith(("--config_file=", "--config-file=")):
                    return a.split("=", 1)[1]
    except Exception:  # noqa: BLE001  (best effort: only used to name the file in an error)
        pass
    return "the default accelerate config (`accelerate config`)"


def require_granted_fsdp(accelerator) -> None:
    """Refuse to train unsharded when the accelerate config asked for FSDP.

    Accelerate 1.15 turns `distributed_type: FSDP` into MULTI_CPU on a machine without GPUs, and
    into NO for a plain `python` start: the run would train, unsharded, and exit 0.
    """
    from accelerate.utils import DistributedType

    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true":
        return
    got = accelerator.distributed_type
    world = accelerator.num_processes
    if got == DistributedType.FSDP:
        if torch.cuda.is_available() and int(os.environ.get("LOCAL_WORLD_SIZE", world)) > torch.cuda.device_count():
            raise FSDPNotGranted(
                f"{accelerate_config_file()}: num_processes asks for {os.environ.get('LOCAL_WORLD_SIZE')} processes "
                f"on this machine but it has {torch.cuda.device_count()} GPU(s); pass --num_processes "
                f"{torch.cuda.device_count()}")
        return
    why = ("this machine has no CUDA GPU" if not torch.cuda.is_available()
           else f"{world} process(es) outside a distributed launch")
    raise FSDPNotGranted(
        f"{accelerate_config_file()}: distributed_type: FSDP, but Accelerate set up {got} ({why}); "
        f"refusing to train without sharding. On CPU use accelerate_configs/cpu.yaml")


# ----------------------------------------------------------------------------- compile


def compile_decoder_layers(model, layer_cls_name: str = "GenesisDecoderLayer", **compile_kwargs) -> int:
    """`torch.compile` every decoder layer in place (`nn.Module.compile`: parameter names, state
    dicts and FSDP's auto-wrap by class stay as they are). Returns the number of layers compiled.

    Per layer rather than the whole model: one small graph compiled once and reused 32 times,
    and FSDP's per-layer hooks stay outside the graphs."""
    n = 0
    for module in model.modules():
        if type(module).__name__ == layer_cls_name:
            module.compile(**compile_kwargs)
            n += 1
    if n == 0:
        raise ValueError(f"torch_compile: no {layer_cls_name} found in {type(model).__name__}")
    return n
