"""`genesis plan --align sft|dpo`: the alignment recipes, read as alignment/sft.py and dpo.py read them.

    genesis plan --align sft --config alignment/recipes/sft-genesis-1b.yaml \
        --hardware accelerate_configs/fsdp_2gpu_pcie.yaml --gpu "RTX 4090" \
        --model_config training/recipes/genesis-1b.yaml      # before the pretrained model exists

The recipe goes through the script's own TrlParser (SFTConfig / DPOConfig + ModelConfig + our script
arguments), so a key it does not know is refused as the script would refuse it. The architecture
comes from the recipe's `model_name_or_path` (its config.json), or from `--model_config`: a model
folder, a config.json, or a pretraining recipe (training/recipes/*.yaml).

What is traced (training/plan/trace.py, `_micro_batch_loss`): the policy as Accelerate's FSDP2 holds
it (fp32 master weights, upcast from the bf16 checkpoint; `fsdp2_prepare_model`), TRL's fused LM
head (`add_fused_lm_head`, the per-token log-probs in [4096 x 32768] tiles) and the loss each trainer
computes; for DPO the chosen and rejected rows in one forward, then the frozen bf16 reference model,
sharded per decoder layer as alignment/dpo.py `shard_reference` does, in a no-grad forward.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

STAGES = ("sft", "dpo")


class AlignPlanError(ValueError):
    """An alignment recipe or model the planner cannot read; the message names it."""


def _parser(stage: str):
    if stage == "sft":
        from alignment.sft import make_parser
    else:
        from alignment.dpo import make_parser
    return make_parser()


def read_align_recipe(stage: str, config: str, overrides: list[str]):
    """(script_args, training_args, model_args) as `alignment/<stage>.py --config CONFIG ...` parses them.
    `--use_cpu true` is appended: transformers refuses `bf16: true` on a machine without a GPU, and the
    planner never runs on the device."""
    if stage not in STAGES:
        raise AlignPlanError(f"--align {stage}: one of {', '.join(STAGES)}")
    if not Path(config).is_file():
        raise AlignPlanError(f"--config {config}: file not found")
    err = io.StringIO()
    try:  # stdout too: transformers prints a line on import under WANDB_MODE=offline, and --json owns stdout
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            script_args, training_args, model_args = _parser(stage).parse_args_and_config(
                args=["--config", config, *overrides, "--use_cpu", "true"])
    except SystemExit as e:  # argparse: an unknown flag or a bad value
        lines = [ln for ln in err.getvalue().splitlines() if ln.strip()]
        raise AlignPlanError(f"{config}: {lines[-1] if lines else f'argument error ({e.code})'}") from None
    except (ValueError, TypeError) as e:
        raise AlignPlanError(f"{config}: {e}") from None
    return script_args, training_args, model_args


def model_config(model_args, override: str | None):
    """The GenesisConfig of the model the recipe aligns."""
    import genesis_hf  # noqa: F401  (registers "genesis" with AutoConfig)
    from genesis_hf import GenesisConfig

    source = override or model_args.model_name_or_path
    if source is None:
        raise AlignPlanError("the recipe names no model_name_or_path; give --model_config")
    path = Path(source)
    if override and path.suffix in (".yaml", ".yml"):  # a pretraining recipe: the model pretrain.py builds
        from training.plan.cli import read_recipe

        return read_recipe(str(path), [])[1]
    if path.is_file() and path.suffix == ".json":
        return GenesisConfig.from_json_file(str(path))
    if path.is_dir() and (path / "config.json").is_file():
        return GenesisConfig.from_pretrained(str(path))
    what = "--model_config" if override else "model_name_or_path"
    hint = ("Give --model_config: a model folder, a config.json, or the pretraining recipe "
            "(training/recipes/genesis-1b.yaml)")
    if not override and not path.exists():  # a Hub id, as the script would load it
        from transformers import AutoConfig

        try:
            return AutoConfig.from_pretrained(source, revision=getattr(model_args, "model_revision", None))
        except (OSError, ValueError) as e:
            why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise AlignPlanError(f"{what} {source}: no local config.json, and the Hub gives none ({why}). "
                                 f"{hint}") from None
    raise AlignPlanError(f"{what} {source}: no config.json there (not trained yet?). {hint}")


def setting_for_align(stage: str, training_args, model_args, script_args, hw: dict, **changes):
    from dataclasses import replace

    from training.plan.trace import Setting

    # `activation_checkpointing` (transformers 5; `gradient_checkpointing` is its deprecated alias)
    asked = getattr(training_args, "activation_checkpointing", None)
    asked = training_args.gradient_checkpointing if asked is None else asked
    ac = "full" if (hw["activation_checkpointing"] or asked) else "none"
    if hw["fsdp"]:
        param_dtype = "float32"  # Accelerate's FSDP2 upcast of the bf16 checkpoint (mixed precision on)
        if hw["mixed_precision"] == "no":
            param_dtype = _dtype_name(model_args.dtype)
    else:
        param_dtype = _dtype_name(model_args.dtype)
    # precompute_ref_log_probs: one reference pass before training, then no reference model while it trains
    reference = stage == "dpo" and not training_args.precompute_ref_log_probs
    if not training_args.max_length:
        raise AlignPlanError("max_length is not set: the plan needs the longest row (set max_length in the recipe)")
    mp = hw["mixed_precision"] if hw["fsdp"] else ("bf16" if training_args.bf16 else hw["mixed_precision"])
    s = Setting(micro_batch=training_args.per_device_train_batch_size,
                grad_accum=training_args.gradient_accumulation_steps,
                seq_len=int(training_args.max_length), world_size=hw["world_size"], activation_checkpointing=ac,
                reshard_after_forward=hw["reshard_after_forward"], save_mode="trainer", mixed_precision=mp,
                fsdp=hw["fsdp"], workload=stage, param_dtype=param_dtype, reference=reference)
    return replace(s, **changes)


def _dtype_name(dtype) -> str:
    if dtype in (None, "auto"):
        return "float32"
    name = str(dtype).replace("torch.", "")
    if name not in ("float32", "bfloat16", "float16"):
        raise AlignPlanError(f"dtype {dtype}: one of float32, bfloat16, float16")
    return name
