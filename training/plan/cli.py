"""`genesis plan`: will a recipe fit these GPUs, and how fast will it run? Answered before launch.

    genesis plan --config training/recipes/genesis-1b.yaml \
        --hardware accelerate_configs/fsdp_2gpu_pcie.yaml --gpu "RTX 4090"
    genesis plan ... --per_device_train_batch_size 8 --gradient_accumulation_steps 16   # pretrain.py's overrides
    genesis plan ... --json                  # the same numbers as JSON
    genesis plan ... --fit                   # the fastest setting that fits, as flags for pretrain.py
    genesis plan --gpu list                  # the GPU profiles (training/plan/gpus.yaml)
    genesis plan --align sft --config alignment/recipes/sft-genesis-1b.yaml --hardware ... --gpu "RTX 4090" \
        --model_config training/recipes/genesis-1b.yaml   # TRL SFT (or dpo: policy + reference model)
    genesis plan ... --gpu mycard --vram-gb 20 --tflops 120   # an unlisted card

Nothing is allocated and no GPU is needed: the training step is traced on fake tensors with a fake
process group of the accelerate config's world size (training/plan/trace.py).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

import yaml

from training.plan.profiles import GPUProfile, UnknownGPU, lookup, table_text
from training.plan.trace import Setting

logger = logging.getLogger(__name__)


class PlanError(ValueError):
    """Input the planner refuses; the message names the flag, file or field."""


def read_hardware(path: str | Path, num_processes: int | None = None) -> dict:
    """The facts of an accelerate config the plan needs; refuses a world size it does not allow."""
    path = Path(path)
    if not path.is_file():
        raise PlanError(f"--hardware {path}: file not found")
    cfg = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    dist_type = cfg.get("distributed_type", "NO")
    dist_type = "NO" if dist_type is False else str(dist_type)  # an unquoted NO reads as YAML's false
    machines = int(cfg.get("num_machines", 1) or 1)
    world = int(num_processes if num_processes is not None else cfg.get("num_processes", 1) or 1)
    if world < 1:
        raise PlanError(f"{path}: num_processes must be >= 1, got {world}")
    if dist_type == "NO" and world != 1:
        raise PlanError(f"{path}: distributed_type: NO runs one process; num_processes {world} is not allowed "
                        "(use an FSDP config such as accelerate_configs/fsdp_2gpu_pcie.yaml)")
    if world % machines:
        raise PlanError(f"{path}: num_processes {world} is not a multiple of num_machines {machines}")
    if dist_type not in ("NO", "FSDP"):
        raise PlanError(f"{path}: distributed_type: {dist_type} is not planned (FSDP or NO)")
    fsdp = cfg.get("fsdp_config") or {}
    if dist_type == "FSDP" and int(fsdp.get("fsdp_version", 2)) != 2:
        raise PlanError(f"{path}: fsdp_config.fsdp_version {fsdp.get('fsdp_version')}: Genesis runs FSDP2 only")
    return {"path": str(path), "fsdp": dist_type == "FSDP", "world_size": world, "num_machines": machines,
            "mixed_precision": "no" if cfg.get("mixed_precision") in (None, False) else str(cfg["mixed_precision"]),
            "reshard_after_forward": bool(fsdp.get("fsdp_reshard_after_forward", True)),
            "activation_checkpointing": bool(fsdp.get("fsdp_activation_checkpointing", False))}


def read_recipe(config: str, overrides: list[str]):
    """(PretrainArguments, GenesisConfig) exactly as pretrain.py reads them (unknown keys refused)."""
    from genesis_hf import GenesisConfig
    from training.args import parse_args
    from training.run_setup import MODEL_FIELDS

    args = parse_args(["--config", config, *overrides])
    base = GenesisConfig.from_pretrained(args.model_config).to_dict() if args.model_config else GenesisConfig().to_dict()
    given = {f: getattr(args, f) for f in MODEL_FIELDS if getattr(args, f) is not None}
    if "vocab_size" not in given and args.embedded_data:  # build_model takes the tokenizer's length
        given["vocab_size"] = args.embedded_vocab_size
    if {"hidden_size", "num_attention_heads"} & given.keys():
        base.pop("head_dim", None)
    if args.rope_theta is not None:
        given["rope_parameters"] = {"rope_type": "default", "rope_theta": float(args.rope_theta)}
    base.update(given)
    return args, GenesisConfig.from_dict(base)


def setting_for(args, hw: dict, **changes) -> Setting:
    ac = "full" if (hw["activation_checkpointing"] or args.gradient_checkpointing) else "none"
    s = Setting(micro_batch=args.per_device_train_batch_size, grad_accum=args.gradient_accumulation_steps,
                seq_len=args.seq_len, world_size=hw["world_size"], activation_checkpointing=ac,
                reshard_after_forward=hw["reshard_after_forward"], save_mode=args.save_mode,
                mixed_precision=hw["mixed_precision"], fsdp=hw["fsdp"])
    return Setting(**{**s.__dict__, **changes})


_CACHE: dict = {}


def plan(config, setting: Setting, prof: GPUProfile, *, num_machines: int = 1, layers: tuple[int, int] = (2, 3)):
    """Trace (cached per setting) and predict. Returns a predict.Prediction."""
    from dataclasses import replace

    from training.metrics import flops_per_token
    from training.plan.predict import predict
    from training.plan.trace import extrapolate, trace_model

    # the memory and kernels of a step do not depend on how many micro-batches accumulate beyond two, nor on saves
    key = (config.to_json_string(), replace(setting, grad_accum=min(setting.grad_accum, 2), save_mode=""), layers)
    if key not in _CACHE:
        a = trace_model(config, setting, layers[0])
        b = trace_model(config, setting, layers[1])
        _CACHE[key] = (a, b)
    a, b = _CACHE[key]
    ex = extrapolate(a, b, config.num_hidden_layers)
    n_matmul = _matmul_params(config)
    return predict(ex, setting, prof, flops_per_token=flops_per_token(config, setting.seq_len, n_matmul),
                   num_machines=num_machines)


def _matmul_params(config) -> int:
    """>= 2-D weights of the model, the tied embedding/head once (training/metrics.py: matmul_params)."""
    import torch

    from genesis_hf import GenesisForCausalLM
    from training.metrics import matmul_params

    with torch.device("meta"):
        return matmul_params(GenesisForCausalLM(config))


def resolve_gpu(name: str, vram_gb: float | None, tflops: float | None, link: str | None) -> GPUProfile:
    try:
        prof = lookup(name)
    except UnknownGPU:
        if vram_gb is not None and tflops is not None:
            prof = GPUProfile.custom(vram_gb=vram_gb, tflops=tflops)
            return prof.with_overrides(link=link) if link else prof
        raise
    return prof.with_overrides(vram_gb=vram_gb, tflops=tflops, link=link)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="genesis plan", description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 2)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="the pretraining recipe (training/recipes/*.yaml)")
    p.add_argument("--hardware", help="the accelerate config (accelerate_configs/*.yaml): world size, FSDP, precision")
    p.add_argument("--gpu", required=True, help='a profile name from `--gpu list` ("RTX 4090", "H100 SXM", ...)')
    p.add_argument("--vram-gb", type=float, default=None, help="the card's memory, GiB (an unlisted card, or override)")
    p.add_argument("--tflops", type=float, default=None, help="the card's peak dense bf16 TFLOP/s (unlisted card, or override)")
    p.add_argument("--link", choices=("pcie_no_p2p", "pcie_p2p", "nvlink"), default=None,
                   help="the link between the cards (default: the profile's)")
    p.add_argument("--num_processes", type=int, default=None, help="override the accelerate config's num_processes")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("--fit", action="store_true", help="search the fastest setting that fits (training/plan/fit.py)")
    p.add_argument("--margin", type=float, default=0.05, help="--fit: keep this fraction of the card free (default 0.05)")
    p.add_argument("--align", choices=("sft", "dpo"), default=None,
                   help="plan TRL alignment (alignment/sft.py or dpo.py) with an alignment recipe as --config")
    p.add_argument("--model_config", default=None,
                   help="--align: the model's architecture when the recipe's model_name_or_path has no config.json "
                        "yet: a model folder, a config.json, or a pretraining recipe (training/recipes/*.yaml)")
    return p


def cli_main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["calibrate"]:  # genesis plan calibrate --from RESULTS.json: fit a profile's constants
        from training.plan.calibrate import main as calibrate_main

        return calibrate_main(argv[1:])
    parser = build_parser()
    ns, overrides = parser.parse_known_args(argv)
    if ns.gpu == "list":
        print(table_text())
        return 0
    if not ns.config or not ns.hardware:
        parser.error("--config and --hardware are required (or --gpu list)")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    logging.getLogger("torch.distributed").setLevel(logging.ERROR)
    from training.args import ConfigError
    from training.plan.predict import table

    try:
        prof = resolve_gpu(ns.gpu, ns.vram_gb, ns.tflops, ns.link)
        hw = read_hardware(ns.hardware, ns.num_processes)
        if ns.align:
            from training.plan.align import model_config, read_align_recipe, setting_for_align

            script_args, training_args, model_args = read_align_recipe(ns.align, ns.config, overrides)
            config = model_config(model_args, ns.model_config)
            setting = setting_for_align(ns.align, training_args, model_args, script_args, hw)
        else:
            if ns.model_config:
                raise PlanError("--model_config is for --align: a pretraining recipe defines its model itself")
            args, config = read_recipe(ns.config, overrides)
            setting = setting_for(args, hw)
        if ns.fit:
            from training.plan.fit import fit, fit_text

            result = fit(config, setting, prof, num_machines=hw["num_machines"], margin=ns.margin)
            print(json.dumps(result["json"], indent=2) if ns.json else fit_text(result))
            return 0 if result["best"] is not None else 1
        pred = plan(config, setting, prof, num_machines=hw["num_machines"])
    except (UnknownGPU, PlanError, ConfigError, ValueError) as e:
        print(f"genesis plan: {e}", file=sys.stderr)
        return 2
    print(json.dumps(pred.as_json(), indent=2) if ns.json else table(pred))
    return 0


if __name__ == "__main__":
    sys.exit(cli_main())
