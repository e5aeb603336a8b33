"""Curiosity-over-hedging DPO from the SFT model with TRL's DPOTrainer.

The 1B model on 2x RTX 4090 (FSDP, the pretraining hardware config):

    accelerate launch --config_file accelerate_configs/fsdp_2gpu_pcie.yaml alignment/dpo.py \
        --config alignment/recipes/dpo-genesis-1b.yaml --model_name_or_path runs/align/genesis-1b-sft \
        --dataset_name runs/align/pairs.jsonl

A tiny run on CPU (seconds):

    python alignment/dpo.py --config alignment/recipes/dpo-tiny.yaml --model_name_or_path SFT_DIR

Pairs come from `genesis align pairs` (sampled answers ranked by the constitution scorer) or any
preference dataset in TRL's format (prompt/chosen/rejected, conversational or plain, explicit or
implicit prompt). The reference model is the starting policy unless `ref_model_name_or_path` says
otherwise; TRL loads it from the same folder.

FSDP, precision and `torch_compile` follow alignment/sft.py: the refusal and the precision policy
apply before DPOTrainer wraps the reference model (in its __init__), and `torch_compile: true`
compiles the policy's decoder layers, not the reference model's (forward only, and run once per
batch), in place of the Trainer's whole-model compile. Under FSDP2 the reference model is sharded
per decoder layer like the policy (`shard_reference`), not as the one unit TRL would make of it.
"""

from __future__ import annotations

# First, before anything imports torch (see alignment/sft.py, which logs the notes).
from training.lifecycle import die_with_launcher  # a launched worker never outlives its launcher
from training.reliability import set_launch_env

die_with_launcher()
set_launch_env()

import logging  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

from alignment.constitution import DEFAULT_CONSTITUTION, load_constitution, record_in_model_card  # noqa: E402
from alignment.data import load_preference_dataset  # noqa: E402
from alignment.generate import require_chat_template  # noqa: E402
from alignment.sft import (  # noqa: E402
    card_summary,
    compile_layers,
    end_run,
    fsdp_report,
    genesis_trainer,
    log_launch_env,
    model_init_kwargs,
    parse_with,
    plan_check,
    run_script,
    save_final,
    take_compile,
)

logger = logging.getLogger(__name__)

BUNDLED_PAIRS = Path(__file__).resolve().parent / "data" / "preference_seeds.jsonl"


@dataclass
class DPOScriptArguments:
    dataset_name: str = field(
        default=str(BUNDLED_PAIRS),
        metadata={"help": "Preference pairs: local jsonl/json/parquet or Hub id, in TRL's preference format."},
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Hub dataset configuration name."})
    dataset_split: str = field(default="train", metadata={"help": "Split to train on."})
    max_samples: int | None = field(default=None, metadata={"help": "Use at most this many pairs."})
    max_prompt_length: int | None = field(
        default=None, metadata={"help": "Truncate prompts to this many tokens (counted in the log)."}
    )
    ref_model_name_or_path: str | None = field(
        default=None, metadata={"help": "Reference model folder; default: the starting policy itself."}
    )
    constitution: str = field(
        default=str(DEFAULT_CONSTITUTION), metadata={"help": "Constitution YAML recorded in the model card."}
    )
    ignore_plan: bool = field(
        default=False,
        metadata={"help": "On CUDA, go ahead even when `genesis plan` predicts this launch does not fit the GPUs."},
    )


def load_reference(script_args, model_args, training_args):
    """The reference model, loaded here as DPOTrainer would (same path and kwargs as the policy) so that
    `GenesisDPOTrainer` can shard it before DPOTrainer wraps it. None with `precompute_ref_log_probs`
    and no `ref_model_name_or_path`: DPOTrainer then loads it for the one pass before training and
    frees it (under FSDP), or uses the policy itself."""
    from trl.trainer.utils import create_model_from_path

    path = script_args.ref_model_name_or_path
    if path is None:
        if training_args.precompute_ref_log_probs:
            return None
        path = model_args.model_name_or_path
    return create_model_from_path(path, **training_args.model_init_kwargs)


def shard_reference(ref_model, accelerator) -> int:
    """`fully_shard` each decoder layer of the reference model, then the root, with the policy's FSDP2
    settings (Genesis's precision policy, mesh, offload); frozen, eval mode, resharded after every
    forward. Returns the number of layer units.

    Why: TRL 1.16's `prepare_fsdp` (trl/models/utils.py) calls `fully_shard(model)` once, on the
    root, for FSDP2 (only its FSDP1 branch applies the auto-wrap policy), so each reference forward
    all-gathers the whole model (2 GB of bf16 weights at 1B, twice per micro-batch pair) at the point
    of the step where the policy holds its unsharded fp32 accumulated gradients. Per layer, one layer
    (~60 MB at 1B) is gathered at a time, as for the policy. `prepare_fsdp` leaves a module that is
    already an FSDPModule as it is (it only calls `.eval()`)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    plugin = accelerator.state.fsdp_plugin
    names = set(plugin.transformer_cls_names_to_wrap or getattr(ref_model, "_no_split_modules", None) or [])
    layers = [m for m in ref_model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(f"reference model: no {sorted(names)} layers to shard in {type(ref_model).__name__}")
    mesh = getattr(accelerator, "torch_device_mesh", None)
    kwargs = {"mesh": mesh[tuple(accelerator.parallelism_config.fsdp_dim_names)] if mesh is not None else None,
              "mp_policy": plugin.mixed_precision_policy or MixedPrecisionPolicy(),
              "offload_policy": plugin.cpu_offload,
              "reshard_after_forward": True}  # explicit: FSDP2 would keep an auto root gathered for a backward
    ref_model.requires_grad_(False)
    for layer in layers:
        fully_shard(layer, **kwargs)
    fully_shard(ref_model, **kwargs)
    ref_model.eval()
    logger.info("reference model: %d %s units + root, frozen, resharded after forward", len(layers),
                type(layers[0]).__name__)
    return len(layers)


def reference_report(ref_model) -> dict:
    """How the reference model is held (the distributed report's "ref_model")."""
    if ref_model is None:
        return {"ref_model": None}
    from torch.distributed.fsdp import FSDPModule

    units = {name or "<root>": module._get_fsdp_state()._fsdp_param_group.post_forward_mesh_info is not None
             for name, module in ref_model.named_modules()
             if isinstance(module, FSDPModule) and module._get_fsdp_state()._fsdp_param_group is not None}
    return {"ref_model": {"fsdp_units": sorted(units), "resharded_after_forward": sorted(n for n, r in units.items() if r),
                          "trainable_parameters": sum(p.numel() for p in ref_model.parameters() if p.requires_grad),
                          "training": ref_model.training}}


def genesis_dpo_trainer(ignore_plan: bool = False):
    """genesis_trainer(DPOTrainer) that shards the reference model it is given per decoder layer
    (`shard_reference`) as soon as its Accelerator exists under FSDP2: inside Trainer.__init__,
    before DPOTrainer's own `prepare_fsdp` would wrap it whole. Not with `precompute_ref_log_probs`:
    DPOTrainer hashes the reference's plain tensors first, and uses it for one pass only."""
    from accelerate.utils import DistributedType
    from trl import DPOTrainer

    class GenesisDPOTrainer(genesis_trainer(DPOTrainer, stage="dpo", ignore_plan=ignore_plan)):
        def __init__(self, *args, ref_model=None, **kwargs):
            self._reference_to_shard = ref_model
            super().__init__(*args, ref_model=ref_model, **kwargs)

        def create_accelerator_and_postprocess(self):
            super().create_accelerator_and_postprocess()
            ref, self._reference_to_shard = self._reference_to_shard, None
            plugin = getattr(self.accelerator.state, "fsdp_plugin", None)
            if (ref is not None and self.accelerator.distributed_type == DistributedType.FSDP
                    and plugin is not None and plugin.fsdp_version == 2 and not self.args.precompute_ref_log_probs):
                shard_reference(ref, self.accelerator)

    return GenesisDPOTrainer


def main(script_args: DPOScriptArguments, training_args, model_args) -> dict:
    """Train, save (model, tokenizer, model card with the constitution) and return metrics."""
    from transformers import AutoTokenizer

    import genesis_hf  # noqa: F401  (registers "genesis" with AutoModelForCausalLM)

    log_launch_env()
    if not model_args.model_name_or_path:
        raise ValueError("model_name_or_path is required (the SFT model folder or Hub id)")
    constitution = load_constitution(script_args.constitution)
    tokenizer = AutoTokenizer.from_pretrained(
        model_args.model_name_or_path, trust_remote_code=training_args.trust_remote_code
    )
    require_chat_template(tokenizer, f"tokenizer of {model_args.model_name_or_path}")
    dataset, data_stats = load_preference_dataset(
        script_args.dataset_name, script_args.dataset_split, script_args.dataset_config,
        script_args.max_samples, tokenizer, script_args.max_prompt_length,
    )

    training_args.model_init_kwargs = model_init_kwargs(model_args, training_args)
    ref_model = load_reference(script_args, model_args, training_args)
    compile_kwargs = take_compile(training_args)
    trainer = genesis_dpo_trainer(script_args.ignore_plan)(  # FSDP: the reference model is sharded in here, under our policy
        model=model_args.model_name_or_path,
        ref_model=ref_model,
        args=training_args,
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    plan_check(trainer, training_args.output_dir)
    compiled = compile_layers(trainer.model, compile_kwargs) if compile_kwargs else 0  # the policy, not the reference
    result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    report = fsdp_report(trainer, compiled, reference_report(trainer.ref_model))

    save_final(trainer, tokenizer, training_args.output_dir)
    margins = [h["rewards/margins"] for h in trainer.state.log_history if "rewards/margins" in h]
    if trainer.accelerator.is_main_process:
        logger.info("DPO done: loss %.4f, saved to %s", result.training_loss, training_args.output_dir)
        record_in_model_card(
            training_args.output_dir, constitution, "dpo",
            {"sft_model": model_args.model_name_or_path, "data": data_stats, "train_loss": result.training_loss,
             "reward_margin_first_last": [margins[0], margins[-1]] if margins else None, "beta": training_args.beta,
             "steps": trainer.state.global_step, "distributed": card_summary(report)},
        )
    end_run(trainer)
    return {"output_dir": training_args.output_dir, "train_loss": result.training_loss, "reward_margins": margins,
            "log_history": trainer.state.log_history, "data": data_stats,
            "distributed": report}


def make_parser():
    from trl import DPOConfig, ModelConfig, TrlParser

    return TrlParser((DPOScriptArguments, DPOConfig, ModelConfig))


def parse(argv: list[str] | None = None):
    return parse_with(make_parser(), argv)


if __name__ == "__main__":
    run_script(main, parse)
